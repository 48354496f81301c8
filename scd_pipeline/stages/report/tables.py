"""What the report computes from the evaluations: the results frame, the best student, per-tag
scores, and the paper's Table 1 across tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scd_pipeline.engine.naming import REPLICATE_MARK
from scd_pipeline.stages.report.evidence import (
    DIFFERENCE_COLUMNS,
    REFERENCES,
    TaskEvidence,
)
from scd_pipeline.stages.report.render import as_float

STUDENT_ROLES = ("sft", "distilled")


@dataclass
class ModelRow:
    """One row of the results table: a model, its evaluation (or why there is none).

    A replicated row (``seed_names`` not empty) has one evaluation per seed; ``result`` then holds
    the mean over the seeds that were evaluated (``mean_result``) and ``seed_results`` each one.
    """

    label: str
    role: str  # teacher | sft | distilled | other
    eval_name: str
    result: dict | None = None
    missing: str | None = None  # why ``result`` is None, with the command that fixes it
    model_dir: Path | None = None  # the evaluated model's directory, when the pipeline knows it
    method: str | None = None  # distilled rows: the method string / students/ folder name
    seed_names: dict[int, str] = field(default_factory=dict)  # replicate s -> its eval name
    seed_results: dict[int, dict] = field(default_factory=dict)
    seeds_missing: list[str] = field(default_factory=list)  # "seed-s: command" per absent replicate
    folder: str = "eval"  # where the evaluation is, under the task (eval/heldout for the held-out split)

    @property
    def eval_names(self) -> list[str]:
        """The evaluations behind the row: one per evaluated seed, or the row's own."""
        return [self.seed_names[s] for s in sorted(self.seed_results)] if self.seed_names else [self.eval_name]

    @property
    def eval_label(self) -> str:
        if not self.eval_name:
            return "—"
        if self.seed_names:
            return f"{self.folder}/{self.eval_name}{REPLICATE_MARK}seed-{{{','.join(map(str, sorted(self.seed_names)))}}}.json"
        return f"{self.folder}/{self.eval_name}.json"


def results_frame(rows: Sequence[ModelRow], metrics: Sequence[str], primary: str,
                  evidence: TaskEvidence | None = None, deltas: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per model (the content of summary.csv).

    Columns: ``model, role, eval_name, status`` (ok / not run), ``split, n, seeds``, each metric
    (and ``loss``, the mean gold NLL) with ``{metric}_low`` / ``_high`` (its interval) and, for
    replicated rows, ``_sd`` / ``_min`` / ``_max`` over seeds; ``gap_{metric}`` (row - T*; empty
    for the teacher and rows without results); for each reference r in teacher, sft, td
    ``delta_{metric}_vs_{r}`` with ``_low``, ``_high``, ``_p``, ``_family``, ``_p_adjusted`` and
    ``_resolved`` (from ``deltas``, :func:`evidence.differences_frame`); and ``best`` (the highest
    test estimate among the students, see the module docstring).
    """
    shown = [*metrics, "loss"]
    records = []
    for row in rows:
        values = row.result["metrics"] if row.result else {}
        record = {"model": row.label, "role": row.role, "eval_name": row.eval_name,
                  "status": "ok" if row.result else "not run",
                  "split": row.result.get("split") if row.result else None,
                  "n": row.result.get("n") if row.result else None,
                  "seeds": len(row.seed_results) if row.seed_names else (1 if row.result else 0)}
        for metric in shown:
            record[metric] = as_float(values.get(metric))
            interval = evidence.interval(row.eval_name, metric) if evidence else None
            if interval is not None:  # the bootstrap's estimate is the mean over seeds as well
                record[metric] = interval.estimate
            record[f"{metric}_low"] = interval.low if interval else math.nan
            record[f"{metric}_high"] = interval.high if interval else math.nan
            per_seed = [as_float(r["metrics"].get(metric)) for r in row.seed_results.values()]
            record[f"{metric}_sd"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
            record[f"{metric}_min"] = min(per_seed) if per_seed else math.nan
            record[f"{metric}_max"] = max(per_seed) if per_seed else math.nan
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame["n"] = frame["n"].astype("Int64")
    teacher = frame[(frame["role"] == "teacher") & (frame["status"] == "ok")]
    for metric in metrics:
        reference = teacher[metric].iloc[0] if len(teacher) else float("nan")
        gap = frame[metric] - reference
        frame[f"gap_{metric}"] = gap.where(frame["role"] != "teacher")
    for metric in metrics:
        for reference in REFERENCES:
            prefix = f"delta_{metric}_vs_{reference}"
            picked = (deltas[(deltas["metric"] == metric) & (deltas["reference"] == reference)].set_index("key")
                      if deltas is not None else pd.DataFrame(columns=DIFFERENCE_COLUMNS))
            for column, source in (("", "estimate"), ("_low", "low"), ("_high", "high"), ("_p", "p"),
                                   ("_family", "family"), ("_p_adjusted", "p_adjusted"), ("_resolved", "resolved")):
                frame[prefix + column] = [picked[source].get(key) if key in picked.index else
                                          (None if source in ("resolved", "family") else math.nan)
                                          for key in frame["eval_name"]]
    frame["best"] = best_student_mask(frame, [primary, *[m for m in metrics if m != primary]])
    return frame


def best_student_mask(frame: pd.DataFrame, metric_order: Sequence[str]) -> pd.Series:
    """True for the student row(s) with the lexicographically highest metrics (NaN = lowest)."""
    candidates = frame[frame["role"].isin(STUDENT_ROLES) & (frame["status"] == "ok")]
    if candidates.empty:
        return pd.Series(False, index=frame.index)
    keys = {i: tuple(-math.inf if math.isnan(v) else v for v in candidates.loc[i, list(metric_order)])
            for i in candidates.index}
    top = max(keys.values())
    return pd.Series([keys.get(i) == top for i in frame.index], index=frame.index)


def per_tag_frame(rows: Sequence[ModelRow], metric: str) -> pd.DataFrame:
    """Models (rows with results) x tags: the per-tag ``metric`` from each eval's ``per_tag``."""
    evaluated = [row for row in rows if row.result]
    tags = sorted({tag for row in evaluated for tag in row.result.get("per_tag", {})})
    data = {tag: [as_float(row.result.get("per_tag", {}).get(tag, {}).get(metric)) for row in evaluated]
            for tag in tags}
    return pd.DataFrame(data, index=[row.eval_name for row in evaluated], columns=tags)


def tag_sizes(rows: Sequence[ModelRow]) -> dict[str, int]:
    """Samples per tag, from the first evaluation that lists the tag."""
    sizes: dict[str, int] = {}
    for row in rows:
        for tag, values in (row.result or {}).get("per_tag", {}).items():
            sizes.setdefault(tag, values.get("n"))
    return sizes


