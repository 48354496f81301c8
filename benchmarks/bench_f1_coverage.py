"""How often the report's 95% interval for macro-F1 covers the true value, by simulation.

A 4-label choice task; the model is right with probability ``accuracy`` and otherwise says one of
the other labels at random. The true macro-F1 is that of 2,000,000 draws. Each trial draws a test
split of ``--rows`` rows and computes, from the project's own confusion-matrix bootstrap
(``stats.resample_counts``, ``stats.confusion_counts``), the 95% interval of macro-F1 by

* ``percentile``: the percentile interval, labels averaged over those present in each resample
  (what the report does);
* ``fixed-0`` / ``fixed-full``: the labels of the whole test split on every resample, a label absent
  from a resample counted as F1 0, or as its F1 on the whole split;
* ``BCa``: bias-corrected and accelerated percentiles (jackknife acceleration).

    .venv/bin/python benchmarks/bench_f1_coverage.py                  # 1,000 trials per setting
"""

from __future__ import annotations

import argparse
from statistics import NormalDist

import _common  # noqa: F401  (pins torch to one thread before anything imports it)
import numpy as np
from _common import format_table, machine_line

from scd_pipeline.math.stats import confusion_counts, resample_counts

K = 4
SETTINGS = [("balanced 25/25/25/25", (0.25, 0.25, 0.25, 0.25), 0.7),
            ("imbalanced 55/30/12/3", (0.55, 0.30, 0.12, 0.03), 0.7),
            ("rare label 60/30/8/2", (0.60, 0.30, 0.08, 0.02), 0.8)]


def draw(rng: np.random.Generator, n: int, prevalence, accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    gold = rng.choice(K, size=n, p=prevalence)
    other = (gold + rng.integers(1, K, size=n)) % K
    return gold, np.where(rng.random(n) > accuracy, other, gold)


def per_label_f1(confusion: np.ndarray) -> np.ndarray:
    """(B, K) F1 of each label, NaN where a label is in neither gold nor prediction."""
    diagonal = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(axis=2) + confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(support > 0, 2 * diagonal / support, np.nan)


def macro(f1: np.ndarray, labels: np.ndarray | None = None, absent: np.ndarray | float | None = None) -> np.ndarray:
    if labels is None:
        return np.nanmean(f1, axis=1)
    chosen = f1[:, labels]
    fill = absent[labels] if isinstance(absent, np.ndarray) else absent
    return np.where(np.isnan(chosen), fill, chosen).mean(axis=1)


def bca(estimate: float, draws: np.ndarray, jackknife: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    normal = NormalDist()
    share = np.mean(draws < estimate) + 0.5 * np.mean(draws == estimate)
    z0 = normal.inv_cdf(min(max(share, 1e-6), 1 - 1e-6))
    d = jackknife.mean() - jackknife
    a = float((d ** 3).sum() / (6 * (d ** 2).sum() ** 1.5)) if (d ** 2).sum() > 0 else 0.0
    bounds = []
    for q in ((1 - confidence) / 2, (1 + confidence) / 2):
        z = normal.inv_cdf(q)
        bounds.append(float(np.percentile(draws, 100 * normal.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))))
    return bounds[0], bounds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, prevalence, accuracy in SETTINGS:
        gold, pred = draw(rng, 2_000_000, prevalence, accuracy)
        truth = float(macro(per_label_f1(confusion_counts(np.ones((1, len(gold))), gold, pred, K)))[0])
        covered = {"percentile": 0, "fixed-0": 0, "fixed-full": 0, "BCa": 0}
        leave_one_out = np.ones((args.rows, args.rows)) - np.eye(args.rows)
        for _ in range(args.trials):
            gold, pred = draw(rng, args.rows, prevalence, accuracy)
            whole = per_label_f1(confusion_counts(np.ones((1, args.rows)), gold, pred, K))[0]
            labels = ~np.isnan(whole)
            f1 = per_label_f1(confusion_counts(resample_counts(args.rows, args.resamples, rng), gold, pred, K))
            estimate = float(np.nanmean(whole))
            for rule, draws in (("percentile", macro(f1)), ("fixed-0", macro(f1, labels, 0.0)),
                                ("fixed-full", macro(f1, labels, np.nan_to_num(whole)))):
                low, high = np.nanpercentile(draws, [2.5, 97.5])
                covered[rule] += low <= truth <= high
            jackknife = macro(per_label_f1(confusion_counts(leave_one_out, gold, pred, K)))
            low, high = bca(estimate, macro(f1), jackknife)
            covered["BCa"] += low <= truth <= high
        rows.append({"setting": f"{name}, accuracy {accuracy}", "true macro-F1": round(truth, 3),
                     **{rule: covered[rule] / args.trials for rule in covered}})
    print(machine_line())
    print(f"{args.trials} test splits of {args.rows} rows per setting, {args.resamples} resamples each; "
          "share of 95% intervals that cover the true macro-F1")
    print(format_table(rows))


if __name__ == "__main__":
    main()
