"""TD / CD / SCD schedules and the sparse KLs SCD chooses with."""

from __future__ import annotations

import math

import pytest
import torch

from scd_pipeline.engine.logit_cache import LOGPROB_STEP, decode_logprobs, encode_logprobs
from scd_pipeline.math.losses import SparseTarget
from scd_pipeline.math.schedules import (
    cache_kl,
    cd_schedule,
    mean_token_kl,
    scd_choose,
    student_cache_kl,
    td_schedule,
)


def dense_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def random_logits(seed: int, tokens: int = 6, vocab: int = 12) -> torch.Tensor:
    return torch.randn(tokens, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_td_uses_the_best_checkpoint_throughout():
    assert td_schedule(3, best_index=6) == [6, 6, 6]


def test_cd_uses_checkpoints_in_training_order():
    assert cd_schedule(4, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert cd_schedule(3, [3, 1, 2]) == [1, 2, 3]


def test_cd_spreads_checkpoints_evenly_when_counts_differ():
    assert cd_schedule(4, [1, 2]) == [1, 1, 2, 2]
    assert cd_schedule(2, list(range(1, 9))) == [4, 8]
    # ceil(8/3) - 1 = 2, ceil(16/3) - 1 = 5, 8 - 1 = 7 (positions) -> checkpoints 3, 6, 8
    assert cd_schedule(3, list(range(1, 9))) == [3, 6, 8]


def test_scd_picks_the_argmin_of_both_terms():
    kl_best = {1: 0.9, 2: 0.4, 3: 0.0}
    kl_student = {1: 0.1, 2: 0.3, 3: 1.2}
    # sums: 1.0, 0.7, 1.2 -> checkpoint 2 (neither term alone would pick it)
    chosen, records = scd_choose(kl_best, kl_student)
    assert chosen == 2
    assert [r["checkpoint"] for r in records] == [1, 2, 3]
    assert records[1] == {"checkpoint": 2, "kl_best_to_c": 0.4, "kl_student_to_c": 0.3,
                          "sum": pytest.approx(0.7)}


def test_scd_breaks_ties_toward_the_later_checkpoint():
    chosen, _ = scd_choose({1: 0.5, 2: 0.25, 3: 0.5}, {1: 0.0, 2: 0.25, 3: 0.0})
    assert chosen == 3
    with pytest.raises(ValueError, match="checkpoints differ"):
        scd_choose({1: 0.0}, {2: 0.0})


# --- sparse KL between two caches -----------------------------------------------------------------

def test_cache_kl_equals_dense_kl_at_full_support():
    first, second = random_logits(0), random_logits(1)
    got = cache_kl(SparseTarget.from_logits(first, 12), SparseTarget.from_logits(second, 12))
    expected = dense_kl(torch.log_softmax(first, -1), torch.log_softmax(second, -1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cache_kl_by_hand_on_different_supports():
    # V = 5. a caches ids {0, 1} at (0.5, 0.3), tail 0.2 -> 0.2/3 on each of ids 2, 3, 4.
    #        b caches ids {1, 2} at (0.4, 0.4), tail 0.2 -> 0.2/3 on each of ids 0, 3, 4.
    # KL(a||b) = 0.5 ln(0.5 / (0.2/3)) + 0.3 ln(0.3 / 0.4) + (0.2/3) ln((0.2/3) / 0.4)
    #          + (ids 3, 4: a and b both hold 0.4/3 there) 0
    a = SparseTarget(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]]).log(),
                     torch.tensor([0.2]).log(), vocab_size=5)
    b = SparseTarget(torch.tensor([[2, 1]]), torch.tensor([[0.4, 0.4]]).log(),
                     torch.tensor([0.2]).log(), vocab_size=5)
    third = 0.2 / 3
    expected = 0.5 * math.log(0.5 / third) + 0.3 * math.log(0.3 / 0.4) + third * math.log(third / 0.4)
    assert cache_kl(a, b).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("k_first,k_second", [(3, 3), (2, 5), (12, 4)])
def test_cache_kl_below_full_support_is_the_kl_of_the_reconstructions(k_first, k_second):
    first = SparseTarget.from_logits(random_logits(2), k_first)
    second = SparseTarget.from_logits(random_logits(3), k_second)
    got = cache_kl(first, second)
    assert (got >= 0).all()
    torch.testing.assert_close(got, dense_kl(first.dense_logprobs(), second.dense_logprobs()),
                               atol=1e-5, rtol=1e-5)
    same = cache_kl(first, first)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-6, rtol=0)


