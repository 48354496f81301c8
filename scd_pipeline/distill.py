"""Distillation from cached teacher logits: ``scd-pipeline distill --method M`` (SPEC 4.1-4.4).

One loop for every method; what differs between methods is three small decisions it asks for:

- which teacher checkpoint a phase distils from (:func:`fixed_schedule`; SCD chooses at the start
  of each phase with :func:`scd_phase_choice`),
- which weight w mixes CE and KD in a sample's loss (:func:`batch_kd_weights`: lambda, or AW),
- which weight a sample's loss gets in the batch (:func:`batch_sample_weights`: the split's
  ``weight`` column, times the PACED weight when enabled).

Methods (``--method``): ``td`` (T* every phase), ``cd`` (checkpoint k in phase k), ``scd``
(argmin_c KL(T* || c) + KL(S_k || c) at each phase start), ``scd_aw`` (= ``scd+aw``), ``taid``
(T* every phase, TAID's interpolated target, no CE). A suffix ``+aw`` / ``+paced`` (or
``--weighting``) adds Adaptive Weighting / PACED to any method where it makes sense.

Training runs in N phases (``distill.phases``, default one per teacher checkpoint) of E epochs
(``distill.epochs_per_phase``); AdamW's moments and the cosine-with-warm-up LR schedule restart
at every phase. The teacher signal comes only from the caches ``logits/ckpt-{k}.parquet``: no
teacher forward ever runs here. The student's LM head runs at completion positions only.

Per sample x (CE = mean gold NLL over its completion tokens, KD = mean of the configured
divergence over them, both from the same student forward; temperature ``distill.temperature``
on both sides of KD):

- ``convex``: L = (1 - w) CE + w KD; ``additive``: L = CE + w KD;
- w = ``distill.kd_weight`` (lambda), or with AW w = L_S^SFT(x) / (L_S^SFT(x) + L_c*(x)): the fixed
  SFT student's per-sample mean gold NLL (``subdomains.parquet``, column ``student_sft_nll``) and
  the phase checkpoint's (its cache's ``nll_mean``), both per-sample means at temperature 1;
- TAID: L = mean over tokens of KL(p_t || q), t updated after every optimizer step over the whole
  run's steps; its state is saved with the resume state and as ``taid_state.json``.

Batch loss: sum_x v(x) L(x) / sum_x v(x) over all samples of an optimizer step, v = the split's
``weight`` times, with PACED, p^alpha (1 - p)^beta. PACED's pass rate p is the current student's
probability of the gold answer, re-estimated with one no-grad pass at the start of every epoch:
for ``choice`` samples the probability of the gold letter token at the first completion position
(the exact pass rate of one sampled answer scored by its first token); for ``list`` samples
exp(-sum NLL) of the whole gold completion, i.e. the probability of sampling exactly the gold
list. (The PACED paper scores K = 8 sampled answers with the task metric; the gold-completion
probability is an exact, sampling-free, but stricter stand-in: partially right lists count 0.)
With ``distill.paced.two_stage`` the divergence is forward KL for the first half of all
optimizer steps and reverse KL for the second half.

Outputs: ``students/{name}/`` (model and tokenizer, ``train_log.jsonl``, ``schedule.json``,
``distill.config.yaml``, ``taid_state.json`` for TAID), published atomically at the end. Resume
state lives in ``.state/distill-{name}/``, outside the declared outputs (see docs/ARTIFACTS.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from scd_pipeline.batching import Batch, frame_batch, read_split
from scd_pipeline.cache import (
    LogitCache,
    best_checkpoint_index,
    cache_path,
    open_task_cache,
    read_checkpoints,
    score_batches,
)
from scd_pipeline.config import task_dir, write_effective_config
from scd_pipeline.errors import ConfigError, DataError, ModelError
from scd_pipeline.io import atomic_dir, sha256_file, sha256_text, write_json
from scd_pipeline.losses import SparseTarget, Taid, get_divergence, per_sample_mean
from scd_pipeline.schedules import (
    cache_kl,
    cd_schedule,
    mean_token_kl,
    scd_choose,
    student_cache_kl,
    td_schedule,
)
from scd_pipeline.subdomains import probe_sample_ids
from scd_pipeline.training import (
    CompletionLM,
    append_log,
    build_optimizer,
    cosine_warmup_factor,
    make_accelerator,
    model_identity,
    per_sample_mean_nll,
    process_share,
    read_resume_progress,
    restore_resume_state,
    save_resume_state,
    seed_everything,
    training_plan,
    truncate_log,
    warmup_steps_for,
)
from scd_pipeline.weighting import adaptive_weight, combine, paced_weight

BASE_METHODS = ("td", "cd", "scd", "scd_aw", "taid")
WEIGHTINGS = ("none", "aw", "paced")
LOG_FILE = "train_log.jsonl"
SCHEDULE_FILE = "schedule.json"
TAID_STATE_FILE = "taid_state.json"
AVERAGE = "average"  # the "checkpoint" of a phase that distils from the logit average of all
# Divergence keyword -> distill config key, per divergence that takes options.
DIVERGENCE_OPTIONS = {"skew_forward_kl": {"alpha": "skew_alpha"}, "skew_reverse_kl": {"alpha": "skew_alpha"},
                      "generalized_jsd": {"beta": "jsd_beta"}, "akl": {"head_mass": "akl_head_mass"}}
SCD_KL_DEFINITION = (
    "token-level forward KL, mean over all completion tokens of the probe samples; KL(T* || c) "
    "between the caches' uniform-tail reconstructions (schedules.cache_kl), KL(S_k || c) from the "
    "student at the phase start, dense, to c's reconstruction (schedules.student_cache_kl)")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A distillation method: a checkpoint schedule plus optional per-sample weightings."""

    schedule: str    # td | cd | scd | taid
    adaptive: bool   # AW: w = L_S^SFT / (L_S^SFT + L_c*) instead of lambda
    paced: bool      # PACED: per-sample weight p^alpha (1 - p)^beta on the loss

    @property
    def label(self) -> str:
        """Canonical name, e.g. ``scd_aw``, ``td+paced``, ``cd+aw+paced``."""
        if self.schedule == "scd" and self.adaptive:
            base, suffixes = "scd_aw", []
        else:
            base, suffixes = self.schedule, ["aw"] if self.adaptive else []
        return "+".join([base, *suffixes, *(["paced"] if self.paced else [])])


