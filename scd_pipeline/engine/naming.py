"""Names of evaluation outputs, shared by the CLI, the report and the Snakefile (no heavy imports)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def default_eval_name(model_path: str | Path) -> str:
    """``teacher/ckpt-3`` -> ``teacher-ckpt-3``; otherwise the directory name (``student_sft``),
    with characters other than letters, digits, ``.``, ``_`` and ``-`` replaced (``td+paced`` ->
    ``td_paced``)."""
    path = Path(os.path.normpath(str(model_path)))
    name = path.name
    if re.fullmatch(r"ckpt-\d+", name) and path.parent.name not in ("", ".", ".."):
        name = f"{path.parent.name}-{name}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


# The extra held-out split (prepare-data's data/heldout.parquet) is evaluated beside the test split:
# its evaluations go to eval/heldout/, so that every model keeps one name on both.
HELDOUT_SPLIT = "heldout"


def eval_subdir(split: str) -> str:
    """Folder of a split's evaluations under the task: ``eval`` (the test or validation split the
    config evaluates), ``eval/heldout`` (the extra held-out split)."""
    return f"eval/{HELDOUT_SPLIT}" if split == HELDOUT_SPLIT else "eval"


# Replicates (config ``replicates: N`` > 1): distillation with seed = config seed + s writes
# students/{name}/seed-{s}; its evaluation is eval/{eval name of name}@seed-{s}. '@' is a character
# default_eval_name never emits, so a replicate's evaluation can never collide with another model's.
REPLICATE_MARK = "@"


def replicate_student_name(name: str, replicate: int) -> str:
    """``td``, 1 -> ``td/seed-1`` (the folder under students/ and ``distill --name``)."""
    return f"{name}/seed-{replicate}"


def replicate_eval_name(name: str, replicate: int) -> str:
    """``td+paced``, 1 -> ``td_paced@seed-1`` (``evaluate --name`` of that replicate)."""
    return f"{default_eval_name(name)}{REPLICATE_MARK}seed-{replicate}"


# The SFT student with replicates: seed 0 (the config seed) is student_sft/, the anchor of Adaptive
# Weighting and the start of distillation; seed s > 0 (config seed + s) is student_sft_seeds/seed-{s}/,
# evaluated as student_sft@seed-{s}, a reference with as many seeds as the methods it is compared with.
SFT_STUDENT = "student_sft"


def sft_student_dir(replicate: int) -> str:
    """0 -> ``student_sft``; 2 -> ``student_sft_seeds/seed-2`` (under the task folder)."""
    return SFT_STUDENT if replicate == 0 else f"{SFT_STUDENT}_seeds/seed-{replicate}"


def sft_student_eval_name(replicate: int) -> str:
    """0 -> ``student_sft``; 2 -> ``student_sft@seed-2``."""
    return SFT_STUDENT if replicate == 0 else replicate_eval_name(SFT_STUDENT, replicate)


def multitask_dir(results_dir: str | Path, tasks: list[str]) -> Path:
    """Where ``report --tasks a,b`` writes the table across tasks: ``{results_dir}/tasks-a+b``."""
    return Path(results_dir) / f"tasks-{'+'.join(tasks)}"


def multitask_report_files(results_dir: str | Path, tasks: list[str]) -> list[str]:
    """``report.md``, ``report.html`` and ``summary.csv`` of the table across ``tasks``."""
    folder = multitask_dir(results_dir, tasks)
    return [str(folder / name) for name in ("report.md", "report.html", "summary.csv")]
