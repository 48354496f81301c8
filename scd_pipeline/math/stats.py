"""Evidence behind every number of the report (SPEC 9): paired bootstrap intervals over test rows,
the spread over replicate seeds, and how many test rows or seeds a difference needs.

Paired bootstrap: resample b draws n test rows with replacement, the same rows for every model
(``PairedBootstrap.counts[b, i]`` = how often row i is drawn), so a difference between two models
is resampled row by row and the rows both get right or wrong cancel out. A metric that is a mean
over rows (accuracy, exact / partial F1, NLL) is ``counts @ per_row / n``; kappa and macro-F1 are
recomputed from each resample's confusion matrix (vectorised, equal to :mod:`scd_pipeline.math.metrics`
on the same rows). Intervals are percentile intervals of the resampled values; a difference is
*resolved* when its interval excludes 0.

Replicates: a model trained with R seeds has one prediction column per seed. Its estimate is the
mean over seeds of the per-seed metric. Its resampled value draws the test rows (as above) and,
independently, R seeds with replacement (the same seed draw for every model with R seeds), then
averages the drawn seeds' metrics on the drawn rows: the interval carries both the test-row and
the seed variance. With few seeds the seed part is narrow by a factor sqrt((R-1)/R), as any
bootstrap of R values; the spread over seeds is reported beside it.

Power (``required_test_size``, ``required_replicates``): the normal approximation of the paired
difference, Var = row_variance / n (+ 2 seed_variance / R with seeds); a difference delta is
resolved with probability ``power`` when (z_{1-alpha/2} + z_power) * sd <= delta. For accuracy
the per-row paired difference is -1, 0 or +1, so row_variance = discordance - delta^2, where
discordance is the share of rows on which exactly one of the two models is right.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from scd_pipeline.errors import DataError

MEAN_METRICS = ("accuracy", "exact_f1", "partial_f1", "loss")  # means over rows of a per-row value
CONFUSION_METRICS = ("kappa", "macro_f1")                       # recomputed from confusion matrices


# --- the SFS/TFS decomposition -------------------------------------------------------------------

def decompose_gap(student_risk: np.ndarray, teacher_risk: np.ndarray, sfs: np.ndarray) -> dict:
    """R(S) - R(T) = share_SFS * mean_SFS(d) + share_TFS * mean_TFS(d), d = r_S - r_T per sample.

    Returns the means, the gap, the conditional mean differences (None on an empty side), the
    two signed contributions ``advantage_sfs`` and ``deficit_tfs`` and ``identity_error`` =
    |gap - (advantage_sfs + deficit_tfs)| (float rounding only).
    """
    student_risk = np.asarray(student_risk, dtype=np.float64)
    teacher_risk = np.asarray(teacher_risk, dtype=np.float64)
    sfs = np.asarray(sfs, dtype=bool)
    if len(student_risk) == 0:
        raise DataError("decompose_gap: no samples")
    delta = student_risk - teacher_risk
    share_sfs = float(sfs.mean())
    sfs_mean = float(delta[sfs].mean()) if sfs.any() else None
    tfs_mean = float(delta[~sfs].mean()) if (~sfs).any() else None
    advantage = share_sfs * sfs_mean if sfs_mean is not None else 0.0
    deficit = (1.0 - share_sfs) * tfs_mean if tfs_mean is not None else 0.0
    gap = float(delta.mean())
    return {"student": float(student_risk.mean()), "teacher": float(teacher_risk.mean()), "gap": gap,
            "sfs_share": share_sfs, "sfs_mean_delta": sfs_mean, "tfs_mean_delta": tfs_mean,
            "advantage_sfs": advantage, "deficit_tfs": deficit,
            "identity_error": abs(gap - (advantage + deficit))}




# --- intervals -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval (NaN bounds when undefined)."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Resolved: the whole interval lies on one side of 0."""
        return bool(self.low > 0 or self.high < 0)