def test_student_cache_kl_equals_dense_kl():
    student, teacher = random_logits(4), random_logits(5)
    full = SparseTarget.from_logits(teacher, 12)
    expected = dense_kl(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))
    torch.testing.assert_close(student_cache_kl(student, full), expected, atol=1e-5, rtol=1e-5)
    sparse = SparseTarget.from_logits(teacher, 3)
    got = student_cache_kl(student, sparse)
    assert (got >= 0).all()
    torch.testing.assert_close(
        got, dense_kl(torch.log_softmax(student, -1), sparse.dense_logprobs()), atol=1e-5, rtol=1e-5)


def test_schedule_kls_read_a_tempered_cache_as_the_temperature_1_distribution():
    # A cache captured at temperature 2 stores softmax(z / 2); the schedule compares distributions
    # as they are (temperature 1), so the stored temperature is undone exactly when k = V.
    student, teacher, other = random_logits(6), random_logits(7), random_logits(8)
    cache = SparseTarget.from_logits(teacher, 12, temperature=2.0)
    expected = dense_kl(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))
    torch.testing.assert_close(student_cache_kl(student, cache), expected, atol=1e-5, rtol=1e-5)
    between = cache_kl(cache, SparseTarget.from_logits(other, 12, temperature=0.5))
    torch.testing.assert_close(between, dense_kl(torch.log_softmax(teacher, -1), torch.log_softmax(other, -1)),
                               atol=1e-5, rtol=1e-5)


# --- cache dtypes: the SCD terms do not depend on how the log-probs were rounded ------------------

FP16_TOLERANCE = 1e-3   # nats, on every KL(T* || c) and KL(S || c) term
INT8_TOLERANCE = 1e-2   # nats: the 0.1-nat grid moves a token's stored mass by up to ~5%


def stored_as(target: SparseTarget, dtype: str) -> SparseTarget:
    """The target after a round trip through the cache's log-prob encoding."""
    codes = encode_logprobs(target.logprobs.numpy(), dtype)
    decoded = decode_logprobs(codes, {"dtype": dtype, "logprob_step": LOGPROB_STEP})
    return SparseTarget(target.ids, torch.from_numpy(decoded), target.tail_logmass, target.vocab_size)


def scd_terms(caches: dict, student: torch.Tensor, best: int) -> tuple[dict, dict, int]:
    kl_best = {c: mean_token_kl([cache_kl(caches[best], caches[c])]) for c in caches}
    kl_student = {c: mean_token_kl([student_cache_kl(student, caches[c])]) for c in caches}
    return kl_best, kl_student, scd_choose(kl_best, kl_student)[0]


def peaked(top: list[float], vocab: int = 10) -> SparseTarget:
    """One token whose ids 0, 1, 2 hold ``top`` and the other ids the rest, as a k = 3 cache."""
    probs = torch.tensor([top], dtype=torch.float64)
    return SparseTarget(torch.tensor([[0, 1, 2]]), probs.log().float(), (1 - probs.sum()).log().float().reshape(1),
                        vocab)


