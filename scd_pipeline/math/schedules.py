"""Which teacher checkpoint each student phase distils from (SPEC 4.1, 4.3).

* TD: the best checkpoint T* in every phase.
* CD: checkpoints in training order, checkpoint k in phase k.
* SCD: at the start of each phase, c* = argmin_c [KL(T* || c) + KL(S_k || c)] (``scd_choose``),
  with both KLs measured on a fixed probe set from the logit caches.

Sparse KLs. A cache keeps each token's top-k ids and one tail mass. Throughout this module a
cache is read through the losses' one view of a target, ``SparseTarget.buckets``: renormalised
(fp16 and int8 rounding leave the stored k + 1 masses off 1 by up to ~5%) and at temperature 1
(the cache's own temperature undone), standing for the full distribution in which the tail mass is
spread uniformly over the V - k ids it does not list (``SparseTarget.dense_logprobs``). KL(a || b)
between two caches is the exact KL between those two reconstructions, computed on the union of
their cached ids plus one bucket for the ids neither lists (both are uniform there, so lumping that
bucket loses nothing). KL(S || c) is the exact KL from the dense student (temperature 1) to c's
reconstruction. Both are therefore >= 0, and equal the dense KL when k = V.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from scd_pipeline.math.losses import SparseTarget

CACHE_KL_DEFINITION = ("token-level forward KL(a || b) between the caches' renormalised uniform-tail "
                       "reconstructions at temperature 1 (schedules.cache_kl), mean over all completion "
                       "tokens of the probe samples")
STUDENT_KL_DEFINITION = ("token-level forward KL(S_k || c) from the dense student at the phase start to c's "
                         "renormalised uniform-tail reconstruction, both at temperature 1 "
                         "(schedules.student_cache_kl), mean over all completion tokens of the probe samples")


def td_schedule(n_phases: int, best_index: int) -> list[int]:
    """TD: the best checkpoint in every phase."""
    _check_phases(n_phases)
    return [best_index] * n_phases


def cd_schedule(n_phases: int, checkpoint_indices: Sequence[int]) -> list[int]:
    """CD: checkpoints in training (index) order, one per phase.

    When the counts differ, the sorted checkpoint list is cut into ``n_phases`` equal slices and
    phase j uses the last checkpoint of slice j: the schedule never goes backwards, always ends on
    the final checkpoint, and repeats checkpoints (more phases) or skips early ones (fewer
    phases) evenly. E.g. 4 phases over [1, 2] -> [1, 1, 2, 2]; 2 phases over 1..8 -> [4, 8].
    """
    _check_phases(n_phases)
    ordered = sorted(checkpoint_indices)
    if not ordered:
        raise ValueError("cd_schedule: no teacher checkpoints to distil from")
    n_checkpoints = len(ordered)
    # ceil((j + 1) * C / P) - 1 in integers.
    return [ordered[((j + 1) * n_checkpoints + n_phases - 1) // n_phases - 1]
            for j in range(n_phases)]


def scd_choose(kl_best_to_c: Mapping[int, float],
               kl_student_to_c: Mapping[int, float]) -> tuple[int, list[dict[str, Any]]]:
    """SCD choice c* = argmin_c [KL(T* || c) + KL(S || c)]; exact ties go to the later checkpoint.

    Returns the chosen index and, per checkpoint in index order, a record
    ``{"checkpoint", "kl_best_to_c", "kl_student_to_c", "sum"}`` for ``schedule.json``.
    """
    if set(kl_best_to_c) != set(kl_student_to_c):
        raise ValueError(f"scd_choose: checkpoints differ between KL(T*||c) {sorted(kl_best_to_c)} "
                         f"and KL(S||c) {sorted(kl_student_to_c)}")
    if not kl_best_to_c:
        raise ValueError("scd_choose: no checkpoints to choose from")
    records = []
    for index in sorted(kl_best_to_c):
        best_term, student_term = float(kl_best_to_c[index]), float(kl_student_to_c[index])
        if math.isnan(best_term) or math.isnan(student_term):
            raise ValueError(f"scd_choose: KL for checkpoint {index} is NaN")
        records.append({"checkpoint": index, "kl_best_to_c": best_term,
                        "kl_student_to_c": student_term, "sum": best_term + student_term})
    # Records are in ascending index order, so "<=" lets a later checkpoint win a tie.
    chosen = records[0]
    for record in records[1:]:
        if record["sum"] <= chosen["sum"]:
            chosen = record
    return chosen["checkpoint"], records


def _check_phases(n_phases: int) -> None:
    if n_phases < 1:
        raise ValueError(f"need at least one phase, got {n_phases}")


def _lookup(ids: Tensor, cache: SparseTarget) -> tuple[Tensor, Tensor]:
    """For ids (N, m): a normalised cache's log-prob at each (uniform tail value if not cached)
    and a found mask."""
    sorted_ids, order = cache.ids.sort(dim=-1)
    sorted_logprobs = cache.logprobs.gather(-1, order)
    position = torch.searchsorted(sorted_ids, ids).clamp(max=cache.k - 1)
    found = sorted_ids.gather(-1, position) == ids
    tail = cache.tail_logprob_per_id()[:, None].expand_as(ids)
    return torch.where(found, sorted_logprobs.gather(-1, position), tail), found


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a log(a / b); 0 where a = 0."""
    present = torch.isfinite(log_a)
    safe_log_a = torch.where(present, log_a, torch.zeros_like(log_a))
    return torch.where(present, safe_log_a.exp() * (safe_log_a - log_b), torch.zeros_like(log_a))