def percentile_interval(estimate: float, draws: np.ndarray, confidence: float) -> Interval:
    """``estimate`` with the central ``confidence`` share of ``draws`` (NaN draws ignored)."""
    draws = np.asarray(draws, dtype=np.float64)
    finite = draws[~np.isnan(draws)]
    if not len(finite) or math.isnan(estimate):
        return Interval(float(estimate), math.nan, math.nan)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def bootstrap_seed(seed: int, key: str) -> list[int]:
    """The generator seed of one task's (or tag's) bootstrap: the config seed and a stable hash of
    ``key``, so two tasks never share a resampling pattern and reruns repeat exactly."""
    return [int(seed), zlib.crc32(key.encode("utf-8"))]


# --- per-row evidence of one model ----------------------------------------------------------------

@dataclass
class SampleScores:
    """One model's per-row evidence on the test rows (rows in a fixed order), one column per seed.

    ``per_row`` maps each mean-type metric to an (n, R) array (accuracy and exact_f1: the
    ``score`` column; loss: per-sample mean NLL; partial_f1 when known). Choice tasks also carry
    ``gold`` (n,) and ``pred`` (n, R) as category codes, for kappa and macro-F1.
    """

    per_row: dict[str, np.ndarray]
    gold: np.ndarray | None = None
    pred: np.ndarray | None = None
    n_categories: int = 0
    kappa_weights: str = "none"

    @property
    def n_seeds(self) -> int:
        return next(iter(self.per_row.values())).shape[1]

    @property
    def n_rows(self) -> int:
        return next(iter(self.per_row.values())).shape[0]

    def metrics(self) -> tuple[str, ...]:
        confusion = CONFUSION_METRICS if self.gold is not None else ()
        return (*self.per_row, *confusion)


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) counts: row i drawn ``counts[b, i]`` times in resample b (each row sums to n)."""
    if n < 1:
        raise DataError("bootstrap: no test rows to resample")
    drawn = rng.integers(0, n, size=(resamples, n))
    flat = (drawn + (np.arange(resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def confusion_counts(counts: np.ndarray, gold: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) confusion matrices (rows gold, columns prediction) of each resample."""
    onehot = np.zeros((len(gold), k * k))
    onehot[np.arange(len(gold)), gold * k + pred] = 1.0
    return (counts @ onehot).reshape(len(counts), k, k)


def kappa_from_confusion(confusion: np.ndarray, weights: str) -> np.ndarray:
    """Cohen's kappa of each (k, k) confusion matrix, as :func:`metrics.cohen_kappa` defines it."""
    k = confusion.shape[-1]
    total = confusion.sum(axis=(1, 2), keepdims=True)
    observed = confusion / total
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :]
    index = np.arange(k)
    if weights == "linear":
        weight = np.abs(index[:, None] - index[None, :]) / max(k - 1, 1)
    else:
        weight = (index[:, None] != index[None, :]).astype(float)
    chance = (weight * expected).sum(axis=(1, 2))
    disagreement = (weight * observed).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = 1.0 - disagreement / chance
    return np.where(chance == 0.0, 1.0, kappa)


