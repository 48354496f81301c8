"""Distillation divergences on a sparse teacher support (top-k ids plus one tail bucket).

The teacher signal comes from the logit cache: for each of N completion tokens, the teacher's
log-probabilities at its top-k token ids and the log of the mass outside them (``SparseTarget``).
Every divergence here works on the same k + 1 buckets:

* teacher: the k cached log-probs and the tail log-mass;
* student: ``log_softmax(student_logits / tau)`` gathered at the k ids, and the student's own
  mass outside those ids, ``logsumexp`` over the non-cached logits. The tail is computed by
  masking the cached ids to -inf rather than as ``log1p(-sum q_k)``: when the student puts almost
  all of its mass on the cached ids, ``1 - sum q_k`` cancels catastrophically in fp32 (any tail
  below ~6e-8 rounds to log(0) = -inf, giving an infinite reverse KL and NaN gradients), while
  the masked logsumexp, taken relative to the largest non-cached logit, stays exact. A small
  autograd function does this in one (N, V) buffer (the same memory as a log-softmax) with a
  one-pass backward.

With k = V there is no tail bucket and every divergence equals its dense formula.

Normalisation and temperature have one owner: :meth:`SparseTarget.buckets`. A cache stores the
teacher's top-k log-probs and tail log-mass at the temperature it was captured at (its sidecar's
``temperature``; the fp16 and int8 encodings round them, so the k + 1 stored masses need not sum to
1). ``buckets(tau)`` renormalises them and re-tempers them from the stored temperature t_c to tau:
p_tau is proportional to p_(t_c)^(t_c / tau), the tail mass m read as spread uniformly over the V - k
ids it stands for, so the bucket's tempered mass is (V - k) * (m / (V - k))^(t_c / tau). With k = V
this is exactly the dense softmax at tau, whatever t_c was (the temperature is never applied twice);
with k < V it is the tempered "uniform tail" reconstruction lumped back into k + 1 buckets. The
losses (teacher side) and the SCD schedule's KLs (``schedules``) both read a target through this one
view. The student side is ``log_softmax(student_logits / tau)``, its own tail exact. No tau**2
factor is applied; the caller scales the loss if it wants Hinton's gradient-magnitude correction.

Every divergence has one signature, ``f(student_logits, target, temperature=1.0, **options)``,
returns a per-token loss of shape (N,), and is listed in ``DIVERGENCES``. ``per_sample_mean``
reduces per-token values to per-sample means; ``Taid`` is the stateful TAID objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scd_pipeline.errors import ConfigError

# Cached log-probs below this are read as exp(-100) (~4e-44) instead of 0 (an fp16 cache turns
# very small probabilities into -inf): reverse-direction divergences stay finite, and the mass
# this adds is negligible next to any probability that matters.
LOG_MASS_FLOOR = -100.0


@dataclass
class SparseTarget:
    """A teacher distribution over N completion tokens, kept at its top-k ids plus a tail bucket.

    ``ids`` (N, k) token ids (converted to long); ``logprobs`` (N, k) teacher log-probs at those
    ids as stored (possibly rounded); ``tail_logmass`` (N,) log of the mass outside the k ids
    (-inf or very negative when k = vocab); ``vocab_size`` V; ``temperature`` the temperature the
    stored values are at. Read them through :meth:`buckets` (normalised, at any temperature).
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    vocab_size: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.ids = self.ids.long()
        if self.ids.dim() != 2 or self.logprobs.shape != self.ids.shape:
            raise ValueError(f"SparseTarget: ids {tuple(self.ids.shape)} and logprobs "
                             f"{tuple(self.logprobs.shape)} must both be (N, k)")
        if self.tail_logmass.shape != self.ids.shape[:1]:
            raise ValueError(f"SparseTarget: tail_logmass {tuple(self.tail_logmass.shape)} must be "
                             f"({self.ids.shape[0]},)")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"SparseTarget: k = {self.k} must be between 1 and vocab_size = "
                             f"{self.vocab_size}")
        _check_temperature(self.temperature)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def has_tail(self) -> bool:
        """True when some vocabulary ids are not cached, i.e. the tail bucket stands for V - k ids."""
        return self.k < self.vocab_size

    def to(self, device: torch.device | str) -> SparseTarget:
        return SparseTarget(self.ids.to(device), self.logprobs.to(device),
                            self.tail_logmass.to(device), self.vocab_size, self.temperature)

    @classmethod
    def from_logits(cls, logits: Tensor, top_k: int, temperature: float = 1.0) -> SparseTarget:
        """Keep the top-k of ``log_softmax(logits / temperature)`` (N, V) and the exact tail log-mass.

        Also accepts log-probs (log_softmax is shift-invariant). Used for online teachers and tests.
        """
        _check_temperature(temperature)
        with torch.no_grad():
            logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
            top_logprobs, top_ids = logprobs.topk(top_k, dim=-1)
            # logsumexp of an all -inf row is -inf: k = V gives an empty tail.
            tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(dim=-1)
        return cls(top_ids, top_logprobs, tail, logits.shape[-1], float(temperature))

    def buckets(self, temperature: float | None = None) -> Tensor:
        """(N, k[+1]) log-probs on the k ids and (when k < V) the tail bucket: renormalised, and
        re-tempered from the stored temperature to ``temperature`` (default: the stored one).

        The one view of a target that every loss and the SCD schedule read (see module doc).
        """
        temperature = self.temperature if temperature is None else temperature
        _check_temperature(temperature)
        exponent = self.temperature / temperature
        scaled = self.logprobs.float().clamp(min=LOG_MASS_FLOOR)
        scaled = scaled * exponent if exponent != 1.0 else scaled
        if self.has_tail:
            log_n_outside = math.log(self.vocab_size - self.k)
            tail = self.tail_logmass.float().clamp(min=LOG_MASS_FLOOR)
            # (V - k) ids, each holding tail / (V - k), each raised to t_c / tau.
            bucket = log_n_outside + (tail - log_n_outside) * exponent
            scaled = torch.cat([scaled, bucket[:, None]], dim=-1)
        return torch.log_softmax(scaled, dim=-1)

    def normalized(self, temperature: float | None = None) -> SparseTarget:
        """The same target with its stored values replaced by :meth:`buckets` (sum exactly 1)."""
        temperature = self.temperature if temperature is None else temperature
        view = self.buckets(temperature)
        tail = view[:, self.k] if self.has_tail else torch.full_like(view[:, 0], float("-inf"))
        return SparseTarget(self.ids, view[:, : self.k], tail, self.vocab_size, temperature)

    def tail_logprob_per_id(self) -> Tensor:
        """(N,) normalised log-prob of each non-cached id, the tail mass spread uniformly over them."""
        if not self.has_tail:
            return torch.full_like(self.tail_logmass, float("-inf"), dtype=torch.float32)
        return self.buckets()[:, self.k] - math.log(self.vocab_size - self.k)

    def dense_logprobs(self, temperature: float | None = None) -> Tensor:
        """(N, V) normalised reconstruction at ``temperature``: the k ids' bucket log-probs at
        their ids, the tail bucket spread uniformly over the other ids."""
        view = self.buckets(temperature)
        if self.has_tail:
            fill = (view[:, self.k] - math.log(self.vocab_size - self.k))[:, None]
        else:
            fill = torch.full_like(view[:, :1], float("-inf"))
        dense = fill.expand(self.num_tokens, self.vocab_size).clone()
        return dense.scatter(-1, self.ids, view[:, : self.k])


