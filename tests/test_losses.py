"""Divergences on the sparse (top-k + tail) support, checked against dense formulas and by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scd_pipeline.errors import ConfigError
from scd_pipeline.math.losses import (
    DIVERGENCES,
    SparseTarget,
    Taid,
    get_divergence,
    per_sample_mean,
    project_on_support,
    taid_divergence,
    vocabulary_logits,
)

TEMPERATURES = (1.0, 2.0)


# --- dense references: full-vocabulary formulas, written independently of the module ----------

def dense_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def dense_akl(p: torch.Tensor, q: torch.Tensor, head_mass: float = 0.5) -> torch.Tensor:
    out = []
    for p_row, q_row in zip(p, q, strict=True):
        order = sorted(range(len(p_row)), key=lambda i: -float(p_row[i]))
        head, cumulative = set(), 0.0
        for rank, i in enumerate(order):
            cumulative += float(p_row[i])
            if rank == 0 or cumulative <= head_mass:
                head.add(i)
        gaps = (p_row - q_row).abs()
        g_head = sum(float(gaps[i]) for i in head)
        g_tail = float(gaps.sum()) - g_head
        forward = float(dense_kl(p_row, q_row))
        reverse = float(dense_kl(q_row, p_row))
        out.append((g_head * forward + g_tail * reverse) / (g_head + g_tail))
    return torch.tensor(out)


DENSE = {
    "forward_kl": lambda p, q: dense_kl(p, q),
    "reverse_kl": lambda p, q: dense_kl(q, p),
    "skew_forward_kl": lambda p, q: dense_kl(p, 0.1 * p + 0.9 * q),
    "skew_reverse_kl": lambda p, q: dense_kl(q, 0.1 * q + 0.9 * p),
    "generalized_jsd": lambda p, q: 0.5 * dense_kl(p, (p + q) / 2) + 0.5 * dense_kl(q, (p + q) / 2),
    "total_variation": lambda p, q: 0.5 * (p - q).abs().sum(-1),
    "akl": dense_akl,
}


def random_logits(seed: int, tokens: int = 6, vocab: int = 13, scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(tokens, vocab, generator=generator) * scale
    student = torch.randn(tokens, vocab, generator=generator) * scale
    return teacher, student


def test_registry_names_every_divergence_once():
    assert set(DIVERGENCES) == set(DENSE)
    assert get_divergence("akl") is DIVERGENCES["akl"]
    with pytest.raises(ConfigError, match="unknown divergence 'kl'.*forward_kl"):
        get_divergence("kl")


# --- k = V: every divergence is its dense formula ---------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("seed,vocab", [(0, 7), (1, 13), (2, 50)])
def test_full_support_equals_dense_formula(name, temperature, seed, vocab):
    teacher_logits, student_logits = random_logits(seed, vocab=vocab)
    target = SparseTarget.from_logits(teacher_logits, top_k=vocab)
    p = torch.softmax(teacher_logits / temperature, -1)
    q = torch.softmax(student_logits / temperature, -1)
    got = DIVERGENCES[name](student_logits, target, temperature)
    assert got.shape == (teacher_logits.shape[0],)
    torch.testing.assert_close(got, DENSE[name](p, q).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.9, 1.0])
def test_generalized_jsd_follows_trl_convention(beta):
    teacher_logits, student_logits = random_logits(3)
    target = SparseTarget.from_logits(teacher_logits, top_k=teacher_logits.shape[1])
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    if beta == 0.0:
        expected = dense_kl(p, q)  # forward KL, special-cased
    elif beta == 1.0:
        expected = dense_kl(q, p)  # reverse KL, special-cased
    else:
        mixture = beta * p + (1 - beta) * q
        expected = beta * dense_kl(p, mixture) + (1 - beta) * dense_kl(q, mixture)
    got = DIVERGENCES["generalized_jsd"](student_logits, target, beta=beta)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- a 3-token vocabulary by hand ---------------------------------------------------------------
# teacher p = (1/2, 1/4, 1/4), student q = (1/4, 1/8, 5/8); logits = log-probs.

P = torch.tensor([[0.5, 0.25, 0.25]])
Q = torch.tensor([[0.25, 0.125, 0.625]])
LN = math.log

HAND = {
    # 1/2 ln(1/2 / 1/4) + 1/4 ln(1/4 / 1/8) + 1/4 ln(1/4 / 5/8) = 3/4 ln2 + 1/4 ln(2/5)
    "forward_kl": 0.75 * LN(2) + 0.25 * LN(0.4),
    # 1/4 ln(1/2) + 1/8 ln(1/2) + 5/8 ln(5/2) = -3/8 ln2 + 5/8 ln(5/2)
    "reverse_kl": -0.375 * LN(2) + 0.625 * LN(2.5),
    # m = 0.1 p + 0.9 q = (0.275, 0.1375, 0.5875); KL(p || m)
    "skew_forward_kl": 0.5 * LN(0.5 / 0.275) + 0.25 * LN(0.25 / 0.1375) + 0.25 * LN(0.25 / 0.5875),
    # m = 0.1 q + 0.9 p = (0.475, 0.2375, 0.2875); KL(q || m)
    "skew_reverse_kl": 0.25 * LN(0.25 / 0.475) + 0.125 * LN(0.125 / 0.2375)
    + 0.625 * LN(0.625 / 0.2875),
    # m = (p + q) / 2 = (3/8, 3/16, 7/16)
    # KL(p||m) = 1/2 ln(4/3) + 1/4 ln(4/3) + 1/4 ln(4/7); KL(q||m) = 3/8 ln(2/3) + 5/8 ln(10/7)
    "generalized_jsd": 0.5 * (0.75 * LN(4 / 3) + 0.25 * LN(4 / 7))
    + 0.5 * (0.375 * LN(2 / 3) + 0.625 * LN(10 / 7)),
    # 1/2 (|1/2 - 1/4| + |1/4 - 1/8| + |1/4 - 5/8|) = 1/2 (1/4 + 1/8 + 3/8)
    "total_variation": 0.375,
    # head (cumulative teacher mass <= 0.5) = {token 0}: g_head = 1/4, g_tail = 1/8 + 3/8 = 1/2
    # AKL = (1/4 FKL + 1/2 RKL) / (3/4) = FKL / 3 + 2 RKL / 3
    "akl": (0.75 * LN(2) + 0.25 * LN(0.4)) / 3 + 2 * (-0.375 * LN(2) + 0.625 * LN(2.5)) / 3,
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_three_token_vocabulary_by_hand(name):
    target = SparseTarget.from_logits(P.log(), top_k=3)
    got = DIVERGENCES[name](Q.log(), target)
    assert got.item() == pytest.approx(HAND[name], abs=1e-6)


def test_generalized_jsd_quarter_by_hand():
    # beta = 1/4: m = p/4 + 3q/4 = (0.3125, 0.15625, 0.53125); JSD = KL(p||m)/4 + 3 KL(q||m)/4
    kl_p_m = 0.5 * LN(0.5 / 0.3125) + 0.25 * LN(0.25 / 0.15625) + 0.25 * LN(0.25 / 0.53125)
    kl_q_m = 0.25 * LN(0.25 / 0.3125) + 0.125 * LN(0.125 / 0.15625) + 0.625 * LN(0.625 / 0.53125)
    target = SparseTarget.from_logits(P.log(), top_k=3)
    got = DIVERGENCES["generalized_jsd"](Q.log(), target, beta=0.25)
    assert got.item() == pytest.approx(0.25 * kl_p_m + 0.75 * kl_q_m, abs=1e-6)


# --- zero at equality, descent direction ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_zero_when_student_equals_teacher(name):
    teacher_logits, _ = random_logits(4, vocab=20)
    for top_k in (20, 5):
        target = SparseTarget.from_logits(teacher_logits, top_k=top_k)
        loss = DIVERGENCES[name](teacher_logits, target)
        torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-6, rtol=0)
    # With tau != 1 and k < V the teacher's tail is re-tempered as if uniform over its ids, so
    # equality holds when the teacher's non-cached logits really are equal.
    flat_tail = teacher_logits.clone()
    top_ids = flat_tail.topk(5, -1).indices
    flat_tail = torch.full_like(flat_tail, -3.0).scatter(-1, top_ids, flat_tail.gather(-1, top_ids))
    target = SparseTarget.from_logits(flat_tail, top_k=5)
    loss = DIVERGENCES[name](flat_tail, target, temperature=2.0)
    torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_moving_student_toward_teacher_lowers_the_loss(name, temperature):
    teacher_logits, student_logits = random_logits(5, vocab=17)
    for top_k in (17, 4):
        target = SparseTarget.from_logits(teacher_logits, top_k=top_k)
        student = student_logits.clone().requires_grad_(True)
        loss = DIVERGENCES[name](student, target, temperature)
        loss.sum().backward()
        assert torch.isfinite(student.grad).all()
        stepped = DIVERGENCES[name](student.detach() - 0.05 * student.grad, target, temperature)
        assert (stepped < loss.detach()).all()
        if top_k == 17:
            # Full support: the gradient also points away from the teacher's logits.
            toward_teacher = ((teacher_logits - student_logits) * student.grad).sum(-1)
            assert (toward_teacher < 0).all()


# --- top-k < V: the tail bucket --------------------------------------------------------------------

def test_tail_bucket_masses_and_forward_kl_by_hand():
    # V = 4, teacher (0.4, 0.3, 0.2, 0.1) cached at k = 2: buckets (0.4, 0.3 | tail 0.3).
    # Uniform student: buckets (0.25, 0.25 | 0.5).
    teacher = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    target = SparseTarget.from_logits(teacher.log(), top_k=2)
    assert target.ids.tolist() == [[0, 1]]
    assert target.tail_logmass.exp().item() == pytest.approx(0.3, abs=1e-6)
    log_p, log_q = project_on_support(torch.zeros(1, 4), target)
    torch.testing.assert_close(log_p.exp(), torch.tensor([[0.4, 0.3, 0.3]]))
    torch.testing.assert_close(log_q.exp(), torch.tensor([[0.25, 0.25, 0.5]]))
    # 0.4 ln(0.4/0.25) + 0.3 ln(0.3/0.25) + 0.3 ln(0.3/0.5)
    expected = 0.4 * LN(1.6) + 0.3 * LN(1.2) + 0.3 * LN(0.6)
    got = DIVERGENCES["forward_kl"](torch.zeros(1, 4), target)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_teacher_tail_is_retempered_as_uniform_over_its_ids():
    # tau = 2: ids 0.4^(1/2), 0.3^(1/2); the tail 0.3 over 2 ids -> 2 * 0.15^(1/2); renormalise.
    target = SparseTarget.from_logits(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log(), top_k=2)
    log_p, _ = project_on_support(torch.zeros(1, 4), target, temperature=2.0)
    raw = torch.tensor([0.4 ** 0.5, 0.3 ** 0.5, 2 * 0.15 ** 0.5])
    torch.testing.assert_close(log_p.exp()[0], raw / raw.sum())


@pytest.mark.parametrize("cache_temperature,loss_temperature", [(2.0, 2.0), (2.0, 1.0), (0.5, 2.0), (1.0, 3.0)])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "total_variation"])
def test_a_tempered_cache_gives_the_dense_loss_at_the_loss_temperature(name, cache_temperature, loss_temperature):
    # The cache stores softmax(z_T / t_c); the loss temperature tau is applied once, to both sides:
    # the result is the dense divergence between softmax(z_T / tau) and softmax(z_S / tau).
    teacher_logits, student_logits = random_logits(4, vocab=11)
    target = SparseTarget.from_logits(teacher_logits, top_k=11, temperature=cache_temperature)
    p = torch.softmax(teacher_logits / loss_temperature, -1)
    q = torch.softmax(student_logits / loss_temperature, -1)
    got = DIVERGENCES[name](student_logits, target, loss_temperature)
    torch.testing.assert_close(got, DENSE[name](p, q).float(), atol=1e-5, rtol=1e-5)


def test_buckets_renormalise_rounded_log_probs():
    # Stored masses 0.5 + 0.3 + tail 0.3 = 1.1 (e.g. after rounding): read as 5/11, 3/11, 3/11.
    target = SparseTarget(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]]).log(), torch.tensor([0.3]).log(), 4)
    torch.testing.assert_close(target.buckets().exp(), torch.tensor([[5 / 11, 3 / 11, 3 / 11]]))
    torch.testing.assert_close(target.dense_logprobs().exp(), torch.tensor([[5 / 11, 3 / 11, 1.5 / 11, 1.5 / 11]]))
    assert target.normalized().tail_logmass.exp().item() == pytest.approx(3 / 11)


def test_student_tail_stays_exact_when_it_is_tiny():
    # Cached ids hold almost all the mass; 1 - sum(q_k) would round to 0 in fp32.
    logits = torch.full((1, 10), -40.0)
    logits[0, :2] = 0.0
    target = SparseTarget.from_logits(logits, top_k=2)
    _, log_q = project_on_support(logits, target)
    # tail = log(8 e^-40) - log(2 + 8 e^-40) ~= -40 + ln 4
    assert log_q[0, 2].item() == pytest.approx(-40.0 + LN(4.0), abs=1e-4)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_student_projection_gradient_matches_finite_differences(temperature):
    # The projection onto k ids + tail has a hand-written backward; check it in float64, also on
    # a row whose tail is ~e^-30 of its head.
    teacher_logits, student_logits = random_logits(9, tokens=4, vocab=9)
    student_logits[0, 3:] -= 30.0
    target = SparseTarget.from_logits(teacher_logits, top_k=3)
    upstream = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def weighted_buckets(logits):
        return (project_on_support(logits, target, temperature)[1] * upstream).sum()

    student = student_logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(weighted_buckets, (student,))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_top_k_below_vocab_gives_finite_loss_and_gradient(name):
    teacher_logits, student_logits = random_logits(6, tokens=8, vocab=50, scale=4.0)
    target = SparseTarget.from_logits(teacher_logits, top_k=5)
    # An fp16 cache whose tail underflowed to -inf is still usable.
    target.tail_logmass[0] = float("-inf")
    student = student_logits.clone().requires_grad_(True)
    loss = DIVERGENCES[name](student, target, temperature=2.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss >= -1e-6).all()
    assert torch.isfinite(student.grad).all()


def test_bad_shapes_are_refused():
    target = SparseTarget.from_logits(torch.randn(3, 7), top_k=4)
    with pytest.raises(ValueError, match="do not match"):
        DIVERGENCES["forward_kl"](torch.randn(3, 8), target)
    with pytest.raises(ValueError, match="k = 9"):
        SparseTarget(torch.zeros(2, 9), torch.zeros(2, 9), torch.zeros(2), vocab_size=7)


def test_per_sample_mean_by_hand():
    # tokens 0,1 -> sample 0; token 2 -> sample 2; sample 1 has none.
    values = torch.tensor([1.0, 3.0, 5.0])
    token_sample = torch.tensor([0, 0, 2])
    got = per_sample_mean(values, token_sample, num_samples=3)
    torch.testing.assert_close(got, torch.tensor([2.0, 0.0, 5.0]))


# --- TAID ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("t", [0.4, 0.75])
def test_taid_equals_dense_formula_at_full_support(t, temperature):
    teacher_logits, student_logits = random_logits(7, vocab=11)
    target = SparseTarget.from_logits(teacher_logits, top_k=11)
    # p_t = softmax((1 - t) z_S + t z_T) on tempered logits; loss KL(p_t || q)
    p_t = torch.softmax(((1 - t) * student_logits + t * teacher_logits) / temperature, -1)
    q = torch.softmax(student_logits / temperature, -1)
    got = taid_divergence(student_logits, target, temperature, t=t)
    torch.testing.assert_close(got, dense_kl(p_t, q), atol=1e-5, rtol=1e-5)


def test_taid_interpolates_between_student_and_teacher():
    teacher_logits, student_logits = random_logits(8, vocab=9)
    target = SparseTarget.from_logits(teacher_logits, top_k=4)
    at_zero = taid_divergence(student_logits, target, t=0.0)
    torch.testing.assert_close(at_zero, torch.zeros_like(at_zero), atol=1e-6, rtol=0)
    torch.testing.assert_close(taid_divergence(student_logits, target, t=1.0),
                               DIVERGENCES["forward_kl"](student_logits, target))
    # The student leg of the target is detached: the gradient is that of KL(p_t || q), p_t fixed.
    student = student_logits.clone().requires_grad_(True)
    taid_divergence(student, target, t=0.5).sum().backward()
    log_p, log_q = project_on_support(student_logits, target)
    fixed_target = torch.log_softmax(0.5 * log_q + 0.5 * log_p, -1)
    reference = student_logits.clone().requires_grad_(True)
    _, log_q_ref = project_on_support(reference, target)
    (fixed_target.exp() * (fixed_target - log_q_ref)).sum().backward()
    torch.testing.assert_close(student.grad, reference.grad)


def test_taid_first_updates_by_hand():
    taid = Taid()
    # step 1: no previous loss; t = max(t_linear(1), 0.4) with t_linear(1) = 0.4 + 0.6 / 10000
    assert taid.update(1.0, step=1, total_steps=10_000) == pytest.approx(0.40006)
    # step 2: delta = (1.0 - 0.9) / 1.0 = 0.1; m = 0.01 * 0.1 = 0.001
    # t = max(0.40012, 0.40006 + 5e-4 * sigmoid(0.001) * (1 - 0.40006))
    adaptive = 0.40006 + 5e-4 * (1 / (1 + math.exp(-0.001))) * (1 - 0.40006)
    assert taid.update(0.9, step=2, total_steps=10_000) == pytest.approx(adaptive, abs=1e-9)
    assert taid.momentum == pytest.approx(0.001)
    assert adaptive > 0.40012  # the adaptive step beat the linear floor


def test_taid_adaptive_term_follows_the_momentum_recursion_over_many_steps():
    # With 10^6 total steps the linear floor barely moves, so t is driven by the adaptive term:
    # falling losses (positive momentum) push t up faster than rising losses (negative momentum).
    total = 1_000_000
    falling, rising = Taid(), Taid()
    t_f = t_r = 0.4
    m_f = m_r = 0.0
    previous_f = previous_r = None
    for step in range(1, 201):
        loss_f, loss_r = 2.0 * 0.99 ** step, 2.0 * 1.01 ** step
        floor = 0.4 + 0.6 * step / total
        if previous_f is None:
            t_f, t_r = max(floor, t_f), max(floor, t_r)
        else:
            m_f = 0.99 * m_f + 0.01 * (previous_f - loss_f) / (previous_f + 1e-15)
            m_r = 0.99 * m_r + 0.01 * (previous_r - loss_r) / (previous_r + 1e-15)
            t_f = min(1.0, max(floor, t_f + 5e-4 / (1 + math.exp(-m_f)) * (1 - t_f)))
            t_r = min(1.0, max(floor, t_r + 5e-4 / (1 + math.exp(-m_r)) * (1 - t_r)))
        previous_f, previous_r = loss_f, loss_r
        assert falling.update(loss_f, step, total) == pytest.approx(t_f, abs=1e-12)
        assert rising.update(loss_r, step, total) == pytest.approx(t_r, abs=1e-12)
    floor = 0.4 + 0.6 * 200 / total
    assert falling.t - floor > 0.02 and falling.t > rising.t > floor  # the adaptive term dominates


def test_taid_t_is_monotone_and_reaches_t_end():
    taid = Taid(t_start=0.4, t_end=1.0)
    total = 50
    generator = torch.Generator().manual_seed(0)
    ts = [taid.t]
    for step in range(1, total + 1):
        noisy_loss = 2.0 - step / total + 0.3 * float(torch.rand((), generator=generator))
        ts.append(taid.update(noisy_loss, step, total))
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))
    assert ts[-1] == pytest.approx(1.0)
    assert ts[total // 2] < 1.0  # gradual, not a jump to the end


def test_taid_state_round_trips_through_json():
    first = Taid()
    for step, loss in enumerate([3.0, 2.5, 2.6, 2.0], start=1):
        first.update(loss, step, total_steps=2000)
    resumed = Taid()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
    for step, loss in enumerate([1.9, 1.7], start=5):
        assert resumed.update(loss, step, 2000) == first.update(loss, step, 2000)
    with pytest.raises(ValueError, match="lacks momentum"):
        Taid().load_state_dict({"t": 0.5, "prev_loss": None, "step": 1})


def test_vocabulary_logits_keep_the_tokenizer_ids_of_a_padded_head():
    logits = torch.arange(12.0).reshape(2, 6)  # a head of 6 rows, a tokenizer of 4 ids
    kept = vocabulary_logits(logits, 4)
    assert kept.tolist() == [[0.0, 1.0, 2.0, 3.0], [6.0, 7.0, 8.0, 9.0]]
    # renormalised over the 4 ids: the padded rows take no probability
    assert torch.allclose(torch.log_softmax(kept, -1).exp().sum(-1), torch.ones(2))
    assert vocabulary_logits(logits, 6) is logits
    with pytest.raises(ValueError, match="width 6 cannot score the vocabulary's 7 ids"):
        vocabulary_logits(logits, 7)
