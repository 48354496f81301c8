"""The IOA plan on disk, shared by ``ioa-plan`` (which writes it), ``synthesize`` and ``distill``.

``{results_dir}/{task}/ioa/`` holds ``plan.json`` (modules, gaps, stages), ``val_scores.parquet``
(every validation row's module and T*'s score: the mastery gate's teacher side) and
``synthesis.json``. The validation rows both the plan and the gates score are
:func:`validation_rows`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.config import task_dir
from scd_pipeline.errors import DataError

PLAN_FILE = "plan.json"
VAL_SCORES_FILE = "val_scores.parquet"


def ioa_dir(config: Mapping) -> Path:
    """``{results_dir}/{task}/ioa``: the plan, its validation scores, the synthesis summary."""
    return task_dir(config) / "ioa"


def read_plan(config: Mapping) -> dict:
    """``ioa/plan.json``, with a one-line error naming the command that writes it."""
    path = ioa_dir(config) / PLAN_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; the curriculum reads it (run `scd-pipeline ioa-plan` first)")
    return json.loads(path.read_text(encoding="utf-8"))


def validation_rows(config: Mapping) -> tuple[Path, pd.DataFrame]:
    """The validation split (its first ``ioa.val_max_samples`` rows when set)."""
    path = task_dir(config) / "data" / "val.parquet"
    frame = read_split(path)
    cap = config["ioa"]["val_max_samples"]
    return path, (frame.iloc[:cap].reset_index(drop=True) if cap else frame)