def _at_least_fp32(values: Tensor) -> Tensor:
    """fp16 / bf16 logits are computed in fp32; fp64 stays fp64 (used by gradient checks)."""
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def vocabulary_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """The first ``vocab_size`` columns of logits (N, width): the scores of the tokenizer's ids.

    A model's head may have more rows than its tokenizer has ids, padded for fast kernels
    (Qwen2.5-7B: 152,064 rows, Qwen2.5-1.5B: 151,936, one tokenizer of 151,665 ids); those rows
    are no token, and two models of one tokenizer are compared on its ids alone, each
    distribution renormalised over them. A head narrower than ``vocab_size`` cannot score them all.
    """
    width = logits.shape[-1]
    if width < vocab_size:
        raise ValueError(f"logits of width {width} cannot score the vocabulary's {vocab_size} ids")
    return logits if width == vocab_size else logits[..., :vocab_size]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class _StudentProjection(torch.autograd.Function):
    """Student log-probs at the cached ids and in the tail bucket, in a few passes over (N, V).

    Forward: mask the cached ids to -inf in one scaled copy of the logits, take the log-sum-exp of
    the rest relative to its own max (T, exact however small the tail is), and combine it with
    the k cached logits into the full normaliser L = logaddexp(T, logsumexp(z_ids)). Backward, with
    G the summed upstream gradient of the k id outputs and g_t that of the tail output: an outside
    id v gets exp(z_v - T) (g_t - (G + g_t) q_tail), a cached id j gets g_j - (G + g_t) q_j, both
    divided by tau.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
        logits = _at_least_fp32(logits)
        masked = logits / temperature if temperature != 1.0 else logits.clone()
        at_ids = masked.gather(-1, ids)
        masked.scatter_(-1, ids, float("-inf"))
        outside_max = masked.amax(dim=-1, keepdim=True)
        outside_max = torch.where(torch.isfinite(outside_max), outside_max,
                                  torch.zeros_like(outside_max))
        outside_exp = masked.sub_(outside_max).exp_()  # exp(z_v - max) off the support, 0 on it
        outside_sum = outside_exp.sum(dim=-1, keepdim=True)
        log_outside = outside_max + outside_sum.log()
        log_norm = torch.logaddexp(log_outside, at_ids.logsumexp(dim=-1, keepdim=True))
        buckets = torch.cat([at_ids - log_norm, log_outside - log_norm], dim=-1)
        ctx.save_for_backward(outside_exp, outside_sum, buckets, ids)
        ctx.temperature = temperature
        return buckets

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        outside_exp, outside_sum, buckets, ids = ctx.saved_tensors
        probs = buckets.exp()
        grad_total = grad.sum(dim=-1, keepdim=True)
        grad_tail = grad[:, -1:]
        # exp(z_v - T) = outside_exp / outside_sum; a row without tail mass gets no tail gradient.
        inverse_sum = torch.where(outside_sum > 0, 1.0 / outside_sum, torch.zeros_like(outside_sum))
        row_scale = inverse_sum * (grad_tail - grad_total * probs[:, -1:]) / ctx.temperature
        grad_logits = outside_exp * row_scale
        grad_ids = (grad[:, :-1] - grad_total * probs[:, :-1]) / ctx.temperature
        return grad_logits.scatter_(-1, ids, grad_ids), None, None


def _student_buckets(student_logits: Tensor, target: SparseTarget, temperature: float) -> Tensor:
    """(N, k[+1]) student log-probs at the cached ids and, when k < V, its tail bucket."""
    if not target.has_tail:
        scaled = _at_least_fp32(student_logits) / temperature
        return torch.log_softmax(scaled, dim=-1).gather(-1, target.ids)
    return _StudentProjection.apply(student_logits, target.ids, temperature)


def project_on_support(student_logits: Tensor, target: SparseTarget,
                       temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs on the k cached ids plus the tail bucket (when k < V).

    Returns ``(log_p, log_q)``, each (N, k + 1), or (N, k) when k = V.
    """
    _check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape != (target.num_tokens, target.vocab_size):
        raise ValueError(f"student logits {tuple(student_logits.shape)} do not match the teacher "
                         f"target ({target.num_tokens} tokens, vocab {target.vocab_size})")
    return target.buckets(temperature), _student_buckets(student_logits, target, temperature)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row-wise KL(a || b) from log-probs; buckets where a = 0 contribute 0."""
    present = torch.isfinite(log_a)
    safe_log_a = torch.where(present, log_a, torch.zeros_like(log_a))
    terms = torch.where(present, safe_log_a.exp() * (safe_log_a - log_b), torch.zeros_like(log_a))
    return terms.sum(dim=-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), from log-probs."""
    if not 0.0 <= weight_a <= 1.0:
        raise ValueError(f"mixing weight must be in [0, 1], got {weight_a}")
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
    """KL(p || q) = sum p log(p / q): mass-covering."""
    log_p, log_q = project_on_support(student_logits, target, temperature)
    return _kl(log_p, log_q)


