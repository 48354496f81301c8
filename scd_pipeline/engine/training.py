"""The one training loop, shared by SFT and every distillation method (:func:`run_training`).

A stage supplies a :class:`Recipe`: its objective (per-sample loss terms from the student's
completion logits), the per-sample weights of the batch mean, and a few hooks — phase start (which
rows, how many epochs, e.g. which teacher checkpoint), epoch start (e.g. PACED's pass rates), after
step (e.g. TAID's t, SFT's checkpoints) and publish. The loop owns everything else:

- accelerate set-up (one or several processes, bf16 autocast on a GPU), deterministic seeding;
- phases: each a fresh AdamW state and a cosine LR schedule with linear warm-up over its own steps
  (SFT is one phase), or, with ``schedule: whole_run``, one AdamW state and one such schedule over
  all phases' steps; the data plan of a phase is length-grouped micro-batches, seeded;
- micro-batch accumulation: every micro-batch adds sum_i v_i L_i / sum_(step) v, so the step's
  gradient is that of the step's weighted mean loss however it is split over micro-batches and
  processes (``weighting.step_share``; a step whose weights are all 0 moves nothing);
- the resume state (model, optimizer, RNG, progress with the data plan and the recipe's state),
  saved atomically every ``resume_every_minutes`` (0: after every step), so a killed run redoes at
  most that much; a run started again with the same fingerprint continues bit for bit from the
  last save (mid-phase too: the progress holds the phase's plan);
- the metrics log (``train_log.jsonl``, a torn last line from a power loss is dropped), the
  progress bar, and the publish step (main process), after which the resume state is removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from scd_pipeline.engine import sharding, worklog
from scd_pipeline.engine.batching import (
    Batch,
    completion_logits,
    frame_batch,
    length_grouped_batches,
)
from scd_pipeline.engine.io import read_json, write_json
from scd_pipeline.errors import ConfigError, DataError

RESUME_DIR_NAME = "latest"
PROGRESS_FILE = "progress.json"
LOG_FILE = "train_log.jsonl"


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
    """An ``accelerate.Accelerator`` for one or several processes.

    Several processes come from ``accelerate launch --num_processes N`` on GPUs, or, on a machine
    without CUDA, from any torchrun-style launcher (``accelerate launch --multi_gpu --num_processes
    N`` or ``torchrun --nproc_per_node N``): ``cpu=True`` there makes accelerate join them into one
    gloo process group instead of running N independent copies. The learning rate is set by the
    loop at every optimizer step from the global step, so it does not depend on the process count.
    """
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolve_mixed_precision(precision), cpu=not torch.cuda.is_available())


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


def lr_factor(settings: LoopSettings, phase_step: int, phase_steps: int, run_step: int,
              run_steps: int | None) -> float:
    """The LR multiplier of the next update: a cosine with warm-up over the phase's steps (each
    phase restarts it), or, without restarts, over the whole run's (``run_steps`` must be known)."""
    if settings.restart_each_phase:
        return cosine_warmup_factor(phase_step, phase_steps, warmup_steps_for(phase_steps, settings.warmup_ratio))
    if run_steps is None:
        raise ValueError("one LR schedule over the whole run needs the run's step count up front")
    return cosine_warmup_factor(run_step, run_steps, warmup_steps_for(run_steps, settings.warmup_ratio))


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

    # What accelerate's FSDP auto-wrap policy and its embedding / head carve-out read from the model
    # it prepares: without them it found no decoder layer and sharded the whole model as one unit.
    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.model, "_no_split_modules", None)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                predict_mask: torch.Tensor) -> torch.Tensor:
        empty = torch.empty(0, dtype=torch.long, device=input_ids.device)
        # completion_logits reads only the three tensors below.
        return completion_logits(self.model, Batch(input_ids, attention_mask, predict_mask, empty, empty, []))


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward (non-reentrant checkpoints)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; older 5.x:
    if enable is not None:
        enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def per_sample_mean_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood of each sample's completion tokens: (B,)."""
    token_nll = torch.nn.functional.cross_entropy(logits.float(), batch.target_ids, reduction="none")
    totals = torch.zeros(batch.num_samples, dtype=token_nll.dtype, device=token_nll.device)
    totals = totals.index_add(0, batch.token_sample, token_nll)
    counts = torch.bincount(batch.token_sample, minlength=batch.num_samples)
    return totals / counts.clamp(min=1)


# --- resume state ------------------------------------------------------------------------------

