"""The method vocabulary: one parser for the CLI, the Snakefile and the report (no heavy imports).

A method is a checkpoint schedule plus per-sample weightings:

- schedules: ``td`` (T* every phase), ``cd`` (checkpoint k in phase k), ``scd`` (argmin_c
  KL(T* || c) + KL(S_k || c) at each phase start), ``taid`` (T* every phase, TAID's interpolated
  target, no CE);
- weightings: ``+aw`` (Adaptive Weighting of the CE/KD mix), ``+paced`` (PACED's p(1 - p) weight
  on each sample's loss);
- ``scd_aw`` is the paper's name for ``scd+aw``.

Canonical labels put the schedule first and the suffixes in that order: ``td+paced``,
``cd+aw+paced``, ``scd_aw``, ``scd_aw+paced``. Report labels: ``TD``, ``SCD+AW``, ``TD+PACED``.
"""

from __future__ import annotations

from dataclasses import dataclass

from scd_pipeline.errors import ConfigError

SCHEDULES = ("td", "cd", "scd", "taid")
BASE_METHODS = ("td", "cd", "scd", "scd_aw", "taid")
SUFFIXES = ("aw", "paced")
WEIGHTINGS = ("none", "aw", "paced")
LABELS = {"td": "TD", "cd": "CD", "taid": "TAID", "scd": "SCD", "scd_aw": "SCD+AW"}


@dataclass(frozen=True)
class Method:
    """A distillation method: a checkpoint schedule plus optional per-sample weightings."""

    schedule: str    # td | cd | scd | taid
    adaptive: bool   # AW: w = L_S^SFT / (L_S^SFT + L_c*) instead of lambda
    paced: bool      # PACED: per-sample weight p^alpha (1 - p)^beta on the loss

    @property
    def name(self) -> str:
        """Canonical method string, e.g. ``scd_aw``, ``td+paced``, ``cd+aw+paced``."""
        if self.schedule == "scd" and self.adaptive:
            base, suffixes = "scd_aw", []
        else:
            base, suffixes = self.schedule, ["aw"] if self.adaptive else []
        return "+".join([base, *suffixes, *(["paced"] if self.paced else [])])

    @property
    def label(self) -> str:
        """Paper-style row label: ``SCD+AW``, ``TD+PACED``."""
        base, _, suffix = self.name.partition("+")
        return "+".join([LABELS[base], *([suffix.upper()] if suffix else [])])

    @property
    def needs_subdomains(self) -> bool:
        """Reads ``subdomains.parquet`` / ``.json`` (AW's weights, SCD's probe and KL(T* || c))."""
        return self.adaptive or self.schedule == "scd"


def parse_method(method: str, weighting: str | None = None) -> Method:
    """``td``, ``cd``, ``scd``, ``scd_aw``, ``taid``, optionally with ``+aw`` / ``+paced`` suffixes,
    plus ``--weighting none|aw|paced``. One-line ConfigError on anything else or on conflicts."""
    base, *suffixes = method.strip().split("+")
    if base not in BASE_METHODS:
        raise ConfigError(f"method {method!r}: unknown method {base!r}; choose one of "
                          f"{', '.join(BASE_METHODS)} (optionally +aw / +paced)")
    bad = [s for s in suffixes if s not in SUFFIXES]
    if bad or len(set(suffixes)) != len(suffixes):
        raise ConfigError(f"method {method!r}: suffixes must be +aw and/or +paced, each once")
    if weighting is not None and weighting not in WEIGHTINGS:
        raise ConfigError(f"--weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    adaptive = base == "scd_aw" or "aw" in suffixes or weighting == "aw"
    paced = "paced" in suffixes or weighting == "paced"
    if weighting == "none" and (adaptive or paced):
        raise ConfigError(f"--weighting none contradicts method {method!r}, which weights samples")
    schedule = "scd" if base == "scd_aw" else base
    if schedule == "taid" and adaptive:
        raise ConfigError(f"method {method!r}: TAID has no CE/KD mix for AW to weight; use taid or "
                          "taid+paced")
    return Method(schedule, adaptive, paced)


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