def reverse_kl(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
    """KL(q || p) = sum q log(q / p): mode-seeking."""
    log_p, log_q = project_on_support(student_logits, target, temperature)
    return _kl(log_q, log_p)


def skew_forward_kl(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0,
                    alpha: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM): KL(p || alpha p + (1 - alpha) q)."""
    log_p, log_q = project_on_support(student_logits, target, temperature)
    return _kl(log_p, _mix(log_p, log_q, alpha))


def skew_reverse_kl(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0,
                    alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1 - alpha) p)."""
    log_p, log_q = project_on_support(student_logits, target, temperature)
    return _kl(log_q, _mix(log_q, log_p, alpha))


def generalized_jsd(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0,
                    beta: float = 0.5) -> Tensor:
    """Generalised JSD of GKD, in TRL's convention.

    With m = beta p + (1 - beta) q: JSD = beta KL(p || m) + (1 - beta) KL(q || m). The formula
    itself tends to 0 at both ends, so, as TRL's GKDTrainer does, beta = 0 is special-cased as
    forward KL(p || q) and beta = 1 as reverse KL(q || p).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    log_p, log_q = project_on_support(student_logits, target, temperature)
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def total_variation(student_logits: Tensor, target: SparseTarget,
                    temperature: float = 1.0) -> Tensor:
    """TV(p, q) = 0.5 sum |p - q|."""
    log_p, log_q = project_on_support(student_logits, target, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


def _head_mask(teacher_probs: Tensor, head_mass: float) -> Tensor:
    """Ids in the teacher's head: in descending order, those whose cumulative mass is <= head_mass.

    The most likely id is always in the head (as in the AKL reference code).
    """
    sorted_probs, order = teacher_probs.sort(dim=-1, descending=True)
    in_head = sorted_probs.cumsum(dim=-1) <= head_mass
    in_head[:, 0] = True
    return torch.zeros_like(in_head).scatter(-1, order, in_head)


def akl(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0,
        head_mass: float = 0.5) -> Tensor:
    """Adaptive KL (Wu et al. 2024, arXiv 2404.02657): g_head/(g) FKL + g_tail/(g) RKL.

    Head = teacher ids up to cumulative mass ``head_mass`` (mu); g_head and g_tail are the summed
    gaps |p - q| over head and tail; the weights carry no gradient, as in the reference code. The
    tail bucket always counts as tail: it stands for ids below every cached id, so it is outside
    the head whenever the head ends inside the top-k (always true for k = V).
    """
    log_p, log_q = project_on_support(student_logits, target, temperature)
    probs_p = log_p.exp()
    head = _head_mask(probs_p[:, : target.k], head_mass)
    if target.has_tail:
        head = torch.cat([head, torch.zeros_like(head[:, :1])], dim=-1)
    gap = (probs_p - log_q.detach().exp()).abs()
    head_gap = (gap * head).sum(dim=-1)
    tail_gap = (gap * ~head).sum(dim=-1)
    # p == q gives 0 / 0; both KLs are 0 then, so any finite weight will do.
    total_gap = (head_gap + tail_gap).clamp(min=torch.finfo(gap.dtype).tiny)
    return (head_gap / total_gap) * _kl(log_p, log_q) + (tail_gap / total_gap) * _kl(log_q, log_p)


Divergence = Callable[..., Tensor]

DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "akl": akl,
}


def get_divergence(name: str) -> Divergence:
    """The divergence registered under ``name``, with a one-line error listing the choices."""
    if name not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def per_sample_mean(token_values: Tensor, token_sample: Tensor,
                    num_samples: int | None = None) -> Tensor:
    """Mean of per-token values (N,) over each sample's completion tokens: (B,).

    ``token_sample`` (N,) gives each token's sample (batch row). A sample without tokens gets 0.
    """
    if num_samples is None:
        num_samples = int(token_sample.max()) + 1 if token_sample.numel() else 0
    sums = torch.zeros(num_samples, dtype=token_values.dtype, device=token_values.device)
    sums = sums.index_add(0, token_sample, token_values)
    counts = torch.bincount(token_sample, minlength=num_samples).clamp(min=1)
    return sums / counts.to(token_values.dtype)


def taid_divergence(student_logits: Tensor, target: SparseTarget, temperature: float = 1.0,
                    t: float = 0.4) -> Tensor:
    """TAID loss KL(p_t || q) with p_t = softmax((1 - t) stopgrad(z_S) + t z_T) on the buckets.

    z_S, z_T are the student and teacher bucket log-probs (log-probs differ from logits by a
    per-token constant, which the softmax removes). On the tail bucket this is the same as
    interpolating each non-cached id with both sides spread uniformly over the bucket: the
    log(V - k) terms cancel. With k = V it is the dense TAID target.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"TAID: t must be in [0, 1], got {t}")
    log_p, log_q = project_on_support(student_logits, target, temperature)
    log_target = torch.log_softmax((1.0 - t) * log_q.detach() + t * log_p, dim=-1)
    return _kl(log_target, log_q)