def cache_kl(first: SparseTarget, second: SparseTarget) -> Tensor:
    """Per-token KL(first || second) (N,) between two caches of the same tokens (see module doc)."""
    if first.num_tokens != second.num_tokens or first.vocab_size != second.vocab_size:
        raise ValueError(f"cache_kl: caches cover different tokens or vocabularies "
                         f"({first.num_tokens} tokens / V={first.vocab_size} vs "
                         f"{second.num_tokens} / V={second.vocab_size})")
    vocab = first.vocab_size
    first, second = first.normalized(1.0), second.normalized(1.0)
    # Ids that `first` caches.
    first_at_own = first.logprobs
    second_at_first, _ = _lookup(first.ids, second)
    total = _kl_terms(first_at_own, second_at_first).sum(dim=-1)
    # Ids that only `second` caches: `first` holds its uniform tail value there.
    first_at_second, second_in_first = _lookup(second.ids, first)
    only_second = ~second_in_first
    terms = _kl_terms(first_at_second, second.logprobs)
    total = total + torch.where(only_second, terms, torch.zeros_like(terms)).sum(dim=-1)
    # Ids neither caches: one bucket of r ids, uniform under both reconstructions.
    remaining = vocab - first.k - only_second.sum(dim=-1)
    has_rest = remaining > 0
    log_r = torch.where(has_rest, remaining, torch.ones_like(remaining)).double().log().float()
    first_rest = torch.where(has_rest, first.tail_logprob_per_id() + log_r,
                             torch.full_like(log_r, float("-inf")))
    second_rest = second.tail_logprob_per_id() + log_r
    return total + _kl_terms(first_rest, second_rest)


def student_cache_kl(student_logits: Tensor, cache: SparseTarget) -> Tensor:
    """Per-token KL(S || c) (N,): the dense student against the cache's normalised uniform-tail
    reconstruction, both at temperature 1."""
    if student_logits.shape != (cache.num_tokens, cache.vocab_size):
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not match the cache "
                         f"({cache.num_tokens} tokens, vocab {cache.vocab_size})")
    log_student = torch.log_softmax(student_logits.float(), dim=-1)
    return _kl_terms(log_student, cache.dense_logprobs(1.0)).sum(dim=-1)


def mean_token_kl(token_kls: Iterable[Tensor]) -> float:
    """Mean over all probe completion tokens of per-token KLs given in chunks (batches)."""
    total, count = 0.0, 0
    for chunk in token_kls:
        total += float(chunk.double().sum())
        count += chunk.numel()
    if count == 0:
        raise ValueError("mean_token_kl: the probe set has no completion tokens")
    return total / count
