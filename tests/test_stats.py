"""Paired bootstrap, seed resampling, the SFS/TFS outcome identity and the power formulas, each on a
case whose answer is known by hand (scd_pipeline.math.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scd_pipeline.math.metrics import cohen_kappa, macro_f1
from scd_pipeline.math.stats import (
    Interval,
    MetricEvidence,
    PairedBootstrap,
    SampleScores,
    accuracy_row_variance,
    bootstrap_p_value,
    bootstrap_seed,
    confusion_counts,
    difference,
    exact_sign_test_p,
    holm_adjusted,
    kappa_from_confusion,
    leave_one_out_side,
    macro_f1_from_confusion,
    metric_evidence,
    paired_p_value,
    required_replicates,
    required_test_size,
    resample_counts,
    seed_paired_t,
    sfs_outcome,
)
from scd_pipeline.stages.estimate_subdomains import decompose_gap
from scd_pipeline.stages.report.evidence import (
    HELD_OUT_PARTITION,
    EvaluatedModel,
    TaskEvidence,
    differences_frame,
    outcome_frame,
    resolution,
)
from scd_pipeline.stages.report.sections import resolution_text

N_ROWS = 100


def pair_differing_on(m: int) -> tuple[SampleScores, SampleScores]:
    """Two models on 100 rows, both right on rows m..59, both wrong on rows 60..99; on rows 0..m-1
    only A is right. So acc(A) - acc(B) = m/100 and every resample's difference is
    (times rows 0..m-1 were drawn) / 100 ~ Binomial(100, m/100) / 100."""
    a = np.zeros(N_ROWS)
    b = np.zeros(N_ROWS)
    a[:60] = 1.0
    b[m:60] = 1.0
    return SampleScores({"accuracy": a[:, None]}), SampleScores({"accuracy": b[:, None]})


def binomial_quantile(q: float, n: int, p: float) -> int:
    """Smallest k with P(Binomial(n, p) <= k) >= q."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_resample_counts_draw_n_rows_per_resample_reproducibly():
    counts = resample_counts(7, 50, np.random.default_rng([0, 1]))
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all()
    assert np.array_equal(counts, resample_counts(7, 50, np.random.default_rng([0, 1])))
    assert bootstrap_seed(0, "demo") != bootstrap_seed(0, "smdis")


@pytest.mark.parametrize("m", [3, 4, 8])
def test_difference_of_a_pair_differing_on_m_rows_follows_the_binomial(m):
    bootstrap = PairedBootstrap(N_ROWS, 20000, [0, 7])
    a, b = pair_differing_on(m)
    ea, eb = metric_evidence(bootstrap, a, "accuracy"), metric_evidence(bootstrap, b, "accuracy")
    interval = difference(bootstrap, ea, eb)
    p = m / N_ROWS
    assert interval.estimate == pytest.approx(p)
    # The interval's bounds are the binomial's 2.5% and 97.5% quantiles (divided by n).
    assert interval.low == pytest.approx(binomial_quantile(0.025, N_ROWS, p) / N_ROWS, abs=1 / N_ROWS)
    assert interval.high == pytest.approx(binomial_quantile(0.975, N_ROWS, p) / N_ROWS, abs=1 / N_ROWS)
    # Its spread is the binomial's, sqrt(p (1 - p) / n): the shared rows cancel (paired). Unpaired
    # resamples of two models near accuracy 0.6 would spread about sqrt(2 * 0.24 / 100) = 0.069.
    assert np.std(ea.draws - eb.draws) == pytest.approx(math.sqrt(p * (1 - p) / N_ROWS), rel=0.03)


def test_three_of_a_hundred_rows_is_not_resolved_four_is():
    """P(none of the m rows drawn) = (1 - m/100)^100: 0.048 for m = 3 (> 2.5%, so the 95% interval
    reaches 0), 0.017 for m = 4 (< 2.5%: it excludes 0). The report's default 2000 resamples."""
    bootstrap = PairedBootstrap(N_ROWS, 2000, bootstrap_seed(0, "demo"))
    for m, resolved in ((3, False), (4, True)):
        a, b = pair_differing_on(m)
        interval = difference(bootstrap, metric_evidence(bootstrap, a, "accuracy"),
                              metric_evidence(bootstrap, b, "accuracy"))
        assert interval.excludes_zero is resolved, (m, interval)
        assert interval.low == (0.0 if m == 3 else pytest.approx(0.01, abs=0.011))


