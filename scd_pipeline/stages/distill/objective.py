"""What a distillation optimises, phase by phase and sample by sample: which teacher checkpoint a
phase reads (the fixed schedules, SCD's probe KL, CD's logit average) and each sample's loss terms."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from scd_pipeline.engine.batching import Batch
from scd_pipeline.engine.logit_cache import LogitCache
from scd_pipeline.engine.methods import Method
from scd_pipeline.engine.scoring import forward_batches
from scd_pipeline.engine.training import (
    per_sample_mean_nll,
)
from scd_pipeline.math.losses import (
    SparseTarget,
    Taid,
    get_divergence,
    per_sample_mean,
    vocabulary_logits,
)
from scd_pipeline.math.schedules import (
    cd_schedule,
    mean_token_kl,
    student_cache_kl,
    td_schedule,
)
from scd_pipeline.math.weighting import combine

AVERAGE = "average"  # the "checkpoint" of a phase that distils from the logit average of all
# Divergence keyword -> distill config key, per divergence that takes options.
DIVERGENCE_OPTIONS = {"skew_forward_kl": {"alpha": "skew_alpha"}, "skew_reverse_kl": {"alpha": "skew_alpha"},
                      "generalized_jsd": {"beta": "jsd_beta"}, "akl": {"head_mass": "akl_head_mass"}}


# --------------------------------------------------------------------------- schedules


def phase_count(distill: Mapping[str, Any], n_checkpoints: int) -> int:
    """N: ``distill.phases``, or one phase per teacher checkpoint."""
    return int(distill["phases"]) if distill["phases"] is not None else n_checkpoints


def fixed_schedule(method: Method, n_phases: int, checkpoints: Sequence[int], best_index: int,
                   cd_mode: str = "sequential") -> list[int | str] | None:
    """Checkpoint per phase for the schedules that do not look at the student; None for SCD
    (chosen at each phase start). CD ``average`` distils from the logit average in every phase."""
    if method.schedule in ("td", "taid"):
        return list(td_schedule(n_phases, best_index))
    if method.schedule == "cd":
        return [AVERAGE] * n_phases if cd_mode == AVERAGE else list(cd_schedule(n_phases, checkpoints))
    return None


def checkpoints_needed(checkpoints: Sequence[int], schedule: Sequence[int | str] | None) -> list[int]:
    """Which checkpoints' caches the run reads: the scheduled ones, or all for SCD / CD average."""
    if schedule is None or AVERAGE in schedule:
        return sorted(checkpoints)
    return sorted({int(k) for k in schedule})


def student_to_checkpoint_kl(model, probe: pd.DataFrame, caches: Mapping[int, LogitCache],
                             batch_size: int, pad_id: int) -> dict[int, float]:
    """KL(S || c) for every cached checkpoint c: one no-grad student forward over the probe
    samples, mean over their completion tokens (``schedules.student_cache_kl``)."""
    chunks: dict[int, list[Tensor]] = {index: [] for index in caches}
    for batch, logits in forward_batches(model, probe, batch_size, pad_id):
        sample_ids = probe["sample_id"].to_numpy()[batch.index].tolist()
        lengths = torch.bincount(batch.token_sample, minlength=batch.num_samples).tolist()
        for index, cache in caches.items():
            chunks[index].append(student_cache_kl(vocabulary_logits(logits, cache.vocab_size),
                                                  cache.targets(sample_ids, lengths, logits.device)))
    return {index: mean_token_kl(values) for index, values in sorted(chunks.items())}


def average_target(targets: Sequence[SparseTarget], top_k: int) -> SparseTarget:
    """CD ``average``: the logit average of several checkpoints, cut to its top-k plus the tail.

    Each cache is read as its normalised uniform-tail reconstruction at temperature 1
    (``SparseTarget.dense_logprobs``); the mean of their log-probs is a logit average (per-token
    constants vanish in the softmax). With k = V it is exactly ``log_softmax(mean_c log p_c)``.
    Builds (N, V) tensors for the batch's completion tokens only.
    """
    if not targets:
        raise ValueError("average_target: no checkpoints to average")
    total = targets[0].dense_logprobs(1.0)
    for target in targets[1:]:
        total = total + target.dense_logprobs(1.0)
    return SparseTarget.from_logits(total / len(targets), top_k)


# --------------------------------------------------------------------------- losses


@dataclass
class LossTerms:
    """Per-sample values (B,): the objective ``loss`` and its ``ce`` and ``kd`` parts."""

    loss: Tensor
    ce: Tensor
    kd: Tensor


def sample_losses(student_logits: Tensor, batch: Batch, target: SparseTarget, kd_weight: Tensor | float,
                  divergence: Callable[[Tensor, SparseTarget], Tensor], objective: str = "convex") -> LossTerms:
    """L = (1 - w) CE + w KD (``convex``) or CE + w KD (``additive``) per sample.

    ``student_logits`` (N, width >= V) at the batch's completion positions, scored on the
    target's V ids (``losses.vocabulary_logits``); ``divergence(logits, target)`` returns per-token
    values (temperature and options already bound, see :func:`divergence_for`).
    """
    student_logits = vocabulary_logits(student_logits, target.vocab_size)
    ce = per_sample_mean_nll(student_logits, batch)
    kd = per_sample_mean(divergence(student_logits, target), batch.token_sample, batch.num_samples)
    return LossTerms(combine(ce, kd, kd_weight, objective), ce, kd)


def taid_sample_losses(student_logits: Tensor, batch: Batch, target: SparseTarget, taid: Taid,
                       temperature: float = 1.0) -> LossTerms:
    """TAID: L = mean over the sample's tokens of KL(p_t || q); no CE term (CE kept for the log)."""
    student_logits = vocabulary_logits(student_logits, target.vocab_size)
    kd = per_sample_mean(taid.loss(student_logits, target, temperature), batch.token_sample,
                         batch.num_samples)
    with torch.no_grad():
        ce = per_sample_mean_nll(student_logits, batch)
    return LossTerms(kd, ce, kd)


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
