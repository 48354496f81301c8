"""TD / CD / SCD schedules and the sparse KLs SCD chooses with."""

from __future__ import annotations

import math

import pytest
import torch

from scd_pipeline.losses import SparseTarget
from scd_pipeline.schedules import (
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


def test_student_cache_kl_uses_the_cache_temperature():
    student, teacher = random_logits(6), random_logits(7)
    cache = SparseTarget.from_logits(teacher, 12, temperature=2.0)
    expected = dense_kl(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1))
    torch.testing.assert_close(student_cache_kl(student, cache, temperature=2.0), expected,
                               atol=1e-5, rtol=1e-5)


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
