"""Task evaluation: ``scd-pipeline evaluate --model PATH`` -> ``eval/{name}.json`` + predictions.

Scoring is :mod:`scd_pipeline.engine.scoring`'s one path (choice tasks rank the option letters by their
log-probability at the first completion position; list tasks generate greedily and parse a list),
the same that validates SFT checkpoints and scores the teacher caches and the SFS/TFS split.

A model path may be a base model, a teacher checkpoint, a LoRA adapter directory (its
``adapter_config.json`` names the base, which is loaded and merged) or a distilled student.
"""

from __future__ import annotations

import time
from pathlib import Path

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.config import task_dir
from scd_pipeline.engine.io import atomic_path, json_safe, write_json
from scd_pipeline.engine.locking import Artifact, plain_name
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.naming import HELDOUT_SPLIT, default_eval_name, eval_subdir
from scd_pipeline.engine.scoring import (
    SAMPLE_METRIC,
    choice_categories,
    predict_split,
    split_kind,
    summarise,
)
from scd_pipeline.engine.tokenization import check_data_tokenizer
from scd_pipeline.errors import DataError
from scd_pipeline.math.metrics import kappa_weights

PREDICTION_COLUMNS = ["sample_id", "tag", "gold", "prediction", "gold_logprob", "gold_tokens", "score"]


def evaluate(config: dict, model_path: str | Path, split: str | None = None,
             name: str | None = None) -> Path:
    """Evaluate a model on a prepared split; write ``eval/{name}.json`` and ``.predictions.parquet``.

    Returns the path of the JSON file.
    """
    settings = config["evaluate"]
    split = split or settings["split"]
    name = name or default_eval_name(model_path)
    data_dir = task_dir(config) / "data"
    split_file = data_dir / f"{split}.parquet"
    if split == HELDOUT_SPLIT and not split_file.is_file() and (data_dir / "manifest.json").is_file():
        raise DataError(f"{split_file}: this task's data has no held-out split (data.heldout_size is 0 for it); "
                        "set data.heldout_size: N and re-run `scd-pipeline prepare-data`")
    frame = read_split(split_file)
    out_dir = task_dir(config) / eval_subdir(split)
    if frame.empty and split == HELDOUT_SPLIT:  # the pool left no rows for it (see the manifest)
        return _write_empty(out_dir, name, config, model_path, split)
    kind = split_kind(frame, str(split_file))
    model, tokenizer = load_model(model_path)
    first_parameter = next(model.parameters())
    check_data_tokenizer(data_dir, tokenizer, model_path)
    started = time.perf_counter()
    predictions = predict_split(model, tokenizer, frame, settings["batch_size"],
                                settings["max_new_tokens"], where=str(split_file), progress=True)
    seconds = time.perf_counter() - started
    categories = choice_categories(frame) if kind == "choice" else []
    weights = kappa_weights(config["task"])
    summary = summarise(predictions, kind, categories, weights)
    predictions_file = out_dir / f"{name}.predictions.parquet"
    with atomic_path(predictions_file) as tmp:
        predictions[PREDICTION_COLUMNS].to_parquet(tmp, index=False)
    report = {"name": name, "model": str(model_path), "task": config["task"], "split": split,
              "kind": kind, "n": len(frame), **summary,
              "kappa_weights": weights if kind == "choice" else None, "categories": categories,
              "score": SAMPLE_METRIC[kind],
              "malformed_outputs": int(predictions["malformed"].sum()),
              "seconds": round(seconds, 3), "samples_per_s": round(len(frame) / max(seconds, 1e-9), 3),
              "device": str(first_parameter.device),
              "dtype": str(first_parameter.dtype).removeprefix("torch.")}
    out_file = out_dir / f"{name}.json"
    write_json(out_file, json_safe(report))
    return out_file


def _write_empty(out_dir: Path, name: str, config: dict, model_path, split: str) -> Path:
    """An evaluation of an empty split: ``n`` 0, no metrics, an empty predictions file."""
    import pandas as pd

    with atomic_path(out_dir / f"{name}.predictions.parquet") as tmp:
        pd.DataFrame({column: pd.Series(dtype=object) for column in PREDICTION_COLUMNS}).to_parquet(tmp, index=False)
    out_file = out_dir / f"{name}.json"
    write_json(out_file, {"name": name, "model": str(model_path), "task": config["task"], "split": split, "n": 0,
                          "empty": "the split has no rows (data/manifest.json: heldout)"})
    return out_file


def artifacts(config: dict, *, name: str, split: str | None = None) -> list[Artifact]:
    """What ``evaluate --name NAME [--split SPLIT]`` writes: the metrics and the predictions (under
    ``eval/``, or ``eval/heldout/`` for the held-out split)."""
    name = plain_name(name, "--name")
    folder = task_dir(config) / eval_subdir(split or config["evaluate"]["split"])
    metrics = folder / f"{name}.json"
    return [Artifact(metrics, (metrics, folder / f"{name}.predictions.parquet"))]
