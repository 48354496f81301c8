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