def parse_method(method: str, weighting: str | None = None) -> Method:
    """``td``, ``cd``, ``scd``, ``scd_aw``, ``taid``, optionally with ``+aw`` / ``+paced`` suffixes,
    plus ``--weighting none|aw|paced``. One-line ConfigError on anything else or on conflicts."""
    base, *suffixes = method.strip().split("+")
    if base not in BASE_METHODS:
        raise ConfigError(f"--method {method!r}: unknown method {base!r}; choose one of "
                          f"{', '.join(BASE_METHODS)} (optionally +aw / +paced)")
    bad = [s for s in suffixes if s not in ("aw", "paced")]
    if bad or len(set(suffixes)) != len(suffixes):
        raise ConfigError(f"--method {method!r}: suffixes must be +aw and/or +paced, each once")
    if weighting is not None and weighting not in WEIGHTINGS:
        raise ConfigError(f"--weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    adaptive = base == "scd_aw" or "aw" in suffixes or weighting == "aw"
    paced = "paced" in suffixes or weighting == "paced"
    if weighting == "none" and (adaptive or paced):
        raise ConfigError(f"--weighting none contradicts --method {method!r}, which weights samples")
    schedule = "scd" if base == "scd_aw" else base
    if schedule == "taid" and adaptive:
        raise ConfigError(f"--method {method!r}: TAID has no CE/KD mix for AW to weight; use taid or "
                          "taid+paced")
    return Method(schedule, adaptive, paced)


def default_name(method: str, weighting: str | None = None) -> str:
    """Output name when ``--name`` is not given: the method string, or, when a ``--weighting``
    other than none is added, the canonical label (``--method td --weighting paced`` -> ``td+paced``)."""
    if weighting in (None, "none"):
        return method
    return parse_method(method, weighting).label


# --------------------------------------------------------------------------- schedules


def phase_count(distill: Mapping[str, Any], n_checkpoints: int) -> int:
    """N: ``distill.phases``, or one phase per teacher checkpoint."""
    return int(distill["phases"]) if distill["phases"] is not None else n_checkpoints


def fixed_schedule(method: Method, n_phases: int, checkpoint_indices: Sequence[int], best_index: int,
                   cd_mode: str = "sequential") -> list[int | str] | None:
    """Checkpoint per phase for the schedules that do not look at the student; None for SCD
    (chosen at each phase start). CD ``average`` distils from the logit average in every phase."""
    if method.schedule in ("td", "taid"):
        return list(td_schedule(n_phases, best_index))
    if method.schedule == "cd":
        if cd_mode == AVERAGE:
            return [AVERAGE] * n_phases
        return list(cd_schedule(n_phases, checkpoint_indices))
    return None


def checkpoints_needed(checkpoint_indices: Sequence[int], schedule: Sequence[int | str] | None) -> list[int]:
    """Which checkpoints' caches the run reads: the scheduled ones, or all for SCD / CD average."""
    if schedule is None or AVERAGE in schedule:
        return sorted(checkpoint_indices)
    return sorted({int(k) for k in schedule})


def best_to_checkpoint_kl(caches: Mapping[int, LogitCache], best_index: int,
                          probe_ids: Sequence[str]) -> dict[int, float]:
    """KL(T* || c) for every cached checkpoint c: mean over the probe completion tokens."""
    best = caches[best_index].targets(probe_ids)
    return {index: mean_token_kl([cache_kl(best, cache.targets(probe_ids))])
            for index, cache in sorted(caches.items())}


def student_to_checkpoint_kl(model, probe: pd.DataFrame, caches: Mapping[int, LogitCache],
                             temperature: float, batch_size: int, pad_id: int) -> dict[int, float]:
    """KL(S || c) for every cached checkpoint c: one no-grad student forward over the probe
    samples, mean over their completion tokens. ``temperature`` is the caches' temperature."""
    chunks: dict[int, list[Tensor]] = {index: [] for index in caches}
    for scored in score_batches(model, probe, batch_size, pad_id):
        sample_ids = probe["sample_id"].to_numpy()[scored.batch.index].tolist()
        lengths = scored.n_tokens.tolist()
        for index, cache in caches.items():
            target = cache.targets(sample_ids, lengths, scored.logits.device)
            chunks[index].append(student_cache_kl(scored.logits, target, temperature))
    return {index: mean_token_kl(values) for index, values in sorted(chunks.items())}


def scd_phase_choice(kl_best_to_c: Mapping[int, float],
                     kl_student_to_c: Mapping[int, float]) -> dict[str, Any]:
    """The ``schedule.json`` record of an SCD phase: the argmin checkpoint and every candidate's terms."""
    chosen, candidates = scd_choose(kl_best_to_c, kl_student_to_c)
    return {"checkpoint": chosen, "candidates": candidates}


def average_target(targets: Sequence[SparseTarget], top_k: int) -> SparseTarget:
    """CD ``average``: the logit average of several checkpoints, cut to its top-k plus the tail.

    Each cache is read as its uniform-tail reconstruction (``SparseTarget.dense_logprobs``); the
    mean of their log-probs is a logit average (per-token constants vanish in the softmax). With
    k = V it is exactly ``log_softmax(mean_c log p_c)``. Builds (N, V) tensors for the batch's
    completion tokens only.
    """
    if not targets:
        raise ValueError("average_target: no checkpoints to average")
    total = targets[0].dense_logprobs()
    for target in targets[1:]:
        total = total + target.dense_logprobs()
    return SparseTarget.from_logits(total / len(targets), top_k)


# --------------------------------------------------------------------------- weights and losses


def batch_kd_weights(method: Method, kd_weight: float, student_sft_nll: Tensor | None = None,
                     teacher_nll: Tensor | None = None, num_samples: int | None = None) -> Tensor:
    """w per sample of a batch: AW = L_S^SFT / (L_S^SFT + L_c*) when adaptive, else lambda.

    ``student_sft_nll`` and ``teacher_nll`` (B,) are the batch's per-sample mean gold NLLs of the
    fixed SFT student and of the phase checkpoint c*.
    """
    if method.adaptive:
        if student_sft_nll is None or teacher_nll is None:
            raise ValueError("batch_kd_weights: AW needs the SFT student's and the checkpoint's NLL")
        return adaptive_weight(student_sft_nll.float(), teacher_nll.float())
    if num_samples is None:
        raise ValueError("batch_kd_weights: give num_samples for a constant weight")
    return torch.full((num_samples,), float(kd_weight))


def batch_sample_weights(data_weight: Tensor, pass_rate: Tensor | None = None, alpha: float = 1.0,
                         beta: float = 1.0) -> Tensor:
    """v per sample: the split's ``weight`` column times, with PACED, p^alpha (1 - p)^beta."""
    if pass_rate is None:
        return data_weight.float()
    return data_weight.float() * paced_weight(pass_rate.float(), alpha, beta)


def gold_pass_rate(gold_logprob: Tensor, n_tokens: Tensor, is_choice: Tensor) -> Tensor:
    """PACED pass rate per sample from per-token gold log-probs (N,) (samples in order).

    ``choice``: exp of the first completion token's log-prob (the gold letter); ``list``:
    exp of the summed log-probs of the whole gold completion.
    """
    starts = torch.cumsum(n_tokens, 0) - n_tokens
    sample_of_token = torch.repeat_interleave(torch.arange(len(n_tokens), device=n_tokens.device), n_tokens)
    totals = torch.zeros(len(n_tokens), dtype=gold_logprob.dtype, device=gold_logprob.device)
    totals = totals.index_add(0, sample_of_token, gold_logprob)
    return torch.where(is_choice, gold_logprob[starts], totals).exp().clamp(0.0, 1.0)


def pass_rates(model, frame: pd.DataFrame, batch_size: int, pad_id: int) -> np.ndarray:
    """PACED pass rate of every row of ``frame`` under ``model`` (one no-grad pass), in row order."""
    rates = np.zeros(len(frame), dtype=np.float64)
    kinds = frame["kind"].to_numpy()
    for scored in score_batches(model, frame, batch_size, pad_id):
        logits = scored.logits
        gold = torch.log_softmax(logits, -1).gather(1, scored.batch.target_ids[:, None]).squeeze(1)
        is_choice = torch.tensor([kinds[r] == "choice" for r in scored.batch.index], device=logits.device)
        rates[scored.batch.index] = gold_pass_rate(gold, scored.n_tokens, is_choice).double().cpu().numpy()
    return rates


@dataclass
class LossTerms:
    """Per-sample values (B,): the objective ``loss`` and its ``ce`` and ``kd`` parts."""

    loss: Tensor
    ce: Tensor
    kd: Tensor


def sample_losses(student_logits: Tensor, batch: Batch, target: SparseTarget, kd_weight: Tensor | float,
                  divergence: Callable[[Tensor, SparseTarget], Tensor], objective: str = "convex") -> LossTerms:
    """L = (1 - w) CE + w KD (``convex``) or CE + w KD (``additive``) per sample.

    ``student_logits`` (N, V) at the batch's completion positions; ``divergence(logits, target)``
    returns per-token values (temperature and options already bound, see :func:`divergence_for`).
    """
    ce = per_sample_mean_nll(student_logits, batch)
    kd = per_sample_mean(divergence(student_logits, target), batch.token_sample, batch.num_samples)
    return LossTerms(combine(ce, kd, kd_weight, objective), ce, kd)


def taid_sample_losses(student_logits: Tensor, batch: Batch, target: SparseTarget, taid: Taid,
                       temperature: float = 1.0) -> LossTerms:
    """TAID: L = mean over the sample's tokens of KL(p_t || q); no CE term (CE kept for the log)."""
    kd = per_sample_mean(taid.loss(student_logits, target, temperature), batch.token_sample,
                         batch.num_samples)
    with torch.no_grad():
        ce = per_sample_mean_nll(student_logits, batch)
    return LossTerms(kd, ce, kd)


def step_loss(losses: Tensor, weights: Tensor, step_weight: float) -> Tensor:
    """A micro-batch's share of the step loss sum(v L) / sum(v) over the whole optimizer step.

    ``step_weight`` is sum(v) over every sample of the step, so summing the shares of its
    micro-batches gives ``weighting.weighted_mean`` of the step (0, with a graph, when it is 0).
    """
    weighted = (weights * losses).sum()
    return weighted if step_weight == 0.0 else weighted / step_weight


def divergence_name_at(configured: str, two_stage: bool, step: int, total_steps: int) -> str:
    """The divergence of optimizer step ``step`` (0-based): PACED two-stage uses forward KL for the
    first half of all steps and reverse KL for the second; otherwise the configured one."""
    if not two_stage:
        return configured
    return "forward_kl" if step < total_steps / 2 else "reverse_kl"


def divergence_for(distill: Mapping[str, Any], name: str) -> Callable[[Tensor, SparseTarget], Tensor]:
    """``losses.DIVERGENCES[name]`` with ``distill.temperature`` and its options bound."""
    options = {argument: distill[key] for argument, key in DIVERGENCE_OPTIONS.get(name, {}).items()}
    return functools.partial(get_divergence(name), temperature=distill["temperature"], **options)


# --------------------------------------------------------------------------- optimizer restarts


def phase_lr_factor(step: int, phase_starts: Sequence[int], phase_lengths: Sequence[int],
                    warmup_ratio: float) -> float:
    """LR multiplier after ``step`` global optimizer steps: cosine with warm-up, restarted per phase."""
    phase = max(0, bisect_right(list(phase_starts), step) - 1)
    local, length = step - phase_starts[phase], phase_lengths[phase]
    return cosine_warmup_factor(local, length, warmup_steps_for(length, warmup_ratio))


def restart_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Forget AdamW's moments and step counts: the next step is that of a freshly built AdamW.

    (One optimizer object for the whole run keeps accelerate's save/load state simple.)
    """
    getattr(optimizer, "optimizer", optimizer).state.clear()


def epoch_of(epoch_end: float) -> int:
    """0-based epoch of a planned step, from ``PlannedStep.epoch`` (the epoch count at its end)."""
    return max(0, math.ceil(round(epoch_end, 6)) - 1)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DistillPaths:
    data: Path          # results/{task}/data
    teacher: Path       # results/{task}/teacher
    init: Path          # results/models/student_base or results/{task}/student_sft
    subdomains: Path    # results/{task}/subdomains.parquet (AW's L_S^SFT)
    output: Path        # results/{task}/students/{name}
    state: Path         # results/{task}/.state/distill-{name}


def distill_paths(config: dict, name: str) -> DistillPaths:
    """Where a distillation run named ``name`` reads and writes."""
    segments = name.split("/") if name else []
    if not segments or "\\" in name or any(not part or part.startswith(".") for part in segments):
        raise ConfigError(f"--name {name!r}: must be a folder name or '/'-separated folder names "
                          "(e.g. td/seed-1), none empty or starting with '.'")
    root = task_dir(config)
    init = (Path(config["results_dir"]) / "models" / "student_base" if config["distill"]["init"] == "base"
            else root / "student_sft")
    return DistillPaths(data=root / "data", teacher=root / "teacher", init=init,
                        subdomains=root / "subdomains.parquet", output=root / "students" / name,
                        state=root / ".state" / f"distill-{name.replace('/', '--')}")


def _check_init(paths: DistillPaths, init: str) -> None:
    if not any((paths.init / name).is_file() for name in ("config.json", "adapter_config.json")):
        command = ("scd-pipeline prepare-model --role student" if init == "base"
                   else "scd-pipeline sft --role student")
        raise ModelError(f"{paths.init}: initial student (distill.init {init}) not found (run `{command}` first)")


def require_caches(config: dict, indices: Sequence[int]) -> None:
    """Refuse, before any model is loaded, a missing teacher checkpoint or cache, naming the command."""
    root = task_dir(config)
    checkpoints = {int(e["index"]): e for e in read_checkpoints(root / "teacher")["checkpoints"]}
    for index in indices:
        checkpoint_dir = root / "teacher" / checkpoints[index]["path"]
        if not checkpoint_dir.is_dir():
            raise DataError(f"{checkpoint_dir}: teacher checkpoint not found (run `scd-pipeline sft "
                            "--role teacher`, then cache-logits)")
        if not cache_path(root, index).is_file():
            raise DataError(f"{cache_path(root, index)}: teacher-logit cache not found (run "
                            f"`scd-pipeline cache-logits --checkpoint {index}`)")


def check_cache_covers(cache: LogitCache, frame: pd.DataFrame) -> None:
    """Every training sample is cached with as many completion tokens as it has (else stale)."""
    counts = cache.token_counts(frame["sample_id"].tolist())
    lengths = frame["completion_ids"].map(len).to_numpy()
    if not np.array_equal(counts, lengths):
        bad = int(np.flatnonzero(counts != lengths)[0])
        raise DataError(f"{cache.path}: sample {frame['sample_id'].iat[bad]} has {counts[bad]} cached "
                        f"completion tokens but {lengths[bad]} in the split; re-run `scd-pipeline "
                        f"cache-logits --checkpoint {cache.meta['checkpoint']['index']}`")


def per_row(values: pd.Series, frame: pd.DataFrame, what: str) -> np.ndarray:
    """``values`` (indexed by sample_id) in the row order of ``frame``."""
    missing = ~frame["sample_id"].isin(values.index)
    if missing.any():
        raise DataError(f"{what}: no value for sample {frame['sample_id'][missing].iat[0]} of the "
                        "split; re-run it on the current data")
    return values.loc[frame["sample_id"]].to_numpy(np.float64)


def student_sft_nll_by_row(subdomains_path: Path, frame: pd.DataFrame) -> np.ndarray:
    """L_S^SFT per training row: ``subdomains.parquet`` column ``student_sft_nll`` (per-sample mean)."""
    table = pd.read_parquet(subdomains_path, columns=["sample_id", "student_sft_nll"])
    return per_row(table.set_index("sample_id")["student_sft_nll"], frame, str(subdomains_path))


def teacher_nll_by_row(cache: LogitCache, frame: pd.DataFrame) -> np.ndarray:
    """L_c per training row: the cache's ``nll_mean`` (per-sample mean, as ``student_sft_nll``)."""
    return per_row(cache.stats().set_index("sample_id")["nll_mean"], frame, str(cache.path))


# --------------------------------------------------------------------------- the loop


@dataclass
class StepInfo:
    """What one optimizer step used, passed to ``run_distill``'s ``after_step`` (tests, hooks)."""

    step: int                    # 1-based global optimizer step
    phase: int                   # 1-based
    epoch: int                   # 0-based epoch within the phase
    checkpoint: int | str        # teacher checkpoint (or "average")
    divergence: str
    rows: list[int]              # training rows of the step, micro-batch after micro-batch
    kd_weights: Tensor           # w per row
    sample_weights: Tensor       # v per row
    loss: float
    t: float | None              # TAID's t after the step


def _fingerprint(config: dict, method: Method, paths: DistillPaths, caches: Mapping[int, LogitCache],
                 processes: int, split_file: Path) -> str:
    """Hash of everything that determines the run's result; resume state must match it."""
    distill = {k: v for k, v in config["distill"].items() if k not in ("log_every", "resume_every_minutes",
                                                                          "methods")}
    payload = {"method": method.label, "seed": config["seed"], "task": config["task"], "distill": distill,
               "cache_temperature": config["cache"]["temperature"], "processes": processes,
               "caches": {k: c.meta["uid"] for k, c in caches.items()}, "init": model_identity(paths.init),
               "train": sha256_file(split_file),
               "subdomains": sha256_file(paths.subdomains) if method.adaptive else None}
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def run_distill(config: dict, method: str, weighting: str | None = None, name: str | None = None,
                after_step: Callable[[StepInfo], None] | None = None) -> Path:
    """Distil the initial student from the cached teacher checkpoints; return ``students/{name}``.

    ``after_step(info)`` is called after each optimizer step (and its resume state, if due).
    """
    from tqdm.auto import tqdm

    from scd_pipeline.evaluate import check_data_tokenizer
    from scd_pipeline.models import load_model

    settings = config["distill"]
    spec = parse_method(method, weighting)
    name = name or default_name(method, weighting)
    paths = distill_paths(config, name)
    split_file = paths.data / f"{config['cache']['split']}.parquet"
    train = read_split(split_file)
    if (train["weight"] <= 0).all():
        raise DataError(f"{split_file}: column weight is 0 for every row; nothing to train on")
    checkpoint_record = read_checkpoints(paths.teacher)
    indices = sorted(int(e["index"]) for e in checkpoint_record["checkpoints"])
    best = best_checkpoint_index(checkpoint_record)
    n_phases = phase_count(settings, len(indices))
    schedule = fixed_schedule(spec, n_phases, indices, best, settings["cd_mode"])
    if spec.adaptive and schedule is not None and AVERAGE in schedule:
        raise ConfigError("distill.cd_mode average has no single checkpoint NLL for AW; use cd_mode "
                          "sequential or drop +aw")
    if spec.paced and settings["paced"]["two_stage"] and spec.schedule == "taid":
        raise ConfigError("distill.paced.two_stage switches the KD divergence, but TAID has its own "
                          "objective; set it to false for taid")
    _check_init(paths, settings["init"])
    needed = checkpoints_needed(indices, schedule)
    require_caches(config, needed)
    if spec.adaptive and not paths.subdomains.is_file():
        raise DataError(f"{paths.subdomains}: not found; AW needs the SFT student's NLL (run "
                        "`scd-pipeline estimate-subdomains` first)")

    accelerator = make_accelerator(settings["precision"])
    seed_everything(config["seed"])
    model, tokenizer = load_model(paths.init, dtype="float32", device="cpu")
    check_data_tokenizer(paths.data, tokenizer, paths.init)
    caches = {index: open_task_cache(config, index, tokenizer) for index in needed}  # verified
    for cache in caches.values():
        check_cache_covers(cache, train)
    top_k = min(cache.k for cache in caches.values())
    sft_nll = student_sft_nll_by_row(paths.subdomains, train) if spec.adaptive else None
    teacher_nll = {k: teacher_nll_by_row(c, train) for k, c in caches.items()} if spec.adaptive else {}
    probe = None
    if spec.schedule == "scd":
        probe_ids = probe_sample_ids(train["sample_id"], config["subdomains"]["probe_size"], config["seed"])
        probe = train.set_index("sample_id", drop=False).loc[probe_ids].reset_index(drop=True)

    processes, process = accelerator.num_processes, accelerator.process_index
    lengths = [len(p) + len(c) for p, c in zip(train["prompt_ids"], train["completion_ids"], strict=True)]
    plans = [training_plan(lengths, settings["batch_size"], settings["grad_accum"] * processes,
                           settings["epochs_per_phase"], config["seed"] * 1000 + phase)
             for phase in range(n_phases)]
    phase_lengths = [len(plan) for plan in plans]
    phase_starts = [sum(phase_lengths[:j]) for j in range(n_phases)]
    total_steps = sum(phase_lengths)

    model.train()
    wrapper = CompletionLM(model)
    optimizer = build_optimizer(wrapper, settings["lr"], settings["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: phase_lr_factor(step, phase_starts, phase_lengths, settings["warmup_ratio"]))
    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(wrapper).model
    taid = (Taid(settings["taid"]["t_start"], settings["taid"]["t_end"], settings["taid"]["step_size"],
                 settings["taid"]["momentum"]) if spec.schedule == "taid" else None)

    fingerprint = _fingerprint(config, spec, paths, caches, processes, split_file)
    log_path = paths.state / LOG_FILE
    saved = read_resume_progress(paths.state)
    if saved is not None and saved["fingerprint"] == fingerprint:
        progress = restore_resume_state(accelerator, paths.state)
        tqdm.write(f"distill {name}: resuming at step {progress['step']}/{total_steps} from {paths.state}")
    else:
        if saved is not None:
            tqdm.write(f"distill {name}: {paths.state} was saved by a run with other settings or data; "
                       "starting afresh")
        if accelerator.is_main_process:
            shutil.rmtree(paths.state, ignore_errors=True)
            paths.state.mkdir(parents=True, exist_ok=True)
        progress = {"fingerprint": fingerprint, "step": 0, "total_steps": total_steps, "phases": [],
                    "kl_best_to_c": None, "pass_rates": None, "pass_rates_epoch": None, "taid": None}
    if taid is not None and progress["taid"] is not None:
        taid.load_state_dict(progress["taid"])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        truncate_log(log_path, progress["step"])

    pad_id = tokenizer.pad_token_id
    device = accelerator.device
    data_weight = torch.tensor(train["weight"].to_numpy(np.float32))
    sample_ids = train["sample_id"].to_numpy()
    no_grad_batch = config["cache"]["batch_size"]
    resume_every_s = settings["resume_every_minutes"] * 60
    last_save = time.monotonic()
    window: list[dict[str, float]] = []
    window_start = time.monotonic()
    bar = tqdm(total=total_steps, initial=progress["step"], desc=f"distill {name}", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)

    def no_grad_pass(compute: Callable[[], Any]) -> Any:
        unwrapped.eval()
        with accelerator.autocast():
            result = compute()
        unwrapped.train()
        return result

    def kd_weights_of(rows: Sequence[int], checkpoint: int | str) -> Tensor:
        rows = list(rows)
        return batch_kd_weights(spec, settings["kd_weight"],
                                torch.from_numpy(sft_nll[rows]) if spec.adaptive else None,
                                torch.from_numpy(teacher_nll[checkpoint][rows]) if spec.adaptive else None,
                                num_samples=len(rows))

    def target_of(rows: Sequence[int], checkpoint: int | str) -> SparseTarget:
        ids = sample_ids[list(rows)].tolist()
        counts = [len(train["completion_ids"].iat[r]) for r in rows]
        if checkpoint == AVERAGE:
            return average_target([c.targets(ids, counts, device) for c in caches.values()], top_k)
        return caches[checkpoint].targets(ids, counts, device)

    for step_index in range(progress["step"], total_steps):
        phase = bisect_right(phase_starts, step_index) - 1
        local = step_index - phase_starts[phase]
        planned = plans[phase][local]
        if local == 0:
            restart_optimizer(optimizer)
        if len(progress["phases"]) == phase:  # phase start: which checkpoint it distils from
            record: dict[str, Any] = {"phase": phase + 1, "first_step": step_index + 1,
                                      "last_step": step_index + phase_lengths[phase]}
            if schedule is not None:
                record["checkpoint"] = schedule[phase]
            else:
                if progress["kl_best_to_c"] is None:  # KL(T* || c) once, from the caches
                    kl_best = best_to_checkpoint_kl(caches, best, probe["sample_id"].tolist())
                    progress["kl_best_to_c"] = {str(k): v for k, v in kl_best.items()}
                kl_student = no_grad_pass(lambda: student_to_checkpoint_kl(
                    unwrapped, probe, caches, config["cache"]["temperature"], no_grad_batch, pad_id))
                record.update(scd_phase_choice({int(k): v for k, v in progress["kl_best_to_c"].items()},
                                               kl_student))
            progress["phases"].append(record)
        checkpoint = progress["phases"][phase]["checkpoint"]
        epoch = epoch_of(planned.epoch)
        if spec.paced and progress["pass_rates_epoch"] != [phase, epoch]:  # once per epoch
            rates = no_grad_pass(lambda: pass_rates(unwrapped, train, no_grad_batch, pad_id))
            progress["pass_rates"], progress["pass_rates_epoch"] = rates.tolist(), [phase, epoch]
        divergence_name = ("taid" if taid is not None else
                           divergence_name_at(settings["divergence"], spec.paced and settings["paced"]["two_stage"],
                                              step_index, total_steps))
        divergence = divergence_for(settings, divergence_name) if taid is None else None
        rate = torch.tensor(progress["pass_rates"]) if spec.paced else None
        weights_v = batch_sample_weights(data_weight, rate, settings["paced"]["alpha"], settings["paced"]["beta"])
        step_rows = [r for rows in planned.micro_batches for r in rows]
        step_weight = float(weights_v[step_rows].sum())

        # Each micro-batch adds sum(v L) / step_weight: the step's gradient is that of its weighted mean.
        mine, share = process_share(planned.micro_batches, process, processes)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # step loss, sum v*ce, v*kd, v*w, tokens
        for j, rows in enumerate(mine):
            batch = frame_batch(train, rows, pad_id).to(device)
            target = target_of(rows, checkpoint)
            kd_w = kd_weights_of(rows, checkpoint).to(device)
            v = weights_v[rows].to(device) * share
            with contextlib.nullcontext() if j == len(mine) - 1 else accelerator.no_sync(wrapper):
                logits = wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask)
                if taid is not None:
                    terms = taid_sample_losses(logits, batch, target, taid, settings["temperature"])
                else:
                    terms = sample_losses(logits, batch, target, kd_w, divergence, settings["objective"])
                loss = step_loss(terms.loss, v, step_weight)
                accelerator.backward(loss * processes)  # DDP averages gradients over processes
            sums += torch.stack([loss.detach().double(), (v * terms.ce).sum().detach().double(),
                                 (v * terms.kd).sum().detach().double(), (v * kd_w).sum().double(),
                                 batch.attention_mask.sum().double()])
        if settings["max_grad_norm"] is not None:
            accelerator.clip_grad_norm_(wrapper.parameters(), settings["max_grad_norm"])
        lr = scheduler.get_last_lr()[0]  # the rate of this update
        if step_weight > 0:  # a step whose samples all weigh 0 carries no signal: no Adam move either
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals = accelerator.reduce(sums, reduction="sum").cpu().tolist()
        step = step_index + 1
        if taid is not None:
            taid.update(totals[0], step, total_steps)
            progress["taid"] = taid.state_dict()
        progress["step"] = step

        per_weight = 1.0 / step_weight if step_weight > 0 else 0.0
        window.append({"loss": totals[0], "ce": totals[1] * per_weight, "kd": totals[2] * per_weight,
                       "kd_weight": totals[3] * per_weight if taid is None else None,
                       "sample_weight": step_weight / len(step_rows), "tokens": totals[4]})
        tokens_per_s = sum(w["tokens"] for w in window) / max(time.monotonic() - window_start, 1e-9)
        bar.set_postfix(loss=f"{np.mean([w['loss'] for w in window]):.4f}", tok_s=f"{tokens_per_s:.0f}",
                        phase=phase + 1)
        bar.update(1)
        phase_end = local == phase_lengths[phase] - 1
        if accelerator.is_main_process and (step % settings["log_every"] == 0 or phase_end):
            means = {key: (None if window[0][key] is None else float(np.mean([w[key] for w in window])))
                     for key in ("loss", "ce", "kd", "kd_weight", "sample_weight")}
            append_log(log_path, {"phase": phase + 1, "epoch": planned.epoch, "step": step, **means,
                                  "lr": lr, "checkpoint": checkpoint,
                                  "divergence": divergence_name, "t": taid.t if taid is not None else None,
                                  "tokens_per_s": round(tokens_per_s, 1)})
            window, window_start = [], time.monotonic()
        if step < total_steps and (phase_end or time.monotonic() - last_save >= resume_every_s):
            save_resume_state(accelerator, paths.state, progress)
            last_save = time.monotonic()
        if after_step is not None:
            after_step(StepInfo(step, phase + 1, epoch, checkpoint, divergence_name, step_rows,
                                kd_weights_of(step_rows, checkpoint), weights_v[step_rows], totals[0],
                                taid.t if taid is not None else None))
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(config, spec, name, paths, unwrapped, tokenizer, progress, taid, indices, best, probe)
    accelerator.wait_for_everyone()
    return paths.output


def schedule_record(config: dict, method: Method, name: str, progress: dict, indices: Sequence[int],
                    best: int, probe: pd.DataFrame | None) -> dict:
    """The content of ``schedule.json`` (format in docs/ARTIFACTS.md)."""
    record: dict[str, Any] = {
        "method": method.label, "name": name, "schedule": method.schedule,
        "adaptive_weight": method.adaptive, "paced": method.paced,
        "cd_mode": config["distill"]["cd_mode"] if method.schedule == "cd" else None,
        "best_index": best, "checkpoints": list(indices), "n_phases": len(progress["phases"]),
        "epochs_per_phase": config["distill"]["epochs_per_phase"], "total_steps": progress["total_steps"],
        "phases": progress["phases"],
    }
    if method.schedule == "scd":
        record["probe"] = {"size": len(probe), "seed": config["seed"],
                           "sample_ids": probe["sample_id"].tolist()}
        record["kl_definition"] = SCD_KL_DEFINITION
        record["kl_best_to_c"] = progress["kl_best_to_c"]
    return record


def _publish(config: dict, method: Method, name: str, paths: DistillPaths, model, tokenizer, progress: dict,
             taid: Taid | None, indices: Sequence[int], best: int, probe: pd.DataFrame | None) -> None:
    """Write ``students/{name}/`` in one atomic step, then drop the resume state."""
    with atomic_dir(paths.output) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy2(paths.state / LOG_FILE, tmp / LOG_FILE)
        write_json(tmp / SCHEDULE_FILE, schedule_record(config, method, name, progress, indices, best, probe))
        if taid is not None:
            write_json(tmp / TAID_STATE_FILE, {**taid.state_dict(), "t_start": taid.t_start, "t_end": taid.t_end,
                                               "momentum_beta": taid.beta, "step_size": taid.alpha,
                                               "total_steps": progress["total_steps"]})
        write_effective_config(config, tmp, "distill")
    shutil.rmtree(paths.state)
