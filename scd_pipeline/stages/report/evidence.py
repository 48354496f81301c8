"""The evidence behind the report's numbers, read from ``eval/{name}.predictions.parquet``.

Every evaluated model (one prediction file per replicate seed) becomes per-row arrays on the test
rows (:class:`scd_pipeline.math.stats.SampleScores`, rows in one fixed order), and one seeded paired
bootstrap (:class:`scd_pipeline.math.stats.PairedBootstrap`) gives, for every model, every metric's
interval, every difference to the reference models (T*, the SFT student, TD), per-tag
intervals, the SFS/TFS outcome and how many test rows / seeds a target difference needs.

Per-row values: ``score`` (1/0 for a choice task, the document's exact F1 for a list task: the
mean is accuracy resp. exact F1), the per-sample mean gold NLL ``-gold_logprob / gold_tokens``
(metric ``loss``), partial F1 per document (list tasks), and gold / predicted letters (kappa and
macro-F1, recomputed on every resample).

SFS/TFS on the test split (SPEC 4.2): a row is student-favoured by NLL iff the SFT student's
per-sample NLL < T*'s (ties teacher-favoured), and by correctness iff the SFT student's score >
T*'s (so a row both get right, or both wrong, is teacher-favoured). Each model's outcome is its
score on each side and R(M) - R(T*) = advantage(SFS) + deficit(TFS) in score (signed model minus
T*: a positive SFS term is an advantage kept, a negative TFS term a deficit left).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from scd_pipeline.errors import DataError
from scd_pipeline.math.metrics import partial_f1_document
from scd_pipeline.math.stats import (
    OUTCOME_PARTS,
    Interval,
    MetricEvidence,
    PairedBootstrap,
    SampleScores,
    bootstrap_seed,
    difference,
    holm_adjusted,
    leave_one_out_side,
    metric_evidence,
    paired_p_value,
    paired_row_variance,
    required_replicates,
    required_test_size,
    sfs_outcome,
)

PREDICTION_REQUIRED = ("sample_id", "tag", "gold", "prediction")
PARTITIONS = {"nll": "per-sample NLL: SFT student < T*", "correct": "correctness: SFT student's score > T*'s"}
# The side decided without the row's own outcomes: by the other test rows of its tag.
HELD_OUT_PARTITION = "tag"
HELD_OUT_RULE = "the other test rows of its tag: the SFT student's mean score above T*'s (the row itself left out)"


def score_metric(kind: str) -> str:
    """The metric that is the mean of the per-row ``score``: accuracy, or exact F1 for lists."""
    return "accuracy" if kind == "choice" else "exact_f1"


# --- reading predictions -------------------------------------------------------------------------

def read_predictions(path: Path) -> pd.DataFrame:
    """An ``eval/{name}.predictions.parquet``; a one-line DataError if it is not one."""
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable predictions file ({exc.__class__.__name__}); "
                        "re-run `scd-pipeline evaluate` for it") from exc
    missing = [c for c in PREDICTION_REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: predictions without column(s) {', '.join(missing)}; re-run "
                        "`scd-pipeline evaluate` for it")
    if not frame["sample_id"].is_unique:
        raise DataError(f"{path}: a sample_id occurs twice; re-run `scd-pipeline evaluate` for it")
    return frame


def _row_scores(frame: pd.DataFrame, kind: str) -> np.ndarray:
    """Per-row task score: the ``score`` column, else recomputed (older prediction files)."""
    if "score" in frame.columns:
        return frame["score"].to_numpy(np.float64)
    if kind == "choice":
        return (frame["gold"].astype(str) == frame["prediction"].astype(str)).to_numpy(np.float64)
    from scd_pipeline.math.metrics import exact_f1_document

    return np.array([exact_f1_document(json.loads(g), json.loads(p))
                     for g, p in zip(frame["gold"], frame["prediction"], strict=True)], dtype=np.float64)


def _row_nll(frame: pd.DataFrame) -> np.ndarray | None:
    if not {"gold_logprob", "gold_tokens"} <= set(frame.columns):
        return None
    tokens = frame["gold_tokens"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tokens > 0, -frame["gold_logprob"].to_numpy(np.float64) / tokens, np.nan)


def sample_scores(frames: Sequence[pd.DataFrame], kind: str, categories: Sequence[str],
                  kappa_weights: str) -> SampleScores:
    """Per-row arrays of one model, one column per frame (seed); frames already row-aligned."""
    per_row = {score_metric(kind): np.stack([_row_scores(f, kind) for f in frames], axis=1)}
    nll = [_row_nll(f) for f in frames]
    if all(v is not None for v in nll):
        per_row["loss"] = np.stack(nll, axis=1)
    if kind == "list":
        per_row["partial_f1"] = np.stack([
            np.array([partial_f1_document(json.loads(g), json.loads(p))
                      for g, p in zip(f["gold"], f["prediction"], strict=True)], dtype=np.float64)
            for f in frames], axis=1)
        return SampleScores(per_row)
    if not categories:  # an evaluation that did not record them: the letters seen, in order
        categories = sorted({str(v) for f in frames for v in (*f["gold"], *f["prediction"])})
    position = {letter: i for i, letter in enumerate(categories)}
    unknown = sorted({str(v) for f in frames for v in (*f["gold"], *f["prediction"])} - set(position))
    if unknown:
        raise DataError(f"predictions hold labels {unknown} outside the categories {list(categories)}; "
                        "re-run `scd-pipeline evaluate`")
    gold = frames[0]["gold"].astype(str).map(position).to_numpy()
    pred = np.stack([f["prediction"].astype(str).map(position).to_numpy() for f in frames], axis=1)
    return SampleScores(per_row, gold=gold, pred=pred, n_categories=len(categories),
                        kappa_weights=kappa_weights)


# --- the evidence of one task ---------------------------------------------------------------------

@dataclass
class EvaluatedModel:
    """What the evidence needs to know about one report row."""

    key: str                  # unique: the row's eval name
    label: str
    role: str                 # teacher | sft | distilled | other
    eval_names: list[str]     # one per seed (one entry when not replicated)
    categories: list[str]
    kappa_weights: str
    method: str | None = None  # the method string of a distilled row (td, scd_aw, ...)


@dataclass
class TaskEvidence:
    task: str
    kind: str
    sample_ids: list[str]
    tags: np.ndarray
    bootstrap: PairedBootstrap
    models: dict[str, EvaluatedModel] = field(default_factory=dict)
    scores: dict[str, SampleScores] = field(default_factory=dict)
    metrics: dict[str, dict[str, MetricEvidence]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it has no intervals

    @property
    def n(self) -> int:
        return len(self.sample_ids)

    def interval(self, key: str, metric: str) -> Interval | None:
        evidence = self.metrics.get(key, {}).get(metric)
        return evidence.interval if evidence is not None else None


def gather_evidence(eval_dir: Path, models: Sequence[EvaluatedModel], kind: str, metrics: Sequence[str],
                    task: str, seed: int, resamples: int, confidence: float,
                    reference: str | None = None) -> TaskEvidence | None:
    """Read every model's predictions and bootstrap every metric; None when no model has any.

    The row order is that of ``reference`` (T*), else of the first model with predictions; a
    model whose prediction files are missing or hold other rows is left out (``skipped``).
    """
    frames: dict[str, list[pd.DataFrame]] = {}
    skipped: dict[str, str] = {}
    for model in models:
        paths = [eval_dir / f"{name}.predictions.parquet" for name in model.eval_names]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            skipped[model.key] = (f"{absent[0]} not found (re-run `scd-pipeline evaluate` for it: "
                                  "the evaluation predates per-row predictions)")
            continue
        frames[model.key] = [read_predictions(p) for p in paths]
    if not frames:
        return None
    order_key = reference if reference in frames else next(iter(frames))
    base = frames[order_key][0]
    base_file = f"eval/{next(m for m in models if m.key == order_key).eval_names[0]}.predictions.parquet"
    order = base["sample_id"].astype(str).tolist()
    expected = set(order)
    evidence = TaskEvidence(task, kind, order, base["tag"].astype(str).to_numpy(),
                            PairedBootstrap(len(order), resamples, bootstrap_seed(seed, task), confidence),
                            skipped=skipped)
    for model in models:
        if model.key not in frames:
            continue
        aligned = []
        for name, frame in zip(model.eval_names, frames[model.key], strict=True):
            if set(frame["sample_id"].astype(str)) != expected:
                skipped[model.key] = (f"eval/{name}.predictions.parquet holds other test rows than "
                                      f"{base_file} (another split or data); no intervals for it")
                break
            aligned.append(frame.set_index(frame["sample_id"].astype(str)).loc[order].reset_index(drop=True))
        else:
            scores = sample_scores(aligned, kind, model.categories, model.kappa_weights)
            evidence.models[model.key] = model
            evidence.scores[model.key] = scores
            evidence.metrics[model.key] = {m: metric_evidence(evidence.bootstrap, scores, m)
                                           for m in (*metrics, "loss") if m in scores.metrics()}
    return evidence


# --- differences ---------------------------------------------------------------------------------

REFERENCES = ("teacher", "sft", "td")  # T*, the SFT student, TD
REFERENCE_LABELS = {"teacher": "T*", "sft": "SFT student", "td": "TD"}


def reference_keys(evidence: TaskEvidence) -> dict[str, str]:
    """{reference: model key} for the references that have evidence."""
    found = {}
    for key, model in evidence.models.items():
        if model.role == "teacher":
            found.setdefault("teacher", key)
        elif model.role == "sft":
            found.setdefault("sft", key)
        elif model.role == "distilled" and model.method == "td":
            found.setdefault("td", key)
    return found


def comparisons(evidence: TaskEvidence) -> list[tuple[str, str, str]]:
    """(model key, reference name, reference key) for every difference the report shows: every
    non-teacher model vs T*, every distilled / other model vs the SFT student, every other
    distilled model vs TD."""
    references = reference_keys(evidence)
    pairs = []
    for key, model in evidence.models.items():
        if model.role in ("teacher", "checkpoint"):
            continue
        for name in REFERENCES:
            ref = references.get(name)
            if ref is None or ref == key or (name == "td" and model.role != "distilled"):
                continue
            if name == "sft" and model.role == "sft":
                continue
            pairs.append((key, name, ref))
    return pairs


CONFIRMATORY_REFERENCES = ("sft", "td")  # the family: each distilled method vs these, primary metric
DIFFERENCE_COLUMNS = ["key", "reference", "metric", "estimate", "low", "high", "p", "family", "p_adjusted",
                      "resolved"]


def differences_frame(evidence: TaskEvidence, metrics: Sequence[str], primary: str) -> pd.DataFrame:
    """Long table: model key, reference, metric, estimate, interval, p, family, adjusted p, resolved.

    One confirmatory family, named before the data are seen: the ``primary`` metric, every
    distilled model against the SFT student and against TD. Its p-values
    (:func:`stats.paired_p_value`: exact on the discordant rows for one-seed accuracy, else the
    paired bootstrap's, and with seeds on both sides at least the t test's over the seed-paired
    differences) are Holm-adjusted, and a difference is resolved when its adjusted p is
    below 1 - confidence: the chance that any of them is called when nothing differs stays at most
    that. Every other difference (other metrics, against T*, other models) is exploratory: resolved
    on its own p, a screen for what to test next, not a finding.
    """
    alpha = 1.0 - evidence.bootstrap.confidence
    records = []
    for key, name, ref in comparisons(evidence):
        for metric in metrics:
            a, b = evidence.metrics.get(key, {}).get(metric), evidence.metrics.get(ref, {}).get(metric)
            if a is None or b is None:
                continue
            interval = difference(evidence.bootstrap, a, b)
            p = paired_p_value(evidence.scores[key], evidence.scores[ref], metric, a.draws - b.draws, (a, b),
                               evidence.bootstrap.confidence)
            confirmatory = (metric == primary and name in CONFIRMATORY_REFERENCES
                            and evidence.models[key].role == "distilled")
            records.append({"key": key, "reference": name, "metric": metric, "estimate": interval.estimate,
                            "low": interval.low, "high": interval.high, "p": p,
                            "family": "confirmatory" if confirmatory else "exploratory"})
    frame = pd.DataFrame.from_records(records, columns=DIFFERENCE_COLUMNS[:-2])
    frame["p_adjusted"] = frame["p"].astype(float)
    family = frame["family"] == "confirmatory"
    if family.any():
        frame.loc[family, "p_adjusted"] = holm_adjusted(frame.loc[family, "p"].astype(float).tolist())
    frame["resolved"] = (frame["p_adjusted"] < alpha).astype(bool)
    return frame[DIFFERENCE_COLUMNS]


# --- per tag -------------------------------------------------------------------------------------

def tag_intervals(evidence: TaskEvidence, metric: str, seed: int) -> tuple[dict[str, dict[str, Interval]], dict[str, int]]:
    """{tag: {model key: interval of ``metric`` on that tag's rows}} and the tags' sizes.

    Each tag has its own seeded bootstrap over its rows (shared by all models), so a tag's
    interval is that of a test set of the tag's size.
    """
    out: dict[str, dict[str, Interval]] = {}
    sizes: dict[str, int] = {}
    for tag in sorted(set(evidence.tags)):
        mask = evidence.tags == tag
        sizes[tag] = int(mask.sum())
        bootstrap = PairedBootstrap(sizes[tag], evidence.bootstrap.resamples,
                                    bootstrap_seed(seed, f"{evidence.task}/tag/{tag}"),
                                    evidence.bootstrap.confidence)
        out[tag] = {}
        for key, scores in evidence.scores.items():
            if metric not in scores.metrics():
                continue
            subset = subset_scores(scores, mask)
            out[tag][key] = metric_evidence(bootstrap, subset, metric).interval
    return out, sizes


def subset_scores(scores: SampleScores, mask: np.ndarray) -> SampleScores:
    """The same model on the rows where ``mask`` is true."""
    return SampleScores({m: v[mask] for m, v in scores.per_row.items()},
                        gold=None if scores.gold is None else scores.gold[mask],
                        pred=None if scores.pred is None else scores.pred[mask],
                        n_categories=scores.n_categories, kappa_weights=scores.kappa_weights)


# --- SFS / TFS outcome on the test split ----------------------------------------------------------

def sfs_partitions(evidence: TaskEvidence) -> dict[str, np.ndarray]:
    """{"nll": sfs mask, "correct": sfs mask} from the SFT student and T* (each needs both models;
    "nll" needs their gold NLL)."""
    references = reference_keys(evidence)
    teacher, sft = references.get("teacher"), references.get("sft")
    if teacher is None or sft is None:
        return {}
    score = score_metric(evidence.kind)
    t_scores, s_scores = evidence.scores[teacher], evidence.scores[sft]
    out = {}
    if "loss" in t_scores.per_row and "loss" in s_scores.per_row:
        out["nll"] = s_scores.per_row["loss"][:, 0] < t_scores.per_row["loss"][:, 0]
    out["correct"] = s_scores.per_row[score][:, 0] > t_scores.per_row[score][:, 0]
    out[HELD_OUT_PARTITION] = leave_one_out_side(evidence.tags, s_scores.per_row[score].mean(axis=1)
                                                 - t_scores.per_row[score][:, 0])
    return out


OUTCOME_COLUMNS = ["key", "versus", "partition", "tag", "sfs_rows", "tfs_rows", "quantity", "part", "estimate",
                   "low", "high", "resolved"]
VERSUS_PARTS = ("gap", "advantage_sfs", "deficit_tfs")  # a method's parts minus a reference's


def outcome_frame(evidence: TaskEvidence, seed: int) -> pd.DataFrame:
    """Long table of every model's SFS/TFS outcome against T* (``versus`` "teacher", descriptive):
    per partition (nll, correct: in-sample; tag: held out), over all rows and per tag, for the
    per-row score (and, on the NLL partition, the NLL itself). On the held-out partition also
    every distilled method's parts minus TD's and minus the SFT student's (``versus`` "td" /
    "sft"; the paper's claim is about these: SCD shrinks the TFS deficit, AW keeps the SFS
    advantage), exploratory: ``resolved`` when the interval excludes 0."""
    partitions = sfs_partitions(evidence)
    references = reference_keys(evidence)
    teacher = references.get("teacher")
    if not partitions or teacher is None:
        return pd.DataFrame(columns=OUTCOME_COLUMNS)
    score = score_metric(evidence.kind)
    records = []
    groups = [("all", np.ones(evidence.n, dtype=bool))] + [(t, evidence.tags == t) for t in sorted(set(evidence.tags))]
    for partition, sfs in partitions.items():
        quantities = [("score", score)] + ([("nll", "loss")] if partition == "nll" else [])
        for versus in ("td", "sft"):
            if partition != HELD_OUT_PARTITION or versus not in references:
                continue
            reference = evidence.scores[references[versus]].per_row[score].mean(axis=1)
            for key, scores in evidence.scores.items():
                if evidence.models[key].role != "distilled" or key == references[versus]:
                    continue
                parts = sfs_outcome(evidence.bootstrap, scores.per_row[score], reference, sfs)
                for part in VERSUS_PARTS:
                    interval = parts[part]
                    records.append({"key": key, "versus": versus, "partition": partition, "tag": "all",
                                    "sfs_rows": int(sfs.sum()), "tfs_rows": int((~sfs).sum()), "quantity": "score",
                                    "part": part, "estimate": interval.estimate, "low": interval.low,
                                    "high": interval.high, "resolved": interval.excludes_zero})
        for tag, mask in groups:
            if partition == HELD_OUT_PARTITION and tag != "all":
                continue  # every row of a tag is on one side of this split
            bootstrap = evidence.bootstrap if tag == "all" else PairedBootstrap(
                int(mask.sum()), evidence.bootstrap.resamples,
                bootstrap_seed(seed, f"{evidence.task}/tag/{tag}"), evidence.bootstrap.confidence)
            for quantity, metric in quantities:
                teacher_values = evidence.scores[teacher].per_row[metric][mask, 0]
                for key, scores in evidence.scores.items():
                    if metric not in scores.per_row or evidence.models[key].role == "checkpoint":
                        continue
                    parts = sfs_outcome(bootstrap, scores.per_row[metric][mask], teacher_values, sfs[mask])
                    for part in OUTCOME_PARTS:
                        interval = parts[part]
                        records.append({"key": key, "versus": "teacher", "partition": partition, "tag": tag,
                                        "sfs_rows": int(sfs[mask].sum()), "tfs_rows": int((~sfs[mask]).sum()),
                                        "quantity": quantity, "part": part, "estimate": interval.estimate,
                                        "low": interval.low, "high": interval.high,
                                        "resolved": None})  # descriptive: no part is tested
    return pd.DataFrame.from_records(records, columns=OUTCOME_COLUMNS)


# --- resolution: test rows / seeds a target difference needs --------------------------------------

@dataclass
class Resolution:
    metric: str
    target: float
    power: float
    confidence: float
    n: int
    pairs: int                  # student pairs the row variance was measured on
    row_variance: float         # median over those pairs of the per-row paired variance
    required_rows: int | None
    seeds: int                  # replicate count of the replicated students (1 if none)
    seed_variance: float | None  # median over replicated students of the metric's variance over seeds
    required_seeds: int | None  # at the current n; None when no seed count suffices
    # required_rows is None when the students agree on every row: not estimable


def resolution(evidence: TaskEvidence, metric: str, target: float, power: float) -> Resolution | None:
    """How many test rows (and seeds) resolve a difference of ``target`` in ``metric`` between two
    students with probability ``power``, at the observed per-row disagreement between students.
    ``metric`` must be a mean over rows (accuracy, exact F1); None with fewer than two students."""
    keys = [k for k, m in evidence.models.items() if m.role in ("sft", "distilled")
            and metric in evidence.scores[k].per_row]
    if len(keys) < 2:
        return None
    variances = [paired_row_variance(evidence.scores[a].per_row[metric], evidence.scores[b].per_row[metric])
                 for a, b in combinations(keys, 2)]
    row_variance = float(np.median(variances))
    alpha = 1.0 - evidence.bootstrap.confidence
    replicated = [evidence.metrics[k][metric].per_seed for k in keys if evidence.scores[k].n_seeds > 1]
    seeds = max((len(v) for v in replicated), default=1)
    seed_variance = float(np.median([np.var(v, ddof=1) for v in replicated])) if replicated else None
    required_seeds = (required_replicates(target, row_variance, seed_variance, evidence.n, alpha, power)
                      if seed_variance is not None else None)
    return Resolution(metric, target, power, evidence.bootstrap.confidence, evidence.n, len(variances),
                      row_variance, required_test_size(target, row_variance, alpha, power) if row_variance > 0 else None,
                      seeds, seed_variance, required_seeds)
