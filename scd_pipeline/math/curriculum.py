"""The IOA curriculum's decisions as small pure functions (SPEC 4.6; arXiv 2602.12172).

IOA has three parts; the stages ``ioa-plan``, ``synthesize`` and ``distill`` call these:

- **Knowledge modules** (:func:`assign_modules`): a task's tags; a task with fewer than two tags
  gets difficulty strata instead, three quantile bins of T*'s per-sample gold NLL
  (introductory / intermediate / advanced), whose edges are fixed once and written down.
- **Identifier** (:func:`identify`): per module the teacher's score P_T and the student's P_S;
  gap Δ = (P_T - P_S) / P_T (0 when P_T = 0); deficient when Δ > τ_gap; severity
  w·Δ + (1 - w)·dependency (w = 0.7). Dependency strength is IOA's conditional-performance
  measure over a sequence of student states (:func:`dependency_strength`); where no states are
  known yet it is 0, and the artifacts say so.
- **Organizer** (:func:`organize`): modules ordered easiest first (by P_T, then P_S); adjacent
  modules whose P_S lie within the zone of proximal development of the stage's mean
  (|P_S - mean| <= τ_zpd · mean) are *merged* into one stage; a stage whose mean P_S drops below
  the previous stage's by more than τ_zpd · that mean is *split* once into an easier and a harder
  half of its rows (by T*'s NLL), when each half keeps enough validation rows to be scored.
  The **mastery gate** (:func:`mastery_decision`): after each pass the student advances when the
  lowest P_S / P_T of the stage's modules is >= τ_mastery, else it gets a remedial round, at
  most ``max_remedial`` per stage, after which it advances unmastered (recorded as such).
- **Adapter** checks (:func:`ngram_containment`): a synthetic item is a near-duplicate of a text
  when most of its word n-grams occur in that text.

Scores are the task metric at sample level (``scoring.sample_score``): accuracy for letters,
exact-match F1 for lists, the same numbers evaluation reports.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

STRATA_NAMES = ("introductory", "intermediate", "advanced")
EASIER, HARDER = "easier", "harder"
ADVANCE, REMEDIAL, ADVANCE_UNMASTERED = "advance", "remedial", "advance_unmastered"
# Scores are shares of a few validation rows: (0.5 - 0.35) / 0.5 is 0.30000000000000004 in floats,
# exactly tau_gap in the rows it counts. Comparisons with a threshold allow for that rounding.
GAP_TOLERANCE = 1e-9


# --- knowledge modules --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleAssignment:
    """Each row's module and how the modules were made (``tag`` or ``strata`` with its edges)."""

    modules: list[str]
    basis: str                       # "tag" | "strata"
    edges: list[float] | None = None  # strata: NLL quantile edges between the bins


def strata_edges(nll: Sequence[float], bins: int = 3) -> list[float]:
    """Inner quantile edges of ``bins`` equal-count bins of the NLLs (``bins - 1`` values)."""
    values = np.asarray(nll, dtype=np.float64)
    if values.size == 0:
        return []
    return [float(np.quantile(values, q / bins)) for q in range(1, bins)]


def stratum_of(nll: float, edges: Sequence[float]) -> str:
    """The difficulty stratum of one NLL: the bin whose upper edge is the first edge >= it."""
    names = STRATA_NAMES if len(edges) == 2 else tuple(f"stratum-{i + 1}" for i in range(len(edges) + 1))
    for index, edge in enumerate(edges):
        if nll <= edge:
            return names[index]
    return names[len(edges)]


def assign_modules(tags: Sequence[str], nll: Sequence[float], edges: Sequence[float] | None = None,
                   bins: int = 3) -> ModuleAssignment:
    """Modules of rows: their tags when the task has two or more, else NLL strata.

    ``edges`` fixes the strata (computed once on the training rows, then reused for validation and
    synthetic rows); when None they are computed from ``nll``.
    """
    distinct = sorted(set(map(str, tags)))
    if len(distinct) >= 2:
        return ModuleAssignment([str(t) for t in tags], "tag")
    edges = list(edges) if edges is not None else strata_edges(nll, bins)
    return ModuleAssignment([stratum_of(float(v), edges) for v in nll], "strata", edges)