def test_scd_choice_and_terms_from_fp16_and_int8_caches_match_fp32_on_a_constructed_case():
    # Checkpoint 1's top log-prob -0.048 rounds up to 0 on the int8 grid (its stored mass becomes
    # 1.047), checkpoint 2's -0.151 rounds down to -0.2 (0.957): read as they are stored, these
    # offsets (~0.08 nats) exceed the margin between checkpoints 2 and 1 and the choice flips.
    caches = {1: peaked([0.953, 0.03, 0.01]), 2: peaked([0.86, 0.05, 0.02]), 3: peaked([0.97, 0.01, 0.005])}
    student_probs = torch.zeros(1, 10)
    student_probs[0, :3] = torch.tensor([0.8, 0.2 / 3, 0.05])
    student_probs[0, 3:] = (1 - student_probs[0, :3].sum()) / 7
    student = student_probs.log()
    reference_best, reference_student, reference_choice = scd_terms(
        {c: stored_as(t, "fp32") for c, t in caches.items()}, student, best=3)
    sums = sorted(reference_best[c] + reference_student[c] for c in caches)
    assert reference_choice == 2 and sums[1] - sums[0] > 2 * INT8_TOLERANCE
    for dtype, tolerance in (("fp16", FP16_TOLERANCE), ("int8", INT8_TOLERANCE)):
        kl_best, kl_student, choice = scd_terms({c: stored_as(t, dtype) for c, t in caches.items()},
                                                student, best=3)
        assert choice == reference_choice, dtype
        for c in caches:
            assert kl_best[c] == pytest.approx(reference_best[c], abs=tolerance), (dtype, c)
            assert kl_student[c] == pytest.approx(reference_student[c], abs=tolerance), (dtype, c)


def test_scd_terms_from_fp16_and_int8_caches_stay_within_tolerance_on_random_teachers():
    generator = torch.Generator().manual_seed(3)
    base = 2.5 * torch.randn(400, 500, generator=generator)
    final = base + torch.randn(400, 500, generator=generator)
    checkpoints = {c: (c / 4) * final + (1 - c / 4) * base for c in (1, 2, 3, 4)}
    student = base + 2.0 * torch.randn(400, 500, generator=generator)
    exact = {c: SparseTarget.from_logits(z, 50) for c, z in checkpoints.items()}
    reference = scd_terms({c: stored_as(t, "fp32") for c, t in exact.items()}, student, best=4)
    for dtype, tolerance in (("fp16", FP16_TOLERANCE), ("int8", INT8_TOLERANCE)):
        got = scd_terms({c: stored_as(t, dtype) for c, t in exact.items()}, student, best=4)
        assert got[2] == reference[2]
        for c in exact:
            assert got[0][c] == pytest.approx(reference[0][c], abs=tolerance)
            assert got[1][c] == pytest.approx(reference[1][c], abs=tolerance)

def test_mean_token_kl_averages_over_all_tokens_not_batches():
    # (1 + 2 + 3) / 3 tokens = 2, not the mean of batch means (1.5 + 3) / 2
    assert mean_token_kl([torch.tensor([1.0, 2.0]), torch.tensor([3.0])]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no completion tokens"):
        mean_token_kl([])


def test_scd_choice_from_caches():
    # T* = checkpoint 3. The student currently matches checkpoint 1 exactly; checkpoint 2 is a
    # mixture of 1 and 3, closer to both than they are to each other.
    ckpt1, ckpt3 = random_logits(8, vocab=9), random_logits(9, vocab=9)
    logits = {1: ckpt1, 2: 0.5 * ckpt1 + 0.5 * ckpt3, 3: ckpt3}
    caches = {index: SparseTarget.from_logits(z, 4) for index, z in logits.items()}
    kl_best = {c: mean_token_kl([cache_kl(caches[3], caches[c])]) for c in caches}
    kl_student = {c: mean_token_kl([student_cache_kl(ckpt1, caches[c])]) for c in caches}
    chosen, records = scd_choose(kl_best, kl_student)
    assert kl_best[3] == pytest.approx(0.0, abs=1e-6)
    # The student is far from T* and T* far from the student: the middle checkpoint bridges them.
    assert kl_student[1] < kl_student[2] < kl_student[3]
    assert kl_best[1] > kl_best[2] > kl_best[3]
    assert chosen == 2
    assert [r["sum"] for r in records] == [kl_best[c] + kl_student[c] for c in (1, 2, 3)]
