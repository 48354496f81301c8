"""Each metric against a case small enough to compute by hand."""

from __future__ import annotations

import pytest

from scd_pipeline.errors import ConfigError
from scd_pipeline.math.metrics import (
    accuracy,
    choice_metrics,
    cohen_kappa,
    exact_f1,
    exact_f1_document,
    kappa_weights,
    list_metrics,
    macro_f1,
    partial_f1,
    partial_f1_document,
    primary_metric,
)


def test_accuracy_counts_exact_letter_matches():
    assert accuracy(["A", "B", "C", "D"], ["A", "B", "D", "D"]) == 0.75


def test_unweighted_kappa_by_hand():
    # observed agreement 3/4; chance: gold (A .5, B .5) x pred (A .25, B .75) -> .5*.25 + .5*.75 = .5
    # kappa = (0.75 - 0.5) / (1 - 0.5) = 0.5
    assert cohen_kappa(["A", "A", "B", "B"], ["A", "B", "B", "B"], ["A", "B"]) == pytest.approx(0.5)


def test_linear_weighted_kappa_credits_near_misses():
    gold, pred, scale = ["A", "B", "C", "C"], ["A", "C", "C", "B"], ["A", "B", "C"]
    # weights |i-j|/2. Observed weighted disagreement: (B,C) and (C,B) at 0.5 each, /4 -> 0.25.
    # Marginals are A .25, B .25, C .5 on both sides; chance weighted disagreement
    # = 2*(.25*.25*.5) + 2*(.25*.5*1) + 2*(.25*.5*.5) = 0.4375 -> kappa = 1 - .25/.4375 = 3/7.
    assert cohen_kappa(gold, pred, scale, "linear") == pytest.approx(3 / 7)
    # Unweighted: observed disagreement 2/4, chance 1 - (.0625 + .0625 + .25) = .625 -> 0.2.
    assert cohen_kappa(gold, pred, scale, "none") == pytest.approx(0.2)


def test_kappa_is_one_for_perfect_agreement_even_with_a_single_label():
    assert cohen_kappa(["A", "C", "B"], ["A", "C", "B"], ["A", "B", "C"], "linear") == 1.0
    assert cohen_kappa(["B", "B"], ["B", "B"], ["A", "B"]) == 1.0


def test_kappa_rejects_labels_outside_the_categories():
    with pytest.raises(ValueError, match="not among the categories"):
        cohen_kappa(["A", "E"], ["A", "A"], ["A", "B"])


def test_macro_f1_by_hand():
    # A: tp1 fp0 fn1 -> 2/3; B: tp1 fp2 fn0 -> 1/2; C: tp0 fp0 fn1 -> 0; mean = 7/18
    assert macro_f1(["A", "A", "B", "C"], ["A", "B", "B", "B"]) == pytest.approx(7 / 18)


def test_exact_f1_compares_stripped_sets():
    # hits {fever, cough}: precision 2/3, recall 2/2 -> F1 0.8
    assert exact_f1_document(["fever", "cough"], ["fever", "headache", " cough "]) == pytest.approx(0.8)
    assert exact_f1_document(["chest pain"], ["pain"]) == 0.0


def test_partial_f1_matches_substrings_either_way():
    gold, pred = ["chest pain", "fever"], ["pain", "high fever", "rash"]
    # precision: "pain" is in "chest pain", "high fever" contains "fever", "rash" matches nothing -> 2/3
    # recall: both gold strings overlap a prediction -> 1; F1 = 0.8
    assert partial_f1_document(gold, pred) == pytest.approx(0.8)
    assert exact_f1_document(gold, pred) == 0.0


def test_empty_lists_conventions():
    assert exact_f1_document([], []) == 1.0
    assert partial_f1_document([], []) == 1.0
    assert exact_f1_document([], ["fever"]) == 0.0
    assert partial_f1_document(["fever"], []) == 0.0


def test_list_f1_is_averaged_per_document():
    gold = [[], ["fever", "cough"], ["rash"]]
    pred = [[], ["fever", "headache", "cough"], ["itchy rash"]]
    # exact per document: 1.0, 0.8, 0.0 -> 0.6; partial: 1.0, 0.8, 1.0 -> 14/15
    assert exact_f1(gold, pred) == pytest.approx(0.6)
    assert partial_f1(gold, pred) == pytest.approx(2.8 / 3)
    assert list_metrics(gold, pred) == {"exact_f1": pytest.approx(0.6), "partial_f1": pytest.approx(2.8 / 3)}


def test_choice_metrics_of_gold_predictions_are_all_one():
    gold = ["A", "B", "C", "D", "B"]
    assert choice_metrics(gold, gold, ["A", "B", "C", "D"], "linear") == {
        "accuracy": 1.0, "kappa": 1.0, "macro_f1": 1.0}


def test_ordered_tasks_use_linear_kappa():
    assert kappa_weights("demo") == "linear"
    assert kappa_weights("crade") == "linear"
    assert kappa_weights("smdis") == "none"


def test_primary_metric_defaults_and_rejects_mismatched_kinds():
    assert primary_metric("choice") == "accuracy"
    assert primary_metric("list") == "exact_f1"
    assert primary_metric("choice", "kappa") == "kappa"
    with pytest.raises(ConfigError, match="sft.val_metric"):
        primary_metric("list", "accuracy")


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        accuracy(["A", "B"], ["A"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kappa_and_macro_f1_agree_with_scikit_learn(seed):
    import numpy as np
    from sklearn.metrics import cohen_kappa_score, f1_score

    rng = np.random.default_rng(seed)
    categories = ["A", "B", "C", "D"]
    gold = list(rng.choice(categories, size=60))
    # predictions near the gold grade, sometimes off by one or two
    pred = [categories[min(3, max(0, categories.index(g) + int(rng.choice([-2, -1, 0, 0, 0, 1]))))] for g in gold]
    assert cohen_kappa(gold, pred, categories, "linear") == pytest.approx(
        cohen_kappa_score(gold, pred, labels=categories, weights="linear"), abs=1e-12)
    assert cohen_kappa(gold, pred, categories, "none") == pytest.approx(
        cohen_kappa_score(gold, pred, labels=categories), abs=1e-12)
    assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