# --- identifier ---------------------------------------------------------------------------------

def relative_gap(teacher: float, student: float) -> float:
    """Δ = (P_T - P_S) / P_T; 0 when the teacher scores 0 (nothing to close)."""
    return 0.0 if teacher <= 0 else (teacher - student) / teacher


def mastery_ratio(teacher: float, student: float) -> float:
    """P_S / P_T; 1 when the teacher scores 0 (the student cannot be behind it)."""
    return 1.0 if teacher <= 0 else student / teacher


@dataclass(frozen=True)
class ModuleGap:
    module: str
    teacher: float        # P_T
    student: float        # P_S
    gap: float            # Δ
    dependency: float     # mean dependency strength with its neighbours (0 when unmeasured)
    severity: float
    deficient: bool


def identify(teacher: Mapping[str, float], student: Mapping[str, float], tau_gap: float = 0.3,
             gap_weight: float = 0.7, dependency: Mapping[str, float] | None = None) -> list[ModuleGap]:
    """Per module Δ, severity = gap_weight·Δ + (1 - gap_weight)·dependency, and whether Δ > τ_gap;
    sorted by severity (highest first), ties by name."""
    dependency = dependency or {}
    gaps = []
    for module in sorted(teacher):
        gap = relative_gap(teacher[module], student[module])
        strength = float(dependency.get(module, 0.0))
        gaps.append(ModuleGap(module, float(teacher[module]), float(student[module]), gap, strength,
                              gap_weight * gap + (1 - gap_weight) * strength, gap > tau_gap + GAP_TOLERANCE))
    return sorted(gaps, key=lambda g: (-g.severity, g.module))


def dependency_strength(prerequisite: Sequence[float], dependent: Sequence[float],
                        prerequisite_teacher: float, tau_high: float = 0.9, tau_low: float = 0.7,
                        eps: float = 1e-8) -> float | None:
    """IOA's dependency of module j on module i over a sequence of student states:

    [P_S(j | r_i >= τ_high) - P_S(j | r_i < τ_low)] / (P_S(j | r_i >= τ_high) + ε), with
    r_i = P_S(i) / P_T(i) in each state and P_S(j | ...) the mean of j's score over the states
    meeting the condition. None when no state has r_i >= τ_high or none has r_i < τ_low (the
    states carry no information on the dependency). Clipped at 0 below (a module never hurts).
    """
    ratios = [mastery_ratio(prerequisite_teacher, p) for p in prerequisite]
    high = [d for r, d in zip(ratios, dependent, strict=True) if r >= tau_high]
    low = [d for r, d in zip(ratios, dependent, strict=True) if r < tau_low]
    if not high or not low:
        return None
    mastered, unmastered = float(np.mean(high)), float(np.mean(low))
    return max(0.0, (mastered - unmastered) / (mastered + eps))


# --- organizer ----------------------------------------------------------------------------------

@dataclass
class PlannedModule:
    """A module (or half of one, after a split) as the organizer sees it."""

    name: str
    teacher: float                   # P_T on its validation rows
    student: float                   # P_S (the SFT student) on its validation rows
    val_rows: int
    parent: str | None = None        # the module it was split from
    part: str | None = None          # easier | harder


@dataclass
class Stage:
    modules: list[PlannedModule]
    split_from: list[str] = field(default_factory=list)

    @property
    def mean_student(self) -> float:
        return float(np.mean([m.student for m in self.modules]))

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]


def within_zpd(reference: float, value: float, tau_zpd: float) -> bool:
    """|value - reference| <= τ_zpd · reference (a reference of 0 admits only 0)."""
    return abs(value - reference) <= tau_zpd * reference + 1e-12