def test_a_difference_of_one_seed_accuracies_is_decided_on_its_discordant_rows():
    """The interval above calls 4-0 resolved; the exact test on the 4 discordant rows gives
    p = 2 / 2^4 = 0.125. The smallest one-sided split it decides at 5% is 6-0 (p = 2 / 64)."""
    bootstrap = PairedBootstrap(N_ROWS, 2000, bootstrap_seed(0, "demo"))
    for m, p in ((4, 0.125), (5, 0.0625), (6, 0.03125)):
        a, b = pair_differing_on(m)
        draws = metric_evidence(bootstrap, a, "accuracy").draws - metric_evidence(bootstrap, b, "accuracy").draws
        assert paired_p_value(a, b, "accuracy", draws) == pytest.approx(p)
        assert paired_p_value(b, a, "accuracy", -draws) == pytest.approx(p)
    # with seeds (or non-0/1 values) the bootstrap's p: 2 min(share <= 0, share >= 0)
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(0.5)
    assert bootstrap_p_value(np.array([0.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)  # a 0 counts both ways
    assert bootstrap_p_value(np.array([1.0, 2.0])) == 0.0
    replicated = SampleScores({"accuracy": np.ones((N_ROWS, 3))}), SampleScores({"accuracy": np.zeros((N_ROWS, 3))})
    assert paired_p_value(*replicated, "accuracy", np.array([0.1, 0.2, -0.1, 0.3])) == pytest.approx(0.5)


def test_exact_sign_test_and_holm_by_hand():
    assert exact_sign_test_p(4, 0) == exact_sign_test_p(0, 4) == pytest.approx(0.125)
    assert exact_sign_test_p(7, 1) == pytest.approx(2 * (1 + 8) / 256)  # 0.0703
    assert exact_sign_test_p(0, 0) == 1.0 and exact_sign_test_p(3, 3) == 1.0
    # sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.2
    assert holm_adjusted([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm_adjusted([0.5, math.nan]) == [1.0, 1.0]
    assert holm_adjusted([]) == []


def null_evidence(rng: np.random.Generator, n: int, resamples: int, students: int,
                  tags: np.ndarray | None = None) -> TaskEvidence:
    """T* and ``students`` + 2 students (the SFT student, TD, ``students`` other distilled methods)
    that are equally good: on row i each is right with the row's own probability, independently."""
    p_row = rng.beta(2.0, 1.5, size=n)
    bootstrap = PairedBootstrap(n, resamples, [int(rng.integers(1 << 30)), 1])
    tags = np.array(["all"] * n) if tags is None else tags
    evidence = TaskEvidence("sim", "choice", [str(i) for i in range(n)], tags, bootstrap)
    roles = [("teacher", None), ("sft", None), ("distilled", "td")] + [("distilled", f"m{j}") for j in range(students)]
    for index, (role, method) in enumerate(roles):
        key = f"model{index}"
        right = (rng.random(n) < np.clip(p_row + (0.15 if role == "teacher" else 0.0), 0, 1)).astype(float)
        scores = SampleScores({"accuracy": right[:, None]})
        evidence.models[key] = EvaluatedModel(key, key, role, [key], [], "none", method)
        evidence.scores[key] = scores
        evidence.metrics[key] = {"accuracy": metric_evidence(bootstrap, scores, "accuracy")}
    return evidence


def test_the_confirmatory_family_calls_no_difference_in_95_of_100_reports_when_none_exists():
    """Six distilled methods, the SFT student and TD equally good (T* better), n = 100: the family
    (TD vs the SFT student, each other one vs the SFT student and TD: 11 differences) is Holm-adjusted and
    decided on the discordant rows. Measured over 300 simulated reports: a false * in 3.7% of them
    (at most 5% allowed); the old rule, any 95% interval that excludes 0, unadjusted: 35%."""
    rng = np.random.default_rng(11)
    family_false, unadjusted_false = 0, 0
    trials = 300
    for _ in range(trials):
        frame = differences_frame(null_evidence(rng, 100, 400, 5), ["accuracy"], "accuracy")
        family = frame[frame["family"] == "confirmatory"]
        assert len(family) == 11
        family_false += bool(family["resolved"].any())
        unadjusted_false += bool(((family["low"] > 0) | (family["high"] < 0)).any())
    assert family_false / trials <= 0.05
    assert unadjusted_false / trials >= 0.15  # the check can fail: without the family it would


def test_seed_paired_t_by_hand():
    """d = (0.1, 0.2, 0.3): mean 0.2, sd 0.1, se 0.1 / sqrt(3); t(2, 0.975) = 4.3027 -> half-width
    0.2484; t = 0.2 / se = 2 sqrt(3), two-sided p with 2 df = 1 - t / sqrt(t^2 + 2) = 0.0742."""
    def evidence(values):
        values = np.asarray(values, dtype=float)
        return MetricEvidence(values, np.zeros(4), Interval(float(values.mean()), 0.0, 0.0))

    interval, p = seed_paired_t(evidence([0.6, 0.7, 0.8]), evidence([0.5, 0.5, 0.5]), 0.95)
    assert interval.estimate == pytest.approx(0.2)
    assert interval.high - interval.estimate == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert p == pytest.approx(1 - math.sqrt(12) / math.sqrt(14), rel=1e-6)
    assert seed_paired_t(evidence([0.6]), evidence([0.5]), 0.95) is None  # one seed: no t
    assert seed_paired_t(evidence([0.6, 0.7]), evidence([0.5, 0.5, 0.5]), 0.95) is None  # not paired


def test_differences_to_a_replicated_sft_student_keep_false_resolutions_at_5_percent():
    """Three seeds per model, each seed moving a model's accuracy by N(0, 0.1), no true difference,
    n = 100. Measured over 200 simulated pairs: against an SFT student with one seed the interval
    excludes 0 in 29% of them; against one with the method's three seeds, seed-paired, with the
    wider of the bootstrap and the t interval over seeds, in 4% (the bootstrap alone: 11%)."""
    rng = np.random.default_rng(0)
    n, seeds, trials = 100, 3, 200
    single = paired = 0
    for _ in range(trials):
        p_row = rng.beta(2.0, 1.5, size=n)
        bootstrap = PairedBootstrap(n, 400, [int(rng.integers(1 << 30)), 1])

        def model(count, p_row=p_row):
            columns = [(rng.random(n) < np.clip(p_row + rng.normal(0, 0.1), 0, 1)).astype(float) for _ in range(count)]
            return SampleScores({"accuracy": np.stack(columns, axis=1)})

        method, sft = model(seeds), model(seeds)
        one_seed = SampleScores({"accuracy": sft.per_row["accuracy"][:, :1]})
        ours = metric_evidence(bootstrap, method, "accuracy")
        single += difference(bootstrap, ours, metric_evidence(bootstrap, one_seed, "accuracy")).excludes_zero
        paired += difference(bootstrap, ours, metric_evidence(bootstrap, sft, "accuracy")).excludes_zero
    assert paired / trials <= 0.06
    assert single / trials >= 0.15  # the check can fail: with one SFT seed it would


def test_leave_one_out_side_by_hand():
    # tag a: favour 1, -1, 3 -> others' means (-1+3)/2 = 1 > 0, (1+3)/2 = 2 > 0, (1-1)/2 = 0 (a tie: TFS)
    # tag b: favour -2, 1 -> others 1 > 0, -2 < 0; tag c: one row, nobody else: TFS
    groups = np.array(["a", "a", "a", "b", "b", "c"])
    favour = np.array([1.0, -1.0, 3.0, -2.0, 1.0, 5.0])
    assert leave_one_out_side(groups, favour).tolist() == [True, True, False, True, False, False]


def test_part_differences_on_the_held_out_split_are_unbiased_where_the_in_sample_split_is_not():
    """Five tags, every student equally good and T* better by 15 points: each distilled method's SFS
    and TFS parts minus TD's and minus the SFT student's, on the split by the other rows of each tag.
    Measured over 100 simulated reports (10 cells each): 3.9% of the cells excluded 0 (a 95%
    interval: 5% expected), the mean part difference +0.004. The SFS part of a method vs the SFT
    student on the SPEC's in-sample split by correctness excludes 0 in 85% of the reports (the SFT
    student is right on every SFS row there by construction)."""
    rng = np.random.default_rng(5)
    tags = np.repeat([f"t{i}" for i in range(5)], 20)
    trials, cells, excluded, estimates, in_sample = 100, 0, 0, [], 0
    for _ in range(trials):
        evidence = null_evidence(rng, 100, 300, 2, tags)
        frame = outcome_frame(evidence, 0)
        versus = frame[(frame["partition"] == HELD_OUT_PARTITION) & (frame["versus"] != "teacher")
                       & frame["part"].isin(["advantage_sfs", "deficit_tfs"])]
        assert len(versus) == 3 * 2 * 2 - 2  # TD, m0, m1 vs the SFT student; m0, m1 vs TD; two sides each
        cells += len(versus)
        excluded += int(versus["resolved"].sum())
        estimates += versus["estimate"].tolist()
        sft, teacher = evidence.scores["model1"].per_row["accuracy"], evidence.scores["model0"].per_row["accuracy"]
        sfs = sft[:, 0] > teacher[:, 0]
        in_sample += sfs_outcome(evidence.bootstrap, evidence.scores["model3"].per_row["accuracy"], sft[:, 0],
                                 sfs)["advantage_sfs"].excludes_zero
    assert excluded / cells <= 0.065 and abs(float(np.mean(estimates))) < 0.01
    assert in_sample / trials >= 0.5


def test_kappa_and_macro_f1_on_resampled_confusions_equal_the_metric_functions():
    rng = np.random.default_rng(3)
    letters = ["A", "B", "C", "D"]
    gold = rng.integers(0, 4, 40)
    pred = np.where(rng.random(40) < 0.6, gold, rng.integers(0, 4, 40))
    counts = resample_counts(40, 25, rng)
    confusion = confusion_counts(counts, gold, pred, 4)
    kappa = kappa_from_confusion(confusion, "linear")
    plain = kappa_from_confusion(confusion, "none")
    f1 = macro_f1_from_confusion(confusion)
    for b in range(25):
        rows = np.repeat(np.arange(40), counts[b].astype(int))
        g, p = [letters[i] for i in gold[rows]], [letters[i] for i in pred[rows]]
        assert kappa[b] == pytest.approx(cohen_kappa(g, p, letters, "linear"))
        assert plain[b] == pytest.approx(cohen_kappa(g, p, letters, "none"))
        assert f1[b] == pytest.approx(macro_f1(g, p))
    # A resample where both sides always say one label: no chance disagreement, kappa 1.
    single = np.zeros((1, 4, 4))
    single[0, 2, 2] = 10
    assert kappa_from_confusion(single, "linear")[0] == 1.0


def test_seed_resampling_adds_the_spread_over_seeds():
    """Seed 0 is right on every row, seed 1 wrong on every row: the rows carry no variance, the
    seeds all of it. The estimate is the mean 0.5; the resampled mean over two drawn seeds is 0,
    0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1]."""
    bootstrap = PairedBootstrap(20, 4000, [0, 1])
    scores = SampleScores({"accuracy": np.stack([np.ones(20), np.zeros(20)], axis=1)})
    evidence = metric_evidence(bootstrap, scores, "accuracy")
    assert evidence.estimate == 0.5
    assert (evidence.interval.low, evidence.interval.high) == (0.0, 1.0)
    assert np.mean(evidence.draws == 0.5) == pytest.approx(0.5, abs=0.03)
    assert evidence.spread == {"sd": pytest.approx(math.sqrt(0.5)), "min": 0.0, "max": 1.0}
    one_seed = metric_evidence(bootstrap, SampleScores({"accuracy": np.ones((20, 1))}), "accuracy")
    assert (one_seed.interval.low, one_seed.interval.high) == (1.0, 1.0)
    assert math.isnan(one_seed.spread["sd"])


def test_sfs_outcome_adds_up_on_a_hand_case_and_on_every_resample():
    """Six rows, SFS = rows 0-2. Model - T* per row: +1, 0, +1 | -1, -1, 0.
    advantage(SFS) = (1 + 0 + 1) / 6 = 1/3; deficit(TFS) = (-1 - 1 + 0) / 6 = -1/3; gap 0.
    Model's score on SFS: (1 + 1 + 1) / 3 = 1; on TFS: (0 + 0 + 1) / 3 = 1/3."""
    model = np.array([1, 1, 1, 0, 0, 1], dtype=float)[:, None]
    teacher = np.array([0, 1, 0, 1, 1, 1], dtype=float)
    sfs = np.array([True, True, True, False, False, False])
    bootstrap = PairedBootstrap(6, 3000, [0, 2])
    parts = sfs_outcome(bootstrap, model, teacher, sfs)
    assert parts["advantage_sfs"].estimate == pytest.approx(1 / 3)
    assert parts["deficit_tfs"].estimate == pytest.approx(-1 / 3)
    assert parts["gap"].estimate == pytest.approx(0.0)
    assert parts["score_sfs"].estimate == pytest.approx(1.0)
    assert parts["score_tfs"].estimate == pytest.approx(1 / 3)
    reference = decompose_gap(model[:, 0], teacher, sfs)
    assert (parts["advantage_sfs"].estimate, parts["deficit_tfs"].estimate) == pytest.approx(
        (reference["advantage_sfs"], reference["deficit_tfs"]))
    # The advantage can only be >= 0 here (every SFS row has d >= 0), the deficit <= 0.
    assert parts["advantage_sfs"].low >= 0 and parts["deficit_tfs"].high <= 0


def test_required_test_size_and_seeds_by_hand():
    """z = z_0.975 + z_0.8 = 1.959964 + 0.841621 = 2.801585, z^2 = 7.848880.
    Discordance 10%, delta 0.03: var = 0.10 - 0.0009 = 0.0991; n = 7.84888 * 0.0991 / 0.0009 =
    864.25 -> 865. Discordance 16%: 0.1591 -> 1387.5 -> 1388.
    Seeds: row var 0.05 at n = 2000 leaves (0.03 / z)^2 - 0.05 / 2000 = 8.9666e-5 for 2 s^2 / R;
    s^2 = 0.0004 -> R = 8.92 -> 9. At n = 100 the rows alone use more than the budget: None."""
    assert accuracy_row_variance(0.10, 0.03) == pytest.approx(0.0991)
    assert required_test_size(0.03, accuracy_row_variance(0.10, 0.03)) == 865
    assert required_test_size(0.03, accuracy_row_variance(0.16, 0.03)) == 1388
    assert required_replicates(0.03, 0.05, 0.0004, n=2000) == 9
    assert required_replicates(0.03, 0.05, 0.0004, n=100) is None
    assert required_replicates(0.03, 0.05, 0.0, n=2000) == 1
    # At power 0.5 the required n puts the interval's half-width at delta.
    n = required_test_size(0.03, 0.0991, power=0.5)
    assert 1.959964 * math.sqrt(0.0991 / n) == pytest.approx(0.03, rel=0.002)
    with pytest.raises(ValueError, match="discordance"):
        accuracy_row_variance(0.01, 0.03)


def test_students_that_agree_on_every_row_leave_the_test_size_not_estimable():
    rng = np.random.default_rng(0)
    evidence = null_evidence(rng, 50, 100, 1)
    same = evidence.scores["model1"]  # the SFT student's rows for every student
    for key in ("model2", "model3"):
        evidence.scores[key] = same
        evidence.metrics[key] = evidence.metrics["model1"]
    found = resolution(evidence, "accuracy", 0.03, 0.8)
    assert found.row_variance == 0.0 and found.required_rows is None
    assert resolution_text(found).startswith("Not estimable: the students' per-row Accuracy agree on every test row")