def save_resume_state(accelerator, state_dir: str | Path, progress: dict, wrapper: torch.nn.Module,
                      optimizer) -> Path:
    """Save model, optimizer, RNG and ``progress`` as the new resume point.

    Every process writes into a temporary folder with a name they all know (a sharded model: its
    own shards, ``sharding.save_sharded``; else accelerate's ``save_state``); once all have
    written, the main process swaps it in for ``{state_dir}/latest``. A collective: every process
    calls it at the same step (the loop reduces the processes' decisions into one). A kill at any
    moment leaves either the old or the new state complete (``find_resume_state`` also looks at
    the swap's ``.old`` copy).
    """
    state_dir = Path(state_dir)
    latest = state_dir / RESUME_DIR_NAME
    staging = state_dir / f".{RESUME_DIR_NAME}.step{progress['step']}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharding.is_sharded(wrapper):
        sharding.save_sharded(staging, wrapper, optimizer, accelerator.process_index)
    else:
        accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process has written its part before the folder moves
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


def publish_precision(state_dict: dict[str, Tensor], mixed_precision: str) -> dict[str, Tensor]:
    """``state_dict`` with its floating-point tensors in bf16 when training ran under bf16 autocast
    (``mixed_precision == "bf16"``); unchanged otherwise."""
    if mixed_precision != "bf16":
        return state_dict
    return {name: value.to(torch.bfloat16) if value.is_floating_point() else value
            for name, value in state_dict.items()}


def decide_on_rank0(accelerator, value: Any) -> Any:
    """Rank 0's ``value`` on every process (a collective: call it on all of them, at the same point).

    A decision taken per process from its own clock or its own floating-point result can differ
    between processes (rank 0 alone writes checkpoints; reductions differ in their last bits), and a
    decision that starts collectives on some processes only makes them wait on each other forever.
    """
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


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


def restore_resume_state(accelerator, state_dir: str | Path, wrapper: torch.nn.Module, optimizer) -> dict:
    """Load model, optimizer and RNG of the last resume state; return its progress."""
    found = find_resume_state(state_dir)
    if found is None:
        raise FileNotFoundError(f"{state_dir}: no complete resume state")
    if sharding.is_sharded(wrapper):
        sharding.load_sharded(found, wrapper, optimizer, accelerator.process_index)
    else:
        accelerator.load_state(str(found))
    return read_json(found / PROGRESS_FILE)


# --- helpers --------------------------------------------------------------------------------------

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


# --- metrics log ---------------------------------------------------------------------------------

