"""The method vocabulary: one parser for the CLI, the Snakefile and the report (no heavy imports).

A method is a checkpoint schedule plus per-sample weightings:

- schedules: ``td`` (T* every phase), ``cd`` (checkpoint k in phase k), ``scd`` (argmin_c
  KL(T* || c) + KL(S_k || c) at each phase start), ``taid`` (T* every phase, TAID's interpolated
  target, no CE);
- weightings: ``+aw`` (Adaptive Weighting of the CE/KD mix), ``+paced`` (PACED's p(1 - p) weight
  on each sample's loss);
- the curriculum: ``+ioa`` trains stage by stage through IOA's mastery-gated curriculum, on the
  training rows plus the teacher-synthesised ones (:mod:`scd_pipeline.math.curriculum`);
- ``+synthetic``: the same training rows plus IOA's teacher-written items, no curriculum, at the
  plain method's budget: the control that tells the curriculum's effect from its data's;
- ``scd_aw`` is the paper's name for ``scd+aw``; ``ioa`` alone is ``td+ioa`` (T* targets).

Canonical labels put the schedule first and the suffixes in that order: ``td+paced``,
``cd+aw+paced``, ``scd_aw``, ``scd_aw+paced``, ``ioa``, ``scd_aw+ioa``. Report labels: ``TD``,
``SCD+AW``, ``TD+PACED``, ``IOA``, ``SCD+AW+IOA``.
"""

from __future__ import annotations

from dataclasses import dataclass

from scd_pipeline.errors import ConfigError

SCHEDULES = ("td", "cd", "scd", "taid")
BASE_METHODS = ("td", "cd", "scd", "scd_aw", "taid", "ioa")
SUFFIXES = ("aw", "paced", "synthetic", "ioa")
WEIGHTINGS = ("none", "aw", "paced")
LABELS = {"td": "TD", "cd": "CD", "taid": "TAID", "scd": "SCD", "scd_aw": "SCD+AW", "ioa": "IOA"}


@dataclass(frozen=True)
class Method:
    """A distillation method: a checkpoint schedule plus optional per-sample weightings."""

    schedule: str    # td | cd | scd | taid
    adaptive: bool   # AW: w = L_S^SFT / (L_S^SFT + L_c*) instead of lambda
    paced: bool      # PACED: per-sample weight p^alpha (1 - p)^beta on the loss
    curriculum: bool = False  # IOA: mastery-gated stages over knowledge modules + synthetic rows
    synthetic: bool = False   # IOA's synthetic rows beside the training rows, no curriculum

    @property
    def name(self) -> str:
        """Canonical method string, e.g. ``scd_aw``, ``td+paced``, ``cd+aw+paced``, ``ioa``."""
        if self.schedule == "scd" and self.adaptive:
            base, suffixes = "scd_aw", []
        elif self.schedule == "td" and self.curriculum and not self.adaptive:
            base, suffixes = "ioa", []
        else:
            base, suffixes = self.schedule, ["aw"] if self.adaptive else []
        suffixes += ["paced"] if self.paced else []
        suffixes += ["synthetic"] if self.synthetic else []
        suffixes += ["ioa"] if self.curriculum and base != "ioa" else []
        return "+".join([base, *suffixes])

    @property
    def label(self) -> str:
        """Paper-style row label: ``SCD+AW``, ``TD+PACED``, ``SCD+AW+IOA``."""
        base, *suffixes = self.name.split("+")
        return "+".join([LABELS[base], *(suffix.upper() for suffix in suffixes)])

    @property
    def uses_synthetic(self) -> bool:
        """Trains on IOA's teacher-written items too (the curriculum, or the +synthetic control)."""
        return self.curriculum or self.synthetic

    @property
    def needs_subdomains(self) -> bool:
        """Reads ``subdomains.parquet`` / ``.json`` (AW's weights, SCD's probe and KL(T* || c))."""
        return self.adaptive or self.schedule == "scd"


def parse_method(method: str, weighting: str | None = None) -> Method:
    """``td``, ``cd``, ``scd``, ``scd_aw``, ``taid``, ``ioa``, optionally with ``+aw`` / ``+paced`` /
    ``+ioa`` suffixes, plus ``--weighting none|aw|paced``. One-line ConfigError on anything else or
    on conflicts."""
    base, *suffixes = method.strip().split("+")
    if base not in BASE_METHODS:
        raise ConfigError(f"method {method!r}: unknown method {base!r}; choose one of "
                          f"{', '.join(BASE_METHODS)} (optionally +aw / +paced / +ioa)")
    bad = [s for s in suffixes if s not in SUFFIXES]
    if bad or len(set(suffixes)) != len(suffixes) or (base == "ioa" and "ioa" in suffixes):
        raise ConfigError(f"method {method!r}: suffixes must be +aw, +paced, +synthetic and/or +ioa, each once")
    if weighting is not None and weighting not in WEIGHTINGS:
        raise ConfigError(f"--weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    adaptive = base == "scd_aw" or "aw" in suffixes or weighting == "aw"
    paced = "paced" in suffixes or weighting == "paced"
    if weighting == "none" and (adaptive or paced):
        raise ConfigError(f"--weighting none contradicts method {method!r}, which weights samples")
    curriculum = base == "ioa" or "ioa" in suffixes
    synthetic = "synthetic" in suffixes
    if synthetic and curriculum:
        raise ConfigError(f"method {method!r}: the curriculum trains on the synthetic items already; "
                          "+synthetic is its control without the curriculum (e.g. td+synthetic)")
    schedule = {"scd_aw": "scd", "ioa": "td"}.get(base, base)
    if schedule == "taid" and adaptive:
        raise ConfigError(f"method {method!r}: TAID has no CE/KD mix for AW to weight; use taid or "
                          "taid+paced")
    if schedule == "taid" and curriculum:
        raise ConfigError(f"method {method!r}: TAID's t schedule needs the run's length up front, which "
                          "the curriculum's remedial rounds leave open; use td+ioa (ioa) or scd_aw+ioa")
    return Method(schedule, adaptive, paced, curriculum, synthetic)


def default_name(method: str, weighting: str | None = None) -> str:
    """Output name when ``--name`` is not given: the method string, or, when a ``--weighting``
    other than none is added, the canonical name (``--method td --weighting paced`` -> ``td+paced``)."""
    if weighting in (None, "none"):
        return method
    return parse_method(method, weighting).name


def method_label(method: str) -> str:
    """Report label of a method string (``scd_aw`` -> ``SCD+AW``); a name that is not a method
    (e.g. a student distilled under a custom ``--name``) is shown as it is."""
    try:
        return parse_method(method).label
    except ConfigError:
        return method
