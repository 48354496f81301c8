"""Task metrics: accuracy, Cohen's kappa, macro-F1 (choice tasks); exact and partial F1 (lists).

All functions are pure and work on plain Python sequences, so each is checked by hand on a tiny
case. Choice labels are option letters; ``categories`` gives their order (needed by the
linear-weighted kappa of ordered tasks such as demo and crade).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from scd_pipeline.errors import ConfigError

# Tasks whose option letters are ordered grades: kappa is linear-weighted there.
ORDERED_TASKS = frozenset({"demo", "crade"})
CHOICE_METRICS = ("accuracy", "kappa", "macro_f1")
LIST_METRICS = ("exact_f1", "partial_f1")


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Share of samples whose prediction equals the gold label."""
    _check_lengths(gold, pred)
    if not gold:
        return float("nan")
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def cohen_kappa(gold: Sequence[str], pred: Sequence[str], categories: Sequence[str],
                weights: str = "none") -> float:
    """Cohen's kappa: 1 - sum(W * observed) / sum(W * expected-by-chance).

    ``weights="none"``: W = 1 off the diagonal (plain kappa). ``weights="linear"``: W[i, j] =
    |i - j| / (K - 1) over the order of ``categories`` (ordered grades). When chance disagreement
    is zero (both sides always give one and the same label) the raters agree perfectly: 1.0.
    """
    _check_lengths(gold, pred)
    if not gold:
        return float("nan")
    position = {label: i for i, label in enumerate(categories)}
    unknown = sorted({label for label in (*gold, *pred) if label not in position})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the categories {list(categories)}")
    size = len(categories)
    observed = np.zeros((size, size))
    for g, p in zip(gold, pred, strict=True):
        observed[position[g], position[p]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    index = np.arange(size)
    if weights == "linear":
        weight = np.abs(index[:, None] - index[None, :]) / max(size - 1, 1)
    elif weights == "none":
        weight = (index[:, None] != index[None, :]).astype(float)
    else:
        raise ValueError(f"kappa weights {weights!r}: expected 'none' or 'linear'")
    chance = float((weight * expected).sum())
    if chance == 0.0:
        return 1.0
    return 1.0 - float((weight * observed).sum()) / chance


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean over labels of F1 = 2TP / (2TP + FP + FN).

    Averaged over the labels that occur in gold or prediction (a label never seen on either side
    has no F1), as scikit-learn does by default.
    """
    _check_lengths(gold, pred)
    labels = sorted(set(gold) | set(pred))
    if not labels:
        return float("nan")
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _normalise(items: Iterable[str]) -> set[str]:
    """Strip whitespace and drop empty strings; lists are compared as sets."""
    return {text.strip() for text in items if text.strip()}


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def exact_f1_document(gold: Iterable[str], pred: Iterable[str]) -> float:
    """F1 between two sets of strings on one document, counting only exact (stripped) matches.

    Both empty: 1.0 (nothing to find, nothing claimed). One side empty: 0.0.
    """
    gold_set, pred_set = _normalise(gold), _normalise(pred)
    if not gold_set and not pred_set:
        return 1.0
    if not gold_set or not pred_set:
        return 0.0
    hits = len(gold_set & pred_set)
    return _f1(hits / len(pred_set), hits / len(gold_set))


def partial_match(a: str, b: str) -> bool:
    """Partial-match rule: two strings match if either is a substring of the other."""
    return a in b or b in a


def partial_f1_document(gold: Iterable[str], pred: Iterable[str]) -> float:
    """F1 on one document where a string matches if it overlaps a string on the other side.

    Precision: share of predicted strings that are a substring of, or contain, some gold string.
    Recall: share of gold strings that are a substring of, or contain, some predicted string.
    Empty sides as in ``exact_f1_document``.
    """
    gold_set, pred_set = _normalise(gold), _normalise(pred)
    if not gold_set and not pred_set:
        return 1.0
    if not gold_set or not pred_set:
        return 0.0
    precision = sum(any(partial_match(p, g) for g in gold_set) for p in pred_set) / len(pred_set)
    recall = sum(any(partial_match(g, p) for p in pred_set) for g in gold_set) / len(gold_set)
    return _f1(precision, recall)


def exact_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Exact-match F1 averaged over documents."""
    _check_lengths(gold, pred)
    if not gold:
        return float("nan")
    return float(np.mean([exact_f1_document(g, p) for g, p in zip(gold, pred, strict=True)]))


def partial_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Partial-match F1 (see ``partial_f1_document``) averaged over documents."""
    _check_lengths(gold, pred)
    if not gold:
        return float("nan")
    return float(np.mean([partial_f1_document(g, p) for g, p in zip(gold, pred, strict=True)]))


def kappa_weights(task: str) -> str:
    """'linear' for tasks with ordered grades (demo, crade), else 'none'."""
    return "linear" if task in ORDERED_TASKS else "none"


def choice_metrics(gold: Sequence[str], pred: Sequence[str], categories: Sequence[str],
                   weights: str = "none") -> dict[str, float]:
    """Accuracy, Cohen's kappa (with ``weights``) and macro-F1 of letter predictions."""
    return {"accuracy": accuracy(gold, pred),
            "kappa": cohen_kappa(gold, pred, categories, weights),
            "macro_f1": macro_f1(gold, pred)}


def list_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact-match and partial-match F1 of extracted string lists, averaged per document."""
    return {"exact_f1": exact_f1(gold, pred), "partial_f1": partial_f1(gold, pred)}


def primary_metric(kind: str, requested: str = "auto") -> str:
    """The metric that ranks checkpoints: ``requested``, or accuracy (choice) / exact_f1 (list)."""
    allowed = CHOICE_METRICS if kind == "choice" else LIST_METRICS
    if requested == "auto":
        return allowed[0]
    if requested not in allowed:
        raise ConfigError(f"config key sft.val_metric: {requested!r} does not apply to {kind} tasks "
                          f"(use auto or one of {', '.join(allowed)})")
    return requested


def _check_lengths(gold: Sequence, pred: Sequence) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