def merge_stages(modules: Sequence[PlannedModule], tau_zpd: float) -> list[Stage]:
    """Modules easiest first (P_T, then P_S, descending; ties by name), adjacent ones merged while
    their P_S lies within the ZPD of the current stage's mean."""
    ordered = sorted(modules, key=lambda m: (-m.teacher, -m.student, m.name))
    stages: list[Stage] = []
    for module in ordered:
        if stages and within_zpd(stages[-1].mean_student, module.student, tau_zpd):
            stages[-1].modules.append(module)
        else:
            stages.append(Stage([module]))
    return stages


def zpd_step_ok(previous: Stage, current: Stage, tau_zpd: float) -> bool:
    """The step in difficulty from ``previous`` to ``current``: mean P_S may drop by at most
    τ_zpd · previous mean (a rise is an easier stage, always admitted)."""
    return previous.mean_student - current.mean_student <= tau_zpd * previous.mean_student + 1e-12


def organize(modules: Sequence[PlannedModule], tau_zpd: float,
             halves: Mapping[str, tuple[PlannedModule, PlannedModule]] | None = None,
             min_split_rows: int = 8) -> list[Stage]:
    """Stages in increasing difficulty under the ZPD rule (see the module doc).

    ``halves`` gives, per module, its easier and harder half (scored on their own validation
    rows); a stage that steps too far from the one before is split once into a stage of its
    modules' easier halves followed by one of their harder halves, when every half has at least
    ``min_split_rows`` validation rows. Stages are never split twice; a step that remains too
    large is left as it is (``zpd_report`` lists it).
    """
    halves = halves or {}
    merged = merge_stages(modules, tau_zpd)
    stages: list[Stage] = []
    for stage in merged:
        if stages and not zpd_step_ok(stages[-1], stage, tau_zpd):
            pieces = [halves.get(m.name) for m in stage.modules]
            if all(p is not None and p[0].val_rows >= min_split_rows and p[1].val_rows >= min_split_rows
                   for p in pieces):
                names = stage.names
                stages.append(Stage([p[0] for p in pieces], split_from=names))
                stages.append(Stage([p[1] for p in pieces], split_from=names))
                continue
        stages.append(stage)
    return stages


def zpd_report(stages: Sequence[Stage], tau_zpd: float) -> list[dict]:
    """Per stage boundary: the mean P_S before and after, the allowed drop and whether it holds."""
    report = []
    for index in range(1, len(stages)):
        before, after = stages[index - 1].mean_student, stages[index].mean_student
        report.append({"from_stage": index, "to_stage": index + 1, "mean_student_before": before,
                       "mean_student_after": after, "allowed_drop": tau_zpd * before,
                       "within_zpd": zpd_step_ok(stages[index - 1], stages[index], tau_zpd)})
    return report


def mastered(ratio: float, tau_mastery: float) -> bool:
    """P_S / P_T reaches τ_mastery (up to float rounding of the row shares)."""
    return ratio >= tau_mastery - GAP_TOLERANCE


def mastery_decision(ratios: Mapping[str, float], tau_mastery: float, remedial_done: int,
                     max_remedial: int) -> str:
    """After a pass: ``advance`` when min P_S/P_T >= τ_mastery; else ``remedial`` while fewer than
    ``max_remedial`` remedial rounds were given in this stage; else ``advance_unmastered``."""
    if all(mastered(ratio, tau_mastery) for ratio in ratios.values()):
        return ADVANCE
    return REMEDIAL if remedial_done < max_remedial else ADVANCE_UNMASTERED


def gate(stage_units: Sequence[str], teacher: Mapping[str, float], student: Mapping[str, float],
         tau_mastery: float, remedial_done: int, max_remedial: int) -> tuple[dict[str, float], str, list[str]]:
    """The mastery gate after a pass: P_S / P_T of *every* unit of the stage (a remedial pass trains
    the weak units only, and a unit mastered before can slip meanwhile), the decision
    (:func:`mastery_decision`) and the units below mastery, which a remedial pass trains."""
    ratios = {u: mastery_ratio(teacher[u], student[u]) for u in stage_units}
    decision = mastery_decision(ratios, tau_mastery, remedial_done, max_remedial)
    return ratios, decision, sorted(u for u, r in ratios.items() if not mastered(r, tau_mastery))


