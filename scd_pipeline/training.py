"""Training pieces shared by SFT and distillation.

One readable loop lives in each stage (``sft.py``, later ``distill.py``); what they share lives
here: the accelerate set-up and precision, deterministic seeding, AdamW with a cosine schedule and
linear warm-up, the data plan (length-grouped micro-batches per optimizer step), evenly spaced
checkpoint steps, the completion-only forward that DDP can wrap, and the resume state (model,
optimizer, scheduler, RNG, step and data order) committed atomically.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scd_pipeline.batching import Batch, completion_logits, length_grouped_batches
from scd_pipeline.errors import ConfigError
from scd_pipeline.io import read_json, write_json

RESUME_DIR_NAME = "latest"
PROGRESS_FILE = "progress.json"


# --- precision, accelerator, seeding -----------------------------------------------------------

def resolve_mixed_precision(precision: str) -> str:
    """Map the config's ``sft.precision`` to accelerate's ``mixed_precision`` ("no" or "bf16").

    ``auto``: bf16 on a CUDA GPU that supports it, else fp32 (a CPU without bf16 units is fastest
    in fp32). Weights stay fp32 either way; bf16 is autocast for the forward and backward.
    """
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "no"
    if precision == "fp32":
        return "no"
    if precision == "bf16":
        return "bf16"
    raise ConfigError(f"config key sft.precision: {precision!r} is not one of auto, fp32, bf16")


def make_accelerator(precision: str):
    """An ``accelerate.Accelerator`` for one or several processes (``accelerate launch``).

    The scheduler is stepped once per optimizer step (not once per process): our schedules are
    defined in global optimizer steps.
    """
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolve_mixed_precision(precision),
                       step_scheduler_with_optimizer=False)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a CPU run repeats bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --- optimizer and schedule --------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on vectors (norms, biases).

    The fused kernel (CPU and CUDA) is used: ~7x faster than the per-tensor loop on a 57 M
    parameter student on CPU, same result to fp32 rounding.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters (check sft.mode and sft.lora.target_modules)")
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(warmup_ratio * total_steps))


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier for the update that follows ``step`` completed optimizer steps.

    Linear warm-up (step + 1) / warmup_steps over the first ``warmup_steps`` updates, so the
    first update already moves and the last warm-up update runs at the peak; then a cosine from 1
    down towards 0 over the remaining updates: 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following ``cosine_warmup_factor`` (restart = build a new one)."""
    warmup = warmup_steps_for(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_warmup_factor(step, total_steps, warmup))


# --- data plan and checkpoint spacing ----------------------------------------------------------

@dataclass(frozen=True)
class PlannedStep:
    """One optimizer step: the micro-batches (row positions) it consumes and the epoch it ends at."""

    micro_batches: list[list[int]]
    epoch: float


