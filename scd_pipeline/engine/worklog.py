"""What a process computed: tokens and seconds per batch of each kind of work, summarised at exit.

Every compute loop of the package reports its batches here: ``forward`` (teacher-forced no-grad
passes: caches, scoring, validation, probes, pass rates), ``train`` (optimizer steps: forward,
backward, update) and ``generate`` (sampled or greedy continuations). When the process ends, one
line per kind goes to stderr (so into the job's log under Snakemake)::

    scd-work {"kind": "train", "batches": 80, "tokens": 61234, "seconds": 105.3, "steady_tokens_per_s": 590.1, "compute_seconds": 103.8}

A process that used a GPU adds ``peak_gpu_bytes`` (torch's peak allocation) to each line.
``compute_seconds`` = tokens / steady rate is the compute-bound part of the job's time: what the
work would take at the rate the loop sustains once running. Everything else in the job's wall time
(interpreter and library start, model loading, Parquet I/O, checkpoint saves, warm-up batches,
idle) is overhead. ``benchmarks/bench_e2e.py`` reads these lines beside Snakemake's benchmark
files. The steady rate is the median of the per-batch rates after the first batch (which pays
allocator and kernel warm-up), so a few slow batches (a pause, a save) count as overhead.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "scd-work "
KINDS = ("forward", "train", "generate")

_batches: dict[str, list[tuple[int, float]]] = {}
_registered = False  # report() is registered to run at exit once the first batch comes


def add(kind: str, tokens: int, seconds: float) -> None:
    """Record one batch of ``kind``: ``tokens`` processed in ``seconds`` of wall time."""
    if kind not in KINDS:
        raise ValueError(f"worklog.add: kind {kind!r} is not one of {KINDS}")
    global _registered
    if not _registered:
        atexit.register(report)
        _registered = True
    _batches.setdefault(kind, []).append((int(tokens), float(seconds)))


@contextmanager
def timed(kind: str, tokens: int) -> Iterator[None]:
    """Time the block as one batch of ``kind`` with ``tokens`` tokens."""
    started = time.perf_counter()
    yield
    add(kind, tokens, time.perf_counter() - started)


def steady_rate(batches: list[tuple[int, float]]) -> float:
    """Median tokens/s over the batches after the first (the only batch, when there is one)."""
    rates = [tokens / seconds for tokens, seconds in batches[1:] or batches if seconds > 0]
    return statistics.median(rates) if rates else math.nan


def summary(kind: str, batches: list[tuple[int, float]]) -> dict:
    """One kind's totals, its steady rate and its compute-bound seconds."""
    tokens = sum(t for t, _ in batches)
    rate = steady_rate(batches)
    return {"kind": kind, "batches": len(batches), "tokens": tokens,
            "seconds": round(sum(s for _, s in batches), 3),
            "steady_tokens_per_s": round(rate, 1), "compute_seconds": round(tokens / rate, 3)}


def report(stream=None) -> list[dict]:
    """Write one ``scd-work`` line per kind recorded so far, then forget them; return the records.

    Under a multi-process launch only rank 0 writes: the training step's record already holds
    every process's tokens, and the no-grad passes (validation, probes, pass rates) run whole on
    every process, so one process's record is the job's work."""
    records = [summary(kind, batches) for kind, batches in _batches.items() if batches]
    _batches.clear()
    peak = peak_gpu_bytes()
    if peak is not None:
        records = [{**record, "peak_gpu_bytes": peak} for record in records]
    if os.environ.get("RANK", "0") != "0":
        return []
    stream = stream or sys.stderr
    for record in records:
        stream.write(PREFIX + json.dumps(record) + "\n")
    stream.flush()
    return records


def peak_gpu_bytes() -> int | None:
    """The process's peak CUDA memory allocated by torch, when it used a GPU; None otherwise."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def discard() -> None:
    """Forget the records (a stage that fails says one line, nothing after it)."""
    _batches.clear()


def parse(lines) -> list[dict]:
    """The ``scd-work`` records among a log's lines (a progress bar may share the line's start)."""
    records = []
    for line in lines:
        at = line.find(PREFIX)
        if at >= 0:
            try:
                records.append(json.loads(line[at + len(PREFIX):]))
            except json.JSONDecodeError:
                continue  # a line cut by a killed job
    return records