def macro_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix over the labels present in gold or prediction, as
    :func:`metrics.macro_f1` defines it."""
    diagonal = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(axis=2) + confusion.sum(axis=1)  # 2TP + FP + FN per label
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(present, 2 * diagonal / support, 0.0)
    return f1.sum(axis=1) / present.sum(axis=1)


def resampled_metric(scores: SampleScores, metric: str, counts: np.ndarray) -> np.ndarray:
    """(B, R): ``metric`` of each seed on each resample (``counts`` of ones = the full test set)."""
    if metric in scores.per_row:
        totals = counts.sum(axis=1, keepdims=True)
        return counts @ scores.per_row[metric] / totals
    if metric in CONFUSION_METRICS and scores.gold is not None:
        columns = []
        for seed in range(scores.n_seeds):
            confusion = confusion_counts(counts, scores.gold, scores.pred[:, seed], scores.n_categories)
            columns.append(kappa_from_confusion(confusion, scores.kappa_weights) if metric == "kappa"
                           else macro_f1_from_confusion(confusion))
        return np.stack(columns, axis=1)
    raise DataError(f"bootstrap: no per-row evidence for metric {metric!r}")


def point_metric(scores: SampleScores, metric: str) -> np.ndarray:
    """(R,): ``metric`` of each seed on the whole test set."""
    return resampled_metric(scores, metric, np.ones((1, scores.n_rows)))[0]


# --- the paired bootstrap -------------------------------------------------------------------------

@dataclass
class PairedBootstrap:
    """Shared resamples of ``n`` test rows (and of seeds, per replicate count) for every model."""

    n: int
    resamples: int
    seed: Sequence[int]
    confidence: float = 0.95
    counts: np.ndarray = field(init=False, repr=False)
    _seed_draws: dict[int, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise DataError(f"bootstrap: resamples must be at least 1, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise DataError(f"bootstrap: confidence must be between 0 and 1, got {self.confidence}")
        self.counts = resample_counts(self.n, self.resamples, np.random.default_rng(list(self.seed)))

    def seed_draws(self, n_seeds: int) -> np.ndarray:
        """(B, R) seed indices drawn with replacement; one draw per replicate count, shared by
        every model with that many seeds (all zeros for one seed)."""
        if n_seeds not in self._seed_draws:
            rng = np.random.default_rng([*self.seed, n_seeds])
            self._seed_draws[n_seeds] = (rng.integers(0, n_seeds, size=(self.resamples, n_seeds))
                                         if n_seeds > 1 else np.zeros((self.resamples, 1), dtype=int))
        return self._seed_draws[n_seeds]

    def combine_seeds(self, per_seed: np.ndarray) -> np.ndarray:
        """(B,): the mean over each resample's drawn seeds of a (B, R) array."""
        draws = self.seed_draws(per_seed.shape[1])
        return np.take_along_axis(per_seed, draws, axis=1).mean(axis=1)

    def interval(self, estimate: float, draws: np.ndarray) -> Interval:
        return percentile_interval(estimate, draws, self.confidence)


