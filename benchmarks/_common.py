"""Shared helpers of the benchmark scripts: one CPU thread, models, prepared samples, timing, tables.

Every script imports this module first: it pins torch (and the BLAS/OpenMP pools) to
``BENCH_THREADS`` threads (default 1), because the benchmarks share a small machine with real
pipeline runs; ratios measured on one thread are what the scripts report.
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = str(THREADS)  # before torch is imported, so its pools start this size

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "results" / "models"  # read only: the lead's prepared models
MODEL_CHOICES = ("auto", "smollm2", "tiny")


@dataclass
class LoadedModel:
    """A model ready for inference on CPU in fp32, its tokenizer, and where the tokenizer lives
    on disk (``prepare_data`` reads the tokenizer from a directory)."""

    name: str
    model: Any
    tokenizer: Any
    tokenizer_dir: Path


def resolve_model_choice(choice: str, role: str = "teacher") -> str:
    """``auto``: SmolLM2 (``results/models/{role}_base``) when prepared, else the tiny fallback."""
    if choice != "auto":
        return choice
    return "smollm2" if (MODELS_DIR / f"{role}_base" / "config.json").is_file() else "tiny"


def load_bench_model(choice: str, role: str, workdir: Path, tiny_layers: int = 4, tiny_seed: int = 0) -> LoadedModel:
    """The ``role`` model (``teacher`` or ``student``): the prepared SmolLM2 base, or a tiny random
    Llama with the byte-level tokenizer (saved under ``workdir`` for ``prepare_data``)."""
    from scd_pipeline.engine.models import load_model
    from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama

    choice = resolve_model_choice(choice, role)
    if choice == "smollm2":
        path = MODELS_DIR / f"{role}_base"
        model, tokenizer = load_model(path, dtype="float32", device="cpu")
        return LoadedModel(f"SmolLM2 {role}_base", model, tokenizer, path)
    tokenizer = byte_level_tokenizer()
    tokenizer_dir = workdir / "tiny-tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer.save_pretrained(tokenizer_dir)
    model = tiny_llama(tokenizer, num_layers=tiny_layers, seed=tiny_seed)
    return LoadedModel(f"tiny Llama ({tiny_layers} layers, seed {tiny_seed})", model, tokenizer, tokenizer_dir)


def prepared_split(task: str, tokenizer_dir: Path, workdir: Path, n_samples: int | None,
                   split: str = "train", max_length: int = 1024) -> pd.DataFrame:
    """``n_samples`` rows of ``split`` of ``task`` prepared by ``scd_pipeline.stages.prepare_data.prepare_data``
    with the given tokenizer into ``workdir`` (never under results/). The first rows in file order,
    so two runs with the same tokenizer use the same samples."""
    from scd_pipeline.engine.batching import read_split
    from scd_pipeline.engine.config import load_config, task_dir
    from scd_pipeline.stages.prepare_data import prepare_data

    config = load_config(overrides={"task": task, "results_dir": str(workdir / "data"),
                                    "data.max_train_samples": None, "data.max_length": max_length,
                                    "data.jmed_root": str(REPO_ROOT.parent / "shared" / "data" / "jmed-llm")})
    data_dir = task_dir(config) / "data"
    if not (data_dir / f"{split}.parquet").is_file():
        prepare_data(config, tokenizer_dir)
    frame = read_split(data_dir / f"{split}.parquet")
    if n_samples is not None:
        frame = frame.iloc[:n_samples].reset_index(drop=True)
    return frame


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call and its result."""
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def interleaved_times(variants: dict[str, Callable[[int], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per round of each variant, run one after another inside every round.

    ``variants[name](round)`` runs one unit of work (the round index picks e.g. the batch). The
    order of the variants rotates from round to round so that slow spells of a shared machine
    hit each one alike; the first ``warmup`` rounds are run and discarded.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, _ = timed(lambda name=name, index=round_index: variants[name](index))
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio: robust to load that changes between rounds."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``(slope, intercept)`` of the ordinary least-squares line through the points."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope, mean_y - slope * mean_x


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table (pastes straight into RESULTS.md); floats to 4 significant digits."""
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line naming the machine and the thread budget the figures were taken with."""
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {platform.machine()} CPU, {os.cpu_count()} cores "
            f"(shared, loaded), torch {torch.__version__} using {torch.get_num_threads()} thread(s), fp32, no GPU")
