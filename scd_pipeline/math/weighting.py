"""Per-sample weights and how a sample's CE and KD losses are combined (SPEC 4.2, 4.4).

All functions take per-sample tensors (B,) and return per-sample tensors, except
``step_share`` / ``weighted_mean``, which reduce a batch to the scalar the optimizer sees.
"""

from __future__ import annotations

import torch
from torch import Tensor

OBJECTIVES = ("convex", "additive")


def adaptive_weight(student_sft_nll: Tensor, teacher_nll: Tensor) -> Tensor:
    """AW = L_S / (L_S + L_T), computed as sigmoid(log L_S - log L_T).

    ``student_sft_nll`` is the gold NLL of the fixed SFT student, ``teacher_nll`` that of the
    checkpoint chosen for the phase. The ratio is the same for per-sample sums and means (both
    share the sample's token count), as long as both sides use the same one. AW > 0.5 where the
    teacher's NLL is lower (teacher-favoured samples). Zeros are clamped to the smallest positive
    float, so AW -> 0 when only L_S is 0, -> 1 when only L_T is 0, and 0.5 when both are.
    """
    if student_sft_nll.shape != teacher_nll.shape:
        raise ValueError(f"adaptive_weight: NLL shapes differ ({tuple(student_sft_nll.shape)} vs "
                         f"{tuple(teacher_nll.shape)})")
    for name, nll in (("student_sft_nll", student_sft_nll), ("teacher_nll", teacher_nll)):
        if bool(torch.isnan(nll).any()) or bool((nll < 0).any()):
            raise ValueError(f"adaptive_weight: {name} must be >= 0 (a negative log-likelihood)")
    student = student_sft_nll.double()
    teacher = teacher_nll.double()
    tiny = torch.finfo(torch.float64).tiny
    weight = torch.sigmoid(student.clamp(min=tiny).log() - teacher.clamp(min=tiny).log())
    return weight.to(student_sft_nll.dtype if student_sft_nll.is_floating_point() else torch.float32)


def paced_weight(pass_rate: Tensor, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """PACED weight w(p) = p^alpha (1 - p)^beta for pass rates p in [0, 1].

    Peaks at p = alpha / (alpha + beta): samples the student sometimes gets right. With alpha,
    beta > 0 it is 0 for always-solved (p = 1) and never-solved (p = 0) samples.
    """
    if bool(((pass_rate < 0) | (pass_rate > 1) | torch.isnan(pass_rate)).any()):
        raise ValueError("paced_weight: pass rates must lie in [0, 1]")
    if alpha < 0 or beta < 0:
        raise ValueError(f"paced_weight: alpha and beta must be >= 0, got {alpha}, {beta}")
    return pass_rate.pow(alpha) * (1.0 - pass_rate).pow(beta)


def combine(ce: Tensor, kd: Tensor, weight: Tensor | float, objective: str = "convex") -> Tensor:
    """Per-sample objective from CE, KD and a weight w (AW per sample, or a constant lambda).

    "convex": (1 - w) CE + w KD (the default); "additive": CE + w KD.
    """
    if objective == "convex":
        return (1.0 - weight) * ce + weight * kd
    if objective == "additive":
        return ce + weight * kd
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def step_share(losses: Tensor, weights: Tensor, step_weight: float) -> Tensor:
    """One micro-batch's share sum(w L) / step_weight of a step's weighted mean loss.

    ``step_weight`` is sum(w) over every sample of the optimizer step (all micro-batches, all
    processes), so the shares add up to the step's sum(w L) / sum(w). The one zero-weight rule:
    when every weight of the step is 0 (e.g. PACED on samples the student always or never solves)
    the step carries no signal and the share is exactly 0, still attached to the graph so
    backward() works.
    """
    if losses.shape != weights.shape:
        raise ValueError(f"step_share: losses {tuple(losses.shape)} and weights "
                         f"{tuple(weights.shape)} differ in shape")
    if bool((weights < 0).any()):
        raise ValueError("step_share: weights must be >= 0")
    weighted_sum = (weights * losses).sum()
    return weighted_sum if step_weight == 0.0 else weighted_sum / step_weight


def weighted_mean(losses: Tensor, weights: Tensor) -> Tensor:
    """Batch loss sum(w L) / sum(w): the :func:`step_share` of a batch that is a whole step."""
    return step_share(losses, weights, float(weights.sum()))