@dataclass
class MetricEvidence:
    """One model's metric: per-seed values on the whole test set and the bootstrap draws."""

    per_seed: np.ndarray  # (R,)
    draws: np.ndarray     # (B,) row (and seed) resampled estimates
    interval: Interval

    @property
    def estimate(self) -> float:
        return self.interval.estimate

    @property
    def spread(self) -> dict[str, float]:
        """Over seeds: sd (ddof 1; NaN for one seed), min and max."""
        values = self.per_seed
        return {"sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "min": float(np.min(values)), "max": float(np.max(values))}


def metric_evidence(bootstrap: PairedBootstrap, scores: SampleScores, metric: str) -> MetricEvidence:
    per_seed = point_metric(scores, metric)
    draws = bootstrap.combine_seeds(resampled_metric(scores, metric, bootstrap.counts))
    estimate = float(np.mean(per_seed))
    return MetricEvidence(per_seed, draws, bootstrap.interval(estimate, draws))


def difference(bootstrap: PairedBootstrap, a: MetricEvidence, b: MetricEvidence) -> Interval:
    """a - b on the same resampled rows: the paired difference and its interval. Two models with
    the same number R >= 2 of seeds: the wider of that interval and Student's t over the R
    seed-paired differences (:func:`seed_paired_t`), since a bootstrap over 3 seeds underrates how
    far a seed can move a model."""
    interval = bootstrap.interval(a.estimate - b.estimate, a.draws - b.draws)
    over_seeds = seed_paired_t(a, b, bootstrap.confidence)
    if over_seeds is None:
        return interval
    return Interval(interval.estimate, float(np.fmin(interval.low, over_seeds[0].low)),
                    float(np.fmax(interval.high, over_seeds[0].high)))


def seed_paired_t(a: MetricEvidence, b: MetricEvidence, confidence: float) -> tuple[Interval, float] | None:
    """Two models with R >= 2 seeds each (seed s of one paired with seed s of the other): the
    differences d_s of their metric on the whole test split, mean(d) ± t(R-1) sd(d) / sqrt(R),
    and the two-sided p of the t test; None when either has one seed or the counts differ."""
    from scipy.stats import t as student_t

    if len(a.per_seed) < 2 or len(a.per_seed) != len(b.per_seed):
        return None
    d = np.asarray(a.per_seed, dtype=np.float64) - np.asarray(b.per_seed, dtype=np.float64)
    if np.isnan(d).any():
        return None
    mean, spread = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
    if spread == 0:
        return Interval(mean, mean, mean), (1.0 if mean == 0 else 0.0)
    half = float(student_t.ppf(0.5 + confidence / 2, len(d) - 1)) * spread
    p = float(2 * student_t.sf(abs(mean) / spread, len(d) - 1))
    return Interval(mean, mean - half, mean + half), p


# --- deciding a difference: p-values and one confirmatory family ----------------------------------

def exact_sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact p of a split of discordant rows (McNemar's exact test: under "no
    difference" each discordant row favours either model with probability 1/2), 2 P(X <= min)
    for X ~ Binomial(wins + losses, 1/2), at most 1; 1 with no discordant row. A 4-0 split: 0.125."""
    if wins < 0 or losses < 0:
        raise ValueError(f"discordant counts must be >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def bootstrap_p_value(draws: np.ndarray) -> float:
    """Two-sided percentile-bootstrap p of "the difference is 0": 2 min(share of draws <= 0, share
    >= 0), at most 1 (NaN draws ignored; NaN with none). It is below 1 - confidence about when the
    percentile interval excludes 0."""
    draws = np.asarray(draws, dtype=np.float64)
    finite = draws[~np.isnan(draws)]
    if not len(finite):
        return math.nan
    return float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))))


def paired_p_value(a: SampleScores, b: SampleScores, metric: str, draws: np.ndarray,
                   seeds: tuple[MetricEvidence, MetricEvidence] | None = None,
                   confidence: float = 0.95) -> float:
    """Two-sided p of "a - b = 0" in ``metric``. One seed each and 0/1 values per row (accuracy):
    the exact test on the discordant rows (the percentile bootstrap calls a 4-0 split resolved,
    whose exact p is 0.125). Otherwise the bootstrap p of the paired ``draws`` of a - b; given the
    two models' evidence (``seeds``) and R >= 2 seeds each, the larger of that and the t test over
    the seed-paired differences (as :func:`difference` takes the wider interval)."""
    if metric in a.per_row and metric in b.per_row and a.n_seeds == 1 and b.n_seeds == 1:
        x, y = a.per_row[metric][:, 0], b.per_row[metric][:, 0]
        if np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all():
            return exact_sign_test_p(int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1))))
    p = bootstrap_p_value(draws)
    over_seeds = seed_paired_t(*seeds, confidence) if seeds is not None else None
    return p if over_seeds is None else max(p, over_seeds[1])


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of m p-values: the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p < alpha keeps the
    chance of any false rejection in the family at most alpha. NaN counts as 1."""
    values = [1.0 if math.isnan(p) else float(p) for p in p_values]
    adjusted = [1.0] * len(values)
    running = 0.0
    for rank, index in enumerate(sorted(range(len(values)), key=values.__getitem__)):
        running = max(running, min(1.0, (len(values) - rank) * values[index]))
        adjusted[index] = running
    return adjusted


# --- SFS / TFS outcome ---------------------------------------------------------------------------

OUTCOME_PARTS = ("score_sfs", "score_tfs", "gap", "advantage_sfs", "deficit_tfs")


def sfs_outcome(bootstrap: PairedBootstrap, model: np.ndarray, teacher: np.ndarray,
                sfs: np.ndarray) -> dict[str, Interval]:
    """A model's per-row value (n, R) against T*'s (n,) on a fixed SFS/TFS split of the rows.

    ``score_sfs`` / ``score_tfs``: the model's mean on each side; ``gap`` = mean(model - T*) =
    ``advantage_sfs`` + ``deficit_tfs`` (:func:`decompose_gap`: share_SFS * mean_SFS(d)
    and share_TFS * mean_TFS(d), signed model minus T*). Each with its paired interval; the
    identity holds on every resample too (both terms are means of d restricted to one side).
    """
    model = np.asarray(model, dtype=np.float64)
    teacher = np.asarray(teacher, dtype=np.float64).reshape(-1)
    sfs = np.asarray(sfs, dtype=bool)
    parts = [decompose_gap(model[:, s], teacher, sfs) for s in range(model.shape[1])]
    side_mean = lambda mask, seed: float(model[mask, seed].mean()) if mask.any() else math.nan  # noqa: E731
    estimates = {
        "score_sfs": float(np.mean([side_mean(sfs, s) for s in range(model.shape[1])])),
        "score_tfs": float(np.mean([side_mean(~sfs, s) for s in range(model.shape[1])])),
        **{key: float(np.mean([p[key] for p in parts])) for key in ("gap", "advantage_sfs", "deficit_tfs")},
    }
    counts = bootstrap.counts
    delta = model - teacher[:, None]
    n = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_seed = {
            "score_sfs": (counts[:, sfs] @ model[sfs]) / counts[:, sfs].sum(axis=1, keepdims=True),
            "score_tfs": (counts[:, ~sfs] @ model[~sfs]) / counts[:, ~sfs].sum(axis=1, keepdims=True),
            "advantage_sfs": (counts[:, sfs] @ delta[sfs]) / n,
            "deficit_tfs": (counts[:, ~sfs] @ delta[~sfs]) / n,
        }
    per_seed["gap"] = per_seed["advantage_sfs"] + per_seed["deficit_tfs"]
    # A resample with no row on one side has no score there (NaN, left out of its interval).
    return {key: bootstrap.interval(estimates[key], bootstrap.combine_seeds(per_seed[key]))
            for key in OUTCOME_PARTS}


def leave_one_out_side(groups: np.ndarray, favour: np.ndarray) -> np.ndarray:
    """Per row, student-favoured (True) iff the mean of ``favour`` over the *other* rows of its
    group (tag) is > 0; a row alone in its group has none: teacher-favoured, like a tie.

    ``favour`` is the SFT student's per-row edge over T* (score difference, or T*'s NLL minus the
    student's). A row's own outcomes never decide its side, so a comparison restricted to a side
    is not biased by the rows that put themselves there: on a split made from each row's own
    outcomes, the SFT student is right on every SFS row by construction.
    """
    groups = np.asarray(groups)
    favour = np.asarray(favour, dtype=np.float64)
    _, index = np.unique(groups, return_inverse=True)
    totals = np.bincount(index, weights=favour)
    counts = np.bincount(index)
    others = counts[index] - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_of_others = (totals[index] - favour) / others
    return (others > 0) & (mean_of_others > 0)


# --- power: test rows and seeds a difference needs ------------------------------------------------

def _z_total(alpha: float, power: float) -> float:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha {alpha} and power {power} must lie strictly between 0 and 1")
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)


def accuracy_row_variance(discordance: float, delta: float) -> float:
    """Variance of the per-row paired accuracy difference (values -1, 0, +1) when the models
    disagree in correctness on a share ``discordance`` of rows and differ by ``delta``."""
    if not abs(delta) <= discordance <= 1:
        raise ValueError(f"discordance {discordance} must lie in [|delta|, 1] (delta {delta})")
    return discordance - delta ** 2


def required_test_size(delta: float, row_variance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Test rows n so that a true paired difference ``delta`` is resolved (its 1 - alpha interval
    excludes 0) with probability ``power``: n = (z_{1-alpha/2} + z_power)^2 row_variance / delta^2."""
    if delta == 0:
        raise ValueError("delta must be non-zero")
    return max(1, math.ceil(_z_total(alpha, power) ** 2 * row_variance / delta ** 2))


def required_replicates(delta: float, row_variance: float, seed_variance: float, n: int,
                        alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Seeds per method R so that the difference of two methods' seed means resolves ``delta``:
    Var = row_variance / n + 2 seed_variance / R. None when the test-row term alone is too large
    (no number of seeds helps: more test rows are needed)."""
    if delta == 0:
        raise ValueError("delta must be non-zero")
    budget = (delta / _z_total(alpha, power)) ** 2 - row_variance / n
    if budget <= 0:
        return None
    if seed_variance <= 0:
        return 1
    return max(1, math.ceil(2 * seed_variance / budget))


def paired_row_variance(a: np.ndarray, b: np.ndarray) -> float:
    """Population variance over rows of the per-row difference a - b (seed means per row)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1).mean(axis=1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1).mean(axis=1)
    return float(np.var(a - b))
