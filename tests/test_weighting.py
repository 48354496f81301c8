"""Adaptive weight, PACED weight, CE/KD combination and the weighted batch mean, by hand."""

from __future__ import annotations

import pytest
import torch

from scd_pipeline.math.weighting import adaptive_weight, combine, paced_weight, weighted_mean


def test_adaptive_weight_is_the_ratio_of_nlls():
    student_nll = torch.tensor([0.2, 1.0, 3.0, 1e-4, 50.0])
    teacher_nll = torch.tensor([0.6, 1.0, 0.5, 2.0, 1e-3])
    expected = student_nll / (student_nll + teacher_nll)  # L_S / (L_S + L_T)
    torch.testing.assert_close(adaptive_weight(student_nll, teacher_nll), expected)
    # e.g. row 0 by hand: 0.2 / 0.8 = 0.25; row 2: 3 / 3.5
    assert adaptive_weight(student_nll, teacher_nll)[0].item() == pytest.approx(0.25)


def test_adaptive_weight_favours_kd_where_teacher_nll_is_lower():
    weight = adaptive_weight(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]))
    assert weight[0] > 0.5  # teacher-favoured sample: lean on the teacher
    assert weight[1] < 0.5  # student-favoured sample: lean on the gold CE


def test_adaptive_weight_guards_zero_nll():
    weight = adaptive_weight(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(weight, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="teacher_nll must be >= 0"):
        adaptive_weight(torch.tensor([1.0]), torch.tensor([-0.1]))


def test_paced_weight_by_hand():
    pass_rate = torch.tensor([0.0, 0.5, 1.0])
    # p (1 - p): 0 * 1, 0.5 * 0.5, 1 * 0
    torch.testing.assert_close(paced_weight(pass_rate), torch.tensor([0.0, 0.25, 0.0]))
    # alpha = 2, beta = 1 at p = 0.5: 0.25 * 0.5
    assert paced_weight(torch.tensor([0.5]), alpha=2.0, beta=1.0).item() == pytest.approx(0.125)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paced_weight(torch.tensor([1.2]))


def test_combine_convex_and_additive_by_hand():
    ce = torch.tensor([2.0, 1.0])
    kd = torch.tensor([4.0, 3.0])
    weight = torch.tensor([0.25, 1.0])
    # convex: 0.75 * 2 + 0.25 * 4 = 2.5; 0 * 1 + 1 * 3 = 3
    torch.testing.assert_close(combine(ce, kd, weight), torch.tensor([2.5, 3.0]))
    # additive: 2 + 0.25 * 4 = 3; 1 + 3 = 4
    torch.testing.assert_close(combine(ce, kd, weight, "additive"), torch.tensor([3.0, 4.0]))
    # TD / CD: a constant lambda = 0.5
    torch.testing.assert_close(combine(ce, kd, 0.5), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="convex, additive"):
        combine(ce, kd, weight, "mixed")


def test_weighted_mean_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0])
    weights = torch.tensor([1.0, 0.0, 3.0])
    # (1 * 1 + 0 * 2 + 3 * 3) / (1 + 0 + 3) = 10 / 4
    assert weighted_mean(losses, weights).item() == pytest.approx(2.5)


def test_weighted_mean_with_all_zero_weights_is_a_zero_loss_that_backpropagates():
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    batch_loss = weighted_mean(losses, torch.zeros(2))
    assert batch_loss.item() == 0.0
    batch_loss.backward()
    torch.testing.assert_close(losses.grad, torch.zeros(2))


def test_adaptive_weighting_end_to_end_on_a_batch():
    # Two samples: the teacher checkpoint is better on the first (AW = 3/4), worse on the second
    # (AW = 1/4). Convex objective, plain batch mean.
    weight = adaptive_weight(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0]))
    per_sample = combine(torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0]), weight)
    # 1/4 * 1 + 3/4 * 5 = 4; 3/4 * 1 + 1/4 * 5 = 2
    torch.testing.assert_close(per_sample, torch.tensor([4.0, 2.0]))
    assert weighted_mean(per_sample, torch.ones(2)).item() == pytest.approx(3.0)