class Taid:
    """TAID (Shing et al. 2025, arXiv 2501.16937): an interpolated target whose t grows adaptively.

    Call ``loss`` for the per-token loss at the current t, then ``update`` once per optimizer
    step with that step's (scalar) loss. ``update`` follows the official code: the relative loss
    drop delta = (prev - cur) / (prev + 1e-15) feeds a momentum m <- beta m + (1 - beta) delta,
    and t <- min(t_end, max(t_linear(step), t + alpha sigmoid(m) (1 - t))), with
    t_linear(step) = t_start + (t_end - t_start) step / total_steps. ``step`` counts optimizer
    steps completed (1 .. total_steps), so t = t_end after the last one. On the first call there
    is no previous loss: the official code only records it; here the linear floor is still applied
    (so a one-step run also ends at t_end), the momentum is left unchanged.
    """

    STATE_KEYS = ("t", "momentum", "prev_loss", "step")

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99) -> None:
        if not 0.0 <= t_start < 1.0 or not t_start <= t_end <= 1.0:
            raise ValueError(f"TAID: need 0 <= t_start < 1 and t_start <= t_end <= 1, got "
                             f"t_start={t_start}, t_end={t_end}")
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"TAID: need alpha in [0, 1] and beta in [0, 1), got alpha={alpha}, "
                             f"beta={beta}")
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t = t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None
        self.step = 0

    def loss(self, student_logits: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
        """Per-token TAID loss (N,) at the current t."""
        return taid_divergence(student_logits, target, temperature, t=self.t)

    def t_linear(self, step: int, total_steps: int) -> float:
        progress = min(max(step / total_steps, 0.0), 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss: float | Tensor, step: int, total_steps: int) -> float:
        """Advance t after an optimizer step; returns the new t (never lower than the old one)."""
        if total_steps < 1:
            raise ValueError(f"TAID: total_steps must be >= 1, got {total_steps}")
        current = float(loss)
        floor = self.t_linear(step, total_steps)
        if self.prev_loss is None:
            self.t = min(self.t_end, max(floor, self.t))
        else:
            delta = (self.prev_loss - current) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            adaptive = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(floor, self.t + adaptive))
        self.prev_loss = current
        self.step = step
        return self.t

    def state_dict(self) -> dict[str, Any]:
        """Plain (JSON-serialisable) state: t, momentum, previous loss and step."""
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss,
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in self.STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"TAID state lacks {', '.join(missing)}; it was not written by Taid")
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.step = int(state["step"])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