def training_plan(lengths: Sequence[int], batch_size: int, micro_per_step: int, epochs: float,
                  seed: int) -> list[PlannedStep]:
    """The whole run's data order: ``ceil(epochs * steps_per_epoch)`` optimizer steps.

    Each epoch is a fresh length-grouped shuffle (seeded by ``seed`` and the epoch number) cut
    into steps of ``micro_per_step`` micro-batches (the last step of an epoch may hold fewer).
    Fractional ``epochs`` stop part-way through the last epoch.
    """
    if not lengths:
        raise ConfigError("the training split is empty: nothing to train on")
    steps: list[PlannedStep] = []
    epoch = 0
    total = None
    while total is None or len(steps) < total:
        batches = length_grouped_batches(lengths, batch_size, seed=seed * 1000 + epoch)
        per_epoch = math.ceil(len(batches) / micro_per_step)
        total = max(1, math.ceil(epochs * per_epoch)) if total is None else total
        for j in range(per_epoch):
            steps.append(PlannedStep(batches[j * micro_per_step : (j + 1) * micro_per_step],
                                     round(epoch + (j + 1) / per_epoch, 6)))
        epoch += 1
    return steps[:total]


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """Steps after which checkpoints k = 1..N are saved: floor(k * T / N), evenly spaced, last = T."""
    if n_checkpoints > total_steps:
        raise ConfigError(
            f"config key sft.teacher.n_checkpoints: {n_checkpoints} checkpoints need at least as "
            f"many optimizer steps, but the run has {total_steps}; raise sft.teacher.epochs or lower "
            "sft.batch_size / sft.grad_accum / n_checkpoints")
    return [k * total_steps // n_checkpoints for k in range(1, n_checkpoints + 1)]


# --- forward and loss --------------------------------------------------------------------------

class CompletionLM(torch.nn.Module):
    """A causal LM whose forward returns logits at completion positions only: (N, vocab).

    Wrapping the model (rather than calling ``completion_logits`` on it) keeps the training
    forward inside ``forward``, so DDP and autocast from ``accelerator.prepare`` apply to it.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                predict_mask: torch.Tensor) -> torch.Tensor:
        empty = torch.empty(0, dtype=torch.long, device=input_ids.device)
        # completion_logits reads only the three tensors below.
        return completion_logits(self.model, Batch(input_ids, attention_mask, predict_mask, empty, empty, []))


def per_sample_mean_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood of each sample's completion tokens: (B,)."""
    token_nll = torch.nn.functional.cross_entropy(logits.float(), batch.target_ids, reduction="none")
    totals = torch.zeros(batch.num_samples, dtype=token_nll.dtype, device=token_nll.device)
    totals = totals.index_add(0, batch.token_sample, token_nll)
    counts = torch.bincount(batch.token_sample, minlength=batch.num_samples)
    return totals / counts.clamp(min=1)


# --- resume state ------------------------------------------------------------------------------

def save_resume_state(accelerator, state_dir: str | Path, progress: dict) -> Path:
    """Save model, optimizer, scheduler, RNG (accelerate) and ``progress`` as the new resume point.

    Every process writes into a temporary folder with a name they all know; the main process then
    swaps it in for ``{state_dir}/latest``. A kill at any moment leaves either the old or the new
    state complete (``load_resume_state`` also looks at the swap's ``.old`` copy).
    """
    state_dir = Path(state_dir)
    latest = state_dir / RESUME_DIR_NAME
    staging = state_dir / f".{RESUME_DIR_NAME}.step{progress['step']}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        write_json(staging / PROGRESS_FILE, progress)
        old = state_dir / f".{RESUME_DIR_NAME}.old"
        shutil.rmtree(old, ignore_errors=True)
        if latest.exists():
            os.replace(latest, old)
        os.replace(staging, latest)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return latest


def find_resume_state(state_dir: str | Path) -> Path | None:
    """The folder of the last complete resume state, or None."""
    state_dir = Path(state_dir)
    for name in (RESUME_DIR_NAME, f".{RESUME_DIR_NAME}.old"):
        candidate = state_dir / name
        if (candidate / PROGRESS_FILE).is_file():
            return candidate
    return None


def read_resume_progress(state_dir: str | Path) -> dict | None:
    """The ``progress`` saved with the last complete resume state (nothing is loaded), or None."""
    found = find_resume_state(state_dir)
    return None if found is None else read_json(found / PROGRESS_FILE)


def restore_resume_state(accelerator, state_dir: str | Path) -> dict:
    """Load model, optimizer, scheduler and RNG of the last resume state; return its progress."""
    found = find_resume_state(state_dir)
    if found is None:
        raise FileNotFoundError(f"{state_dir}: no complete resume state")
    accelerator.load_state(str(found))
    return read_json(found / PROGRESS_FILE)


# --- helpers shared by the SFT and distillation loops -------------------------------------------

def process_share(micro_batches: list[list[int]], process: int, processes: int) -> tuple[list[list[int]], float]:
    """This process's micro-batches; a process left without one re-runs the first at weight 0
    so that every process joins the gradient all-reduce."""
    mine = micro_batches[process::processes]
    return (mine, 1.0) if mine else (micro_batches[:1], 0.0)


def model_identity(model_dir: Path) -> dict:
    """What identifies a model (or LoRA adapter) directory without hashing gigabytes: its config
    and weight file sizes."""
    weights = sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors"))
    config = model_dir / "config.json"
    if not config.is_file():
        config = model_dir / "adapter_config.json"
    return {"path": str(model_dir), "config": config.read_text(encoding="utf-8"), "weights": weights}


def append_log(path: Path, record: dict) -> None:
    """Append one JSON line to a metrics log."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines written after the resume point (a killed run may have logged further)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