def targeted(modules: Sequence[Mapping], share: float) -> list[str]:
    """The deficient modules the Adapter writes items for: the most severe ``share`` of them
    (at least one when any is deficient; IOA's authors take 25%), by severity, ties by name."""
    deficient = sorted((m for m in modules if m["deficient"]), key=lambda m: (-m["severity"], m["module"]))
    count = min(len(deficient), max(1, math.ceil(share * len(deficient) - GAP_TOLERANCE))) if deficient else 0
    return [m["module"] for m in deficient[:count]]


def fresh_remedial(items: int, max_remedial: int) -> int:
    """Remedial items one remedial round of a unit takes: its ``items`` spread over the
    ``max_remedial`` rounds it may need, at least one while it has any (``ceil(items / rounds)``)."""
    return math.ceil(items / max(1, max_remedial)) if items else 0


def replay_count(stage_rows: int, earlier_rows: int, share: float) -> int:
    """Rows of earlier stages replayed in a pass, so that they are ``share`` of the pass's rows:
    round(share / (1 - share) · stage_rows), at most the earlier rows available."""
    if share <= 0 or earlier_rows == 0:
        return 0
    return min(earlier_rows, int(round(share / (1.0 - share) * stage_rows)))


# --- adapter checks -----------------------------------------------------------------------------

def normalised_words(text: str) -> list[str]:
    """Lower-cased NFKC words (letters and digits; for text without spaces, e.g. Japanese, each
    character is a word)."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = re.findall(r"\w+", text)
    if len(words) <= 1 and len(text) > 1:  # unsegmented script
        words = [c for c in text if not c.isspace() and re.match(r"\w", c)]
    return words


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalised_words(text)
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_containment(item: str, reference: str, n: int) -> float:
    """Share of ``item``'s word n-grams that also occur in ``reference`` (0 for an empty item)."""
    mine = ngrams(item, n)
    if not mine:
        return 0.0
    return len(mine & ngrams(reference, n)) / len(mine)


class NgramIndex:
    """Max n-gram containment of an item in any of many reference texts, without comparing it to
    each: an inverted index from n-gram to the texts holding it."""

    def __init__(self, texts: Sequence[str], n: int) -> None:
        self.n = n
        self.size = 0
        self.index: dict[tuple[str, ...], list[int]] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        for gram in ngrams(text, self.n):
            self.index.setdefault(gram, []).append(self.size)
        self.size += 1

    def max_containment(self, item: str) -> float:
        mine = ngrams(item, self.n)
        if not mine:
            return 0.0
        hits: dict[int, int] = {}
        for gram in mine:
            for position in self.index.get(gram, ()):
                hits[position] = hits.get(position, 0) + 1
        return max(hits.values(), default=0) / len(mine)


def mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# --- the plan's rules for rows (shared by ioa-plan, synthesize and distill) -------------------------

def piece_name(module: str, part: str) -> str:
    return f"{module}/{part}"


def member_of(module: str, nll: float, split_nll: Mapping[str, float]) -> str:
    """The curriculum unit of a row: its module, or the module's easier / harder half when the
    plan split the module (at the median T* NLL of its training rows; ties go to the easier)."""
    if module not in split_nll:
        return module
    return piece_name(module, EASIER if nll <= split_nll[module] else HARDER)


def row_members(plan: Mapping, tags: Sequence[str], nll: Sequence[float]) -> list[str]:
    """Curriculum unit (module or half) of each row, by the plan's fixed rules: the module is the
    row's tag (or its stratum of the plan's NLL edges), halved where the plan split the module."""
    nll = [float(v) for v in nll]
    if plan["basis"] == "strata":
        modules = assign_modules(["all"] * len(nll), nll, plan["strata_edges"]).modules
    else:
        modules = [str(t) for t in tags]
    split = {m: float(v) for m, v in plan["split_nll"].items()}
    return [member_of(m, v, split) for m, v in zip(modules, nll, strict=True)]
