"""``teacher/checkpoints.json``: the teacher's N evenly spaced checkpoints and which one is T*.

Written by teacher SFT, read by the cache, subdomain, distillation and report stages. Format in
docs/ARTIFACTS.md: ``{"metric", "best_index", "checkpoints": [{"index", "path", "step", "epoch",
"train_loss", "val_loss", "val_metric", "best"}, ...]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scd_pipeline.engine.io import read_json, write_json
from scd_pipeline.errors import ConfigError, DataError

FILE_NAME = "checkpoints.json"


def best_checkpoint_index(records: Sequence[dict]) -> int:
    """Index of T*: the best ``val_metric`` (higher is better; a missing or NaN metric ranks
    last); ties go to the later step."""
    if not records:
        raise ValueError("best_checkpoint_index: no checkpoints")

    def key(record: dict) -> tuple[float, int]:
        metric = record["val_metric"]
        return (float("-inf") if metric is None or metric != metric else metric, record["step"])
    return int(max(records, key=key)["index"])


def write_checkpoints(teacher_dir: str | Path, records: Sequence[dict], metric: str) -> dict:
    """Write ``checkpoints.json`` with T* computed by :func:`best_checkpoint_index`; return it."""
    best = best_checkpoint_index(records)
    content = {"metric": metric, "best_index": best,
               "checkpoints": [{**record, "best": record["index"] == best} for record in records]}
    write_json(Path(teacher_dir) / FILE_NAME, content)
    return content


def read_checkpoints(teacher_dir: str | Path) -> dict:
    """``checkpoints.json``, checked: a non-empty list of entries with ``index`` and ``path`` and
    a ``best_index`` that names one of them. A one-line DataError otherwise."""
    path = Path(teacher_dir) / FILE_NAME
    if not path.is_file():
        raise DataError(f"{path}: not found (run `scd-pipeline sft --role teacher` first)")
    try:
        record = read_json(path)
        entries = record["checkpoints"]
        indices = [int(e["index"]) for e in entries]
        [str(e["path"]) for e in entries]
        best = int(record["best_index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a checkpoints.json with best_index and checkpoints[].index/path "
                        f"({exc.__class__.__name__}: {exc}); re-run teacher SFT") from exc
    if not entries:
        raise DataError(f"{path}: lists no checkpoints; re-run `scd-pipeline sft --role teacher`")
    if best not in indices:
        raise DataError(f"{path}: best_index {best} is not one of the checkpoints {indices}; re-run teacher SFT")
    return record


def checkpoint_indices(checkpoints: dict) -> list[int]:
    return sorted(int(e["index"]) for e in checkpoints["checkpoints"])


def checkpoint_entry(checkpoints: dict, index: int) -> dict:
    """The entry of checkpoint ``index`` (1-based, as in ``ckpt-{index}``)."""
    for entry in checkpoints["checkpoints"]:
        if int(entry["index"]) == index:
            return entry
    available = ", ".join(str(e["index"]) for e in checkpoints["checkpoints"])
    raise ConfigError(f"--checkpoint {index}: no such teacher checkpoint (available: {available})")