def append_log(path: Path, record: dict) -> None:
    """Append one JSON line to a metrics log."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines up to the resume point (a killed run may have logged further).

    A last line cut mid-record (power loss during a write) is dropped; an unreadable line before
    it means the file was damaged some other way: a one-line DataError with the fix.
    """
    if not path.is_file():
        return
    numbered = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]  # numbers as an editor shows them, blank lines skipped
    kept = []
    for position, (number, line) in enumerate(numbered, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if position == len(numbered):
                break  # a torn tail: the record being written when the process died
            raise DataError(f"{path}: line {number} is not a JSON record (the file was damaged); delete "
                            f"the folder {path.parent} to restart this run from the beginning") from None
        if record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# --- the loop ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from a stage's config section (``sft`` or ``distill``)."""

    lr: float
    batch_size: int
    grad_accum: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float | None
    log_every: int
    resume_every_minutes: float
    seed: int
    restart_each_phase: bool = True  # False: one AdamW state and one LR schedule over the whole run (distill.schedule)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward

    @classmethod
    def from_section(cls, section: dict, lr: float, seed: int) -> LoopSettings:
        return cls(lr=lr, batch_size=section["batch_size"], grad_accum=section["grad_accum"],
                   warmup_ratio=section["warmup_ratio"], weight_decay=section["weight_decay"],
                   max_grad_norm=section["max_grad_norm"], log_every=section["log_every"],
                   resume_every_minutes=section["resume_every_minutes"], seed=seed,
                   gradient_checkpointing=section["gradient_checkpointing"])


@dataclass
class Phase:
    """A recipe's decision at a phase start: which rows of the frame, for how many epochs, and
    what to record about the phase (e.g. the teacher checkpoint it distils from)."""

    epochs: float
    rows: Sequence[int] | None = None  # None: every row of the frame
    record: dict = field(default_factory=dict)
    max_steps: int | None = None  # the phase stops after this many optimizer steps (a budget's last phase)


@dataclass
class StepResult:
    """What one optimizer step did, for ``Recipe.after_step`` and the stage's ``after_step``."""

    step: int                   # 1-based global optimizer step
    phase: int                  # 1-based
    epoch: int                  # 0-based epoch within the phase
    rows: list[int]             # frame rows of the step, micro-batch after micro-batch
    sample_weights: Tensor      # v per row
    terms: dict[str, float]     # v-weighted means over the step of each per-sample term
    loss: float                 # the step's weighted mean loss
    phase_record: dict
    row_terms: dict[str, Tensor]  # each term per row of this process's micro-batches, in their order


@dataclass
class LoopContext:
    """What the hooks may use: the accelerator, the (unwrapped) model, the data, the progress."""

    accelerator: Any
    model: torch.nn.Module
    wrapper: torch.nn.Module
    optimizer: Any
    tokenizer: Any
    frame: pd.DataFrame
    progress: dict
    total_steps: int | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def state(self) -> dict:
        """The recipe's own JSON-serialisable state, saved and restored with the resume state."""
        return self.progress["recipe"]

    def full_state_dict(self) -> dict[str, Tensor]:
        """The model's whole state dict, gathered from every process (a collective: call it on
        all processes; under FSDP the shards are assembled, under DDP it is each process's copy)."""
        if sharding.is_sharded(self.wrapper):
            wrapped = sharding.full_state_dict(self.wrapper)
        else:
            wrapped = self.accelerator.get_state_dict(self.wrapper)
        return {name.removeprefix("model."): value for name, value in (wrapped or {}).items()}

    def save_model(self, target: Path, state_dict: dict[str, Tensor]) -> None:
        """``save_pretrained`` of the model (or LoRA adapter) with a gathered ``state_dict``, in the
        precision it trained in: bf16 under bf16 autocast (half an fp32 file: 16 GB, not 32, for an
        8B checkpoint; every later stage computes in bf16 on a GPU), else fp32."""
        self.model.save_pretrained(str(target), state_dict=publish_precision(state_dict, self.accelerator.mixed_precision))

    def decide_on_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (see :func:`decide_on_rank0`)."""
        return decide_on_rank0(self.accelerator, value)

    def no_grad(self, compute: Callable[[], Any]) -> Any:
        """Run ``compute`` on the model in eval mode (autocast, no grad), then back to train mode.
        A sharded model's root weights are gathered meanwhile (``sharding.gathered_root``): every
        process must call it at the same point."""
        self.model.eval()
        with self.accelerator.autocast(), torch.no_grad(), sharding.gathered_root(self.wrapper):
            result = compute()
        self.model.train()
        return result


class Recipe:
    """The stage-specific parts of a training run. Override what differs; the defaults are SFT's
    plain weighted mean of each sample's completion NLL over one phase."""

    description = "train"
    total_steps: int | None = None  # when known up front (progress bar, schedules over the run)

    def start(self, ctx: LoopContext) -> None:
        """Once, after a fresh start or a resume (``ctx.state`` is then the saved state)."""

    def next_phase(self, ctx: LoopContext, index: int) -> Phase | None:
        """Phase ``index`` (0-based), or None when training is done."""
        raise NotImplementedError

    def epoch_start(self, ctx: LoopContext, phase: int, epoch: int) -> None:
        """Before the first step of each epoch of each phase (0-based)."""

    def sample_weights(self, ctx: LoopContext, rows: Sequence[int]) -> Tensor:
        """v per row: the split's ``weight`` column."""
        return torch.tensor(ctx.frame["weight"].to_numpy()[list(rows)], dtype=torch.float32)

    def sample_terms(self, ctx: LoopContext, logits: Tensor, batch: Batch, phase: dict) -> dict[str, Tensor]:
        """Per-sample (B,) terms from the student's completion logits; ``loss`` is minimised, the
        others are logged (as v-weighted means)."""
        return {"loss": per_sample_mean_nll(logits, batch)}

    def after_step(self, ctx: LoopContext, result: StepResult) -> dict:
        """After each optimizer step; returns extra fields for the log line."""
        return {}

    def publish(self, ctx: LoopContext, state_dict: dict[str, Tensor]) -> None:
        """Write the stage's outputs (main process only) from ``ctx.progress`` and the model's
        gathered ``state_dict`` (save it with ``ctx.save_model``)."""
        raise NotImplementedError


def planned_steps(n_rows: int, batch_size: int, micro_per_step: int, epochs: float) -> int:
    """Optimizer steps of a phase over ``n_rows`` rows (the count does not depend on the order)."""
    return len(training_plan([1] * n_rows, batch_size, micro_per_step, epochs, seed=0))


def _plan_of(phase: Phase, frame: pd.DataFrame, settings: LoopSettings, micro_per_step: int,
             index: int) -> list[dict]:
    rows = list(range(len(frame))) if phase.rows is None else [int(r) for r in phase.rows]
    lengths = [len(frame["prompt_ids"].iat[r]) + len(frame["completion_ids"].iat[r]) for r in rows]
    plan = training_plan(lengths, settings.batch_size, micro_per_step, phase.epochs,
                         settings.seed * 1000 + index)
    return [{"micro_batches": [[rows[i] for i in micro] for micro in step.micro_batches], "epoch": step.epoch}
            for step in plan]


def epoch_of(epoch_end: float) -> int:
    """0-based epoch of a planned step, from ``PlannedStep.epoch`` (the epoch count at its end)."""
    return max(0, math.ceil(round(epoch_end, 6)) - 1)


def run_training(recipe: Recipe, accelerator, model: torch.nn.Module, tokenizer, frame: pd.DataFrame,
                 settings: LoopSettings, state_dir: Path, fingerprint: str,
                 after_step: Callable[[StepResult], None] | None = None) -> LoopContext:
    """Train ``model`` on ``frame`` by ``recipe``; publish; return the final context.

    ``accelerator`` comes from :func:`make_accelerator` (the stage makes it first, to size its
    plan by the number of processes). ``after_step(result)`` is called after each optimizer step
    once its resume state (if due) is saved; tests use it to watch the run or to simulate a kill.
    """
    from tqdm.auto import tqdm

    from scd_pipeline.math.weighting import step_share

    processes, process = accelerator.num_processes, accelerator.process_index
    micro_per_step = settings.grad_accum * processes
    model.train()
    if settings.gradient_checkpointing:
        enable_activation_checkpointing(model)
    wrapper = CompletionLM(model)
    if sharding.shards_below_accelerate(accelerator):  # accelerate would wrap DDP on CPU processes
        sharding.shard(wrapper)
        optimizer = accelerator.prepare(build_optimizer(wrapper, settings.lr, settings.weight_decay))
    else:
        optimizer = build_optimizer(wrapper, settings.lr, settings.weight_decay)
        wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    if sharding.is_sharded(wrapper):
        units = sharding.check_units(accelerator.unwrap_model(wrapper).model)
        if accelerator.is_main_process:
            tqdm.write(f"{recipe.description}: FSDP: {units} decoder layers sharded over {processes} processes")
    unwrapped = accelerator.unwrap_model(wrapper).model
    log_path = state_dir / LOG_FILE

    saved = read_resume_progress(state_dir)
    if saved is not None and saved["fingerprint"] == fingerprint:
        if accelerator.is_main_process:
            truncate_log(log_path, saved["step"])  # a damaged log stops the run before it resumes
        progress = restore_resume_state(accelerator, state_dir, wrapper, optimizer)
        tqdm.write(f"{recipe.description}: resuming at step {progress['step']} from {state_dir}")
    else:
        if saved is not None:
            tqdm.write(f"{recipe.description}: {state_dir} was saved by a run with other settings or "
                       "data; starting afresh")
        if accelerator.is_main_process:
            shutil.rmtree(state_dir, ignore_errors=True)
            state_dir.mkdir(parents=True, exist_ok=True)
        progress = {"fingerprint": fingerprint, "step": 0, "phases": [], "epoch": None, "recipe": {}}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        truncate_log(log_path, progress["step"])
    ctx = LoopContext(accelerator, unwrapped, wrapper, optimizer, tokenizer, frame, progress, recipe.total_steps)
    recipe.start(ctx)

    resume_every_s = settings.resume_every_minutes * 60
    last_save = time.monotonic()
    window: list[dict[str, float]] = []
    window_start = time.monotonic()
    bar = tqdm(total=recipe.total_steps, initial=progress["step"], desc=recipe.description,
               dynamic_ncols=True, disable=not accelerator.is_local_main_process)

    while True:
        index = len(progress["phases"]) - 1
        phase_record = progress["phases"][index] if index >= 0 else None
        if phase_record is None or progress["step"] == phase_record["last_step"]:  # a new phase
            index += 1
            phase = recipe.next_phase(ctx, index)
            if phase is None:
                break
            plan = _plan_of(phase, frame, settings, micro_per_step, index)[:phase.max_steps]
            phase_record = {"phase": index + 1, **phase.record, "first_step": progress["step"] + 1,
                            "last_step": progress["step"] + len(plan), "epochs": phase.epochs, "plan": plan}
            progress["phases"].append(phase_record)
            if settings.restart_each_phase:
                getattr(optimizer, "optimizer", optimizer).state.clear()  # fresh AdamW moments
        plan = phase_record["plan"]
        local = progress["step"] - phase_record["first_step"] + 1
        planned = plan[local]
        epoch = epoch_of(planned["epoch"])
        if progress["epoch"] != [index, epoch]:
            recipe.epoch_start(ctx, index, epoch)
            progress["epoch"] = [index, epoch]

        lr = settings.lr * lr_factor(settings, local, len(plan), progress["step"], recipe.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_started = time.perf_counter()
        step_rows = [r for micro in planned["micro_batches"] for r in micro]
        weights = recipe.sample_weights(ctx, step_rows)
        by_row = dict(zip(step_rows, weights.tolist(), strict=True))
        step_weight = float(weights.sum())
        mine, share = process_share(planned["micro_batches"], process, processes)
        names: list[str] = []
        sums = None  # [loss share, v-weighted sums of every term..., tokens]
        row_terms: dict[str, list[Tensor]] = {}
        for j, rows in enumerate(mine):
            batch = frame_batch(frame, rows, tokenizer.pad_token_id).to(ctx.device)
            v = torch.tensor([by_row[r] for r in rows], device=ctx.device) * share
            with contextlib.nullcontext() if j == len(mine) - 1 else accelerator.no_sync(wrapper):
                logits = wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask)
                terms = recipe.sample_terms(ctx, logits, batch, phase_record)
                loss = step_share(terms["loss"], v, step_weight)
                accelerator.backward(loss * processes)  # DDP averages gradients over processes
            names = list(terms)
            for term in names:
                row_terms.setdefault(term, []).append(terms[term].detach().cpu())
            values = [loss.detach().double()] + [(v * terms[n].detach()).sum().double() for n in names]
            values.append(batch.attention_mask.sum().double())
            row = torch.stack(values)
            sums = row if sums is None else sums + row
        if settings.max_grad_norm is not None:
            accelerator.clip_grad_norm_(wrapper.parameters(), settings.max_grad_norm)
        if step_weight > 0:  # a step whose samples all weigh 0 carries no signal: no Adam move either
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # One decision for every process whether a resume save is due (the save holds collectives):
        # each process's clock rides on the step's reduction, and any one that is due makes all save.
        due = time.monotonic() - last_save >= resume_every_s
        sums = torch.cat([sums, torch.tensor([float(due)], dtype=sums.dtype, device=sums.device)])
        *totals, due_anywhere = accelerator.reduce(sums, reduction="sum").cpu().tolist()
        if accelerator.is_main_process:  # tokens of every process: the step's rate is the run's
            worklog.add("train", int(totals[-1]), time.perf_counter() - step_started)
        progress["step"] += 1
        progress["tokens"] = progress.get("tokens", 0) + int(totals[-1])  # every process's, the run's budget
        per_weight = 1.0 / step_weight if step_weight > 0 else 0.0
        result = StepResult(progress["step"], index + 1, epoch, step_rows, weights,
                            {n: totals[1 + i] * per_weight for i, n in enumerate(names)}, totals[0],
                            phase_record, {n: torch.cat(values) for n, values in row_terms.items()})
        extra = recipe.after_step(ctx, result)

        window.append({**{k: v for k, v in result.terms.items() if k != "loss"}, "loss": result.loss,
                       "sample_weight": step_weight / len(step_rows), "tokens": totals[-1]})
        tokens_per_s = sum(w["tokens"] for w in window) / max(time.monotonic() - window_start, 1e-9)
        bar.set_postfix(loss=f"{np.mean([w['loss'] for w in window]):.4f}", tok_s=f"{tokens_per_s:.0f}",
                        phase=index + 1)
        bar.update(1)
        phase_end = progress["step"] == phase_record["last_step"]
        if accelerator.is_main_process and (progress["step"] % settings.log_every == 0 or phase_end):
            means = {key: float(np.mean([w[key] for w in window])) for key in window[0] if key != "tokens"}
            append_log(log_path, {"phase": index + 1, "epoch": planned["epoch"], "step": progress["step"],
                                  **means, "lr": lr, **{k: v for k, v in phase_record.items()
                                                        if k in RECORD_LOG_KEYS},
                                  **extra, "tokens_per_s": round(tokens_per_s, 1)})
            window, window_start = [], time.monotonic()
        final = recipe.total_steps is not None and progress["step"] == recipe.total_steps
        if not final and due_anywhere > 0:
            save_resume_state(accelerator, state_dir, progress, wrapper, optimizer)
            last_save = time.monotonic()
        if after_step is not None:
            after_step(result)
    bar.close()

    accelerator.wait_for_everyone()
    state_dict = ctx.full_state_dict()
    if accelerator.is_main_process:
        recipe.publish(ctx, state_dict)
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ctx


# Fields of a phase record that every log line of the phase repeats (e.g. the checkpoint).
RECORD_LOG_KEYS = ("checkpoint", "stage")
