"""Distillation from cached teacher logits: ``scd-pipeline distill --method M`` (SPEC 4.1-4.4).

Every method is a :class:`DistillRecipe` of the one training loop (:mod:`scd_pipeline.engine.training`);
what differs between methods (:mod:`scd_pipeline.engine.methods`) is three small decisions:

- which teacher checkpoint a phase distils from: T* (TD, TAID), checkpoint k in phase k (CD), or,
  for SCD, c* = argmin_c KL(T* || c) + KL(S_k || c) chosen at each phase start;
- which weight w mixes CE and KD in a sample's loss: lambda (``distill.kd_weight``), or AW;
- which weight v a sample's loss gets in the step's mean: the split's ``weight``, times PACED's
  p^alpha (1 - p)^beta when enabled (p re-estimated at every epoch start, :func:`scoring.pass_rates`).

Training runs in N phases (``distill.phases``, default one per teacher checkpoint) of E epochs
(``distill.epochs_per_phase``); AdamW's moments and the cosine-with-warm-up LR schedule restart
at every phase (``distill.schedule: per_phase``, the paper) or run once over all phases
(``whole_run``; a curriculum, whose length is open, restarts at every pass either way). The teacher signal comes only from the caches ``logits/ckpt-{k}.parquet``: no
teacher forward ever runs here. What ``estimate-subdomains`` already computed is read from its
artifacts, not recomputed: SCD's probe ids and KL(T* || c) from ``subdomains.json``, AW's
per-sample weights (``aw_ckpt_{k}`` = L_S^SFT / (L_S^SFT + L_c)) from ``subdomains.parquet``.

Per sample x (CE = mean gold NLL over its completion tokens, KD = mean of the configured
divergence over them, both from the same student forward; temperature ``distill.temperature`` on
both sides of KD, the caches read through ``SparseTarget.buckets``):

- ``convex``: L = (1 - w) CE + w KD; ``additive``: L = CE + w KD;
- TAID: L = mean over tokens of KL(p_t || q), t updated after every optimizer step over the whole
  run's steps; its state is saved with the resume state and as ``taid_state.json``.

With ``distill.paced.two_stage`` the divergence is forward KL for the first half of all
optimizer steps and reverse KL for the second half.

Outputs: ``students/{name}/`` (model and tokenizer, ``train_log.jsonl``, ``schedule.json``,
``distill.config.yaml``, ``taid_state.json`` for TAID), published atomically at the end. Resume
state lives in ``.state/distill-{name}/``, outside the declared outputs (see docs/ARTIFACTS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from scd_pipeline.engine.batching import Batch, read_split
from scd_pipeline.engine.checkpoints import checkpoint_indices, read_checkpoints
from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.curriculum_files import (
    VAL_SCORES_FILE,
    ioa_dir,
    read_plan,
    validation_rows,
)
from scd_pipeline.engine.io import atomic_dir, read_json, sha256_file, sha256_text, write_json
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.logit_cache import CacheUnion, LogitCache, cache_path, open_task_cache
from scd_pipeline.engine.methods import Method, default_name, parse_method
from scd_pipeline.engine.models import is_model_dir
from scd_pipeline.engine.scoring import PassRule, forward_batches, pass_rates, predict_split
from scd_pipeline.engine.training import (
    LOG_FILE,
    LoopContext,
    LoopSettings,
    Phase,
    Recipe,
    StepResult,
    make_accelerator,
    model_identity,
    per_sample_mean_nll,
    planned_steps,
    run_training,
    seed_everything,
)
from scd_pipeline.errors import ConfigError, DataError, ModelError
from scd_pipeline.math.curriculum import (
    ADVANCE,
    REMEDIAL,
    dependency_strength,
    mastered,
    mastery_decision,
    mastery_ratio,
    member_of,
    replay_count,
    row_members,
)
from scd_pipeline.math.losses import SparseTarget, Taid, get_divergence, per_sample_mean
from scd_pipeline.math.schedules import (
    CACHE_KL_DEFINITION,
    STUDENT_KL_DEFINITION,
    cd_schedule,
    mean_token_kl,
    scd_choose,
    student_cache_kl,
    td_schedule,
)
from scd_pipeline.math.weighting import combine, paced_weight

SCHEDULE_FILE = "schedule.json"
CURRICULUM_FILE = "curriculum.json"
SYNTHETIC_FILE = "synthetic.parquet"  # IOA's teacher-written items, under data/
TAID_STATE_FILE = "taid_state.json"
AVERAGE = "average"  # the "checkpoint" of a phase that distils from the logit average of all
# Divergence keyword -> distill config key, per divergence that takes options.
DIVERGENCE_OPTIONS = {"skew_forward_kl": {"alpha": "skew_alpha"}, "skew_reverse_kl": {"alpha": "skew_alpha"},
                      "generalized_jsd": {"beta": "jsd_beta"}, "akl": {"head_mass": "akl_head_mass"}}


# --------------------------------------------------------------------------- schedules


def phase_count(distill: Mapping[str, Any], n_checkpoints: int) -> int:
    """N: ``distill.phases``, or one phase per teacher checkpoint."""
    return int(distill["phases"]) if distill["phases"] is not None else n_checkpoints


def fixed_schedule(method: Method, n_phases: int, checkpoints: Sequence[int], best_index: int,
                   cd_mode: str = "sequential") -> list[int | str] | None:
    """Checkpoint per phase for the schedules that do not look at the student; None for SCD
    (chosen at each phase start). CD ``average`` distils from the logit average in every phase."""
    if method.schedule in ("td", "taid"):
        return list(td_schedule(n_phases, best_index))
    if method.schedule == "cd":
        return [AVERAGE] * n_phases if cd_mode == AVERAGE else list(cd_schedule(n_phases, checkpoints))
    return None


def checkpoints_needed(checkpoints: Sequence[int], schedule: Sequence[int | str] | None) -> list[int]:
    """Which checkpoints' caches the run reads: the scheduled ones, or all for SCD / CD average."""
    if schedule is None or AVERAGE in schedule:
        return sorted(checkpoints)
    return sorted({int(k) for k in schedule})


def student_to_checkpoint_kl(model, probe: pd.DataFrame, caches: Mapping[int, LogitCache],
                             batch_size: int, pad_id: int) -> dict[int, float]:
    """KL(S || c) for every cached checkpoint c: one no-grad student forward over the probe
    samples, mean over their completion tokens (``schedules.student_cache_kl``)."""
    chunks: dict[int, list[Tensor]] = {index: [] for index in caches}
    for batch, logits in forward_batches(model, probe, batch_size, pad_id):
        sample_ids = probe["sample_id"].to_numpy()[batch.index].tolist()
        lengths = torch.bincount(batch.token_sample, minlength=batch.num_samples).tolist()
        for index, cache in caches.items():
            chunks[index].append(student_cache_kl(logits, cache.targets(sample_ids, lengths, logits.device)))
    return {index: mean_token_kl(values) for index, values in sorted(chunks.items())}


def average_target(targets: Sequence[SparseTarget], top_k: int) -> SparseTarget:
    """CD ``average``: the logit average of several checkpoints, cut to its top-k plus the tail.

    Each cache is read as its normalised uniform-tail reconstruction at temperature 1
    (``SparseTarget.dense_logprobs``); the mean of their log-probs is a logit average (per-token
    constants vanish in the softmax). With k = V it is exactly ``log_softmax(mean_c log p_c)``.
    Builds (N, V) tensors for the batch's completion tokens only.
    """
    if not targets:
        raise ValueError("average_target: no checkpoints to average")
    total = targets[0].dense_logprobs(1.0)
    for target in targets[1:]:
        total = total + target.dense_logprobs(1.0)
    return SparseTarget.from_logits(total / len(targets), top_k)


# --------------------------------------------------------------------------- losses


@dataclass
class LossTerms:
    """Per-sample values (B,): the objective ``loss`` and its ``ce`` and ``kd`` parts."""

    loss: Tensor
    ce: Tensor
    kd: Tensor


def sample_losses(student_logits: Tensor, batch: Batch, target: SparseTarget, kd_weight: Tensor | float,
                  divergence: Callable[[Tensor, SparseTarget], Tensor], objective: str = "convex") -> LossTerms:
    """L = (1 - w) CE + w KD (``convex``) or CE + w KD (``additive``) per sample.

    ``student_logits`` (N, V) at the batch's completion positions; ``divergence(logits, target)``
    returns per-token values (temperature and options already bound, see :func:`divergence_for`).
    """
    ce = per_sample_mean_nll(student_logits, batch)
    kd = per_sample_mean(divergence(student_logits, target), batch.token_sample, batch.num_samples)
    return LossTerms(combine(ce, kd, kd_weight, objective), ce, kd)


def taid_sample_losses(student_logits: Tensor, batch: Batch, target: SparseTarget, taid: Taid,
                       temperature: float = 1.0) -> LossTerms:
    """TAID: L = mean over the sample's tokens of KL(p_t || q); no CE term (CE kept for the log)."""
    kd = per_sample_mean(taid.loss(student_logits, target, temperature), batch.token_sample,
                         batch.num_samples)
    with torch.no_grad():
        ce = per_sample_mean_nll(student_logits, batch)
    return LossTerms(kd, ce, kd)


def divergence_name_at(configured: str, two_stage: bool, step: int, total_steps: int) -> str:
    """The divergence of optimizer step ``step`` (0-based): PACED two-stage uses forward KL for the
    first half of all steps and reverse KL for the second; otherwise the configured one."""
    if not two_stage:
        return configured
    return "forward_kl" if step < total_steps / 2 else "reverse_kl"


def divergence_for(distill: Mapping[str, Any], name: str) -> Callable[[Tensor, SparseTarget], Tensor]:
    """``losses.DIVERGENCES[name]`` with ``distill.temperature`` and its options bound."""
    options = {argument: distill[key] for argument, key in DIVERGENCE_OPTIONS.get(name, {}).items()}
    return functools.partial(get_divergence(name), temperature=distill["temperature"], **options)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DistillPaths:
    data: Path          # results/{task}/data
    teacher: Path       # results/{task}/teacher
    init: Path          # results/models/student_base or results/{task}/student_sft
    subdomains: Path    # results/{task}/subdomains.parquet (AW's weights)
    summary: Path       # results/{task}/subdomains.json (SCD's probe and KL(T* || c))
    output: Path        # results/{task}/students/{name}
    state: Path         # results/{task}/.state/distill-{name, '/' as '--'}

    @property
    def synthetic(self) -> Path:
        """IOA's teacher-written items (``scd-pipeline synthesize``)."""
        return self.data / SYNTHETIC_FILE

    @property
    def synthetic_subdomains(self) -> Path:
        """AW's weights of the synthetic items (``estimate-subdomains --synthetic``)."""
        return self.subdomains.with_name("subdomains-synthetic.parquet")

    @property
    def synthetic_summary(self) -> Path:
        return self.subdomains.with_name("subdomains-synthetic.json")


def distill_paths(config: dict, name: str) -> DistillPaths:
    """Where a distillation run named ``name`` reads and writes. ``name`` is a plain folder name or
    several joined by '/' (e.g. ``td/seed-1``); no segment is empty or starts with '.'."""
    segments = name.split("/") if name else []
    if not segments or "\\" in name or any(not part or part.startswith(".") for part in segments):
        raise ConfigError(f"--name {name!r}: must be a folder name or '/'-separated folder names "
                          "(e.g. td/seed-1), none empty or starting with '.'")
    root = task_dir(config)
    init = (Path(config["results_dir"]) / "models" / "student_base" if config["distill"]["init"] == "base"
            else root / "student_sft")
    return DistillPaths(data=root / "data", teacher=root / "teacher", init=init,
                        subdomains=root / "subdomains.parquet", summary=root / "subdomains.json",
                        output=root / "students" / name, state=root / ".state" / f"distill-{name.replace('/', '--')}")


def require_inputs(config: dict, paths: DistillPaths, method: Method, checkpoints: dict, needed: Sequence[int]) -> None:
    """Refuse, before any model is loaded, a missing input, naming the command that makes it
    (a curriculum method also reads IOA's plan, the synthetic items, their caches and weights)."""
    if not is_model_dir(paths.init):
        init = config["distill"]["init"]
        command = ("scd-pipeline prepare-model --role student" if init == "base"
                   else "scd-pipeline sft --role student")
        raise ModelError(f"{paths.init}: initial student (distill.init {init}) not found (run `{command}` first)")
    entries = {int(e["index"]): e for e in checkpoints["checkpoints"]}
    for index in needed:
        checkpoint_dir = paths.teacher / entries[index]["path"]
        if not checkpoint_dir.is_dir():
            raise DataError(f"{checkpoint_dir}: teacher checkpoint not found (run `scd-pipeline sft "
                            "--role teacher`, then cache-logits)")
        if not cache_path(paths.data.parent, index).is_file():
            raise DataError(f"{cache_path(paths.data.parent, index)}: teacher-logit cache not found (run "
                            f"`scd-pipeline cache-logits --checkpoint {index}`)")
    needs = []
    if method.needs_subdomains:
        needs += [(path, "estimate-subdomains") for path in (paths.subdomains, paths.summary)]
    if method.curriculum:
        needs += [(ioa_dir(config) / "plan.json", "ioa-plan"), (ioa_dir(config) / VAL_SCORES_FILE, "ioa-plan"),
                  (paths.synthetic, "synthesize")]
        needs += [(cache_path(paths.data.parent, index, synthetic=True), f"cache-logits --synthetic --checkpoint {index}")
                  for index in needed]
        if method.needs_subdomains:
            needs += [(path, "estimate-subdomains --synthetic")
                      for path in (paths.synthetic_subdomains, paths.synthetic_summary)]
    for path, command in needs:
        if not path.is_file():
            raise DataError(f"{path}: not found; {method.name} reads it (run `scd-pipeline {command}` first)")


def check_cache_covers(cache: LogitCache, frame: pd.DataFrame) -> None:
    """Every training sample is cached with as many completion tokens as it has (else stale)."""
    counts = cache.token_counts(frame["sample_id"].tolist())
    lengths = frame["completion_ids"].map(len).to_numpy()
    if not np.array_equal(counts, lengths):
        bad = int(np.flatnonzero(counts != lengths)[0])
        raise DataError(f"{cache.path}: sample {frame['sample_id'].iat[bad]} has {counts[bad]} cached "
                        f"completion tokens but {lengths[bad]} in the split; re-run `scd-pipeline "
                        f"cache-logits --checkpoint {cache.meta['checkpoint']['index']}`")


@dataclass
class Subdomains:
    """What distillation reads from ``estimate-subdomains``' artifacts."""

    probe_ids: list[str]
    kl_best_to_c: dict[int, float]
    aw: dict[int, np.ndarray]  # checkpoint -> AW per training row (row order of the split)


def read_subdomains(paths: DistillPaths, frame: pd.DataFrame, caches: Mapping[int, LogitCache],
                    synthetic_caches: Mapping[int, LogitCache] | None = None) -> Subdomains:
    """SCD's probe ids and KL(T* || c), AW per row and checkpoint; refused when they were computed
    from other caches or other data than the ones this run reads. With ``synthetic_caches`` (IOA)
    the synthetic items' weights come from ``subdomains-synthetic.*``."""
    parts = [(paths.summary, paths.subdomains, caches, "estimate-subdomains")]
    if synthetic_caches:
        parts.append((paths.synthetic_summary, paths.synthetic_subdomains, synthetic_caches,
                      "estimate-subdomains --synthetic"))
    tables = []
    for summary_path, table_path, part, command in parts:
        recorded = {int(k): v.get("uid") for k, v in read_json(summary_path).get("caches", {}).items()}
        for index, cache in part.items():
            if recorded.get(index) != cache.meta["uid"]:
                raise DataError(f"{summary_path}: computed from another cache of checkpoint {index} than "
                                f"{cache.path}; re-run `scd-pipeline {command}`")
        tables.append(pd.read_parquet(table_path))
    summary = read_json(paths.summary)
    table = pd.concat(tables, ignore_index=True).set_index("sample_id")
    missing = ~frame["sample_id"].isin(table.index)
    if missing.any():
        raise DataError(f"{paths.subdomains}: no row for sample {frame['sample_id'][missing].iat[0]} of the "
                        "split; re-run `scd-pipeline estimate-subdomains` on the current data")
    rows = table.loc[frame["sample_id"]]
    return Subdomains(probe_ids=list(summary["probe"]["sample_ids"]),
                      kl_best_to_c={int(k): float(v) for k, v in summary["kl_best_to_c"].items()},
                      aw={index: rows[f"aw_ckpt_{index}"].to_numpy(np.float64) for index in caches})


# --------------------------------------------------------------------------- the recipe


class DistillRecipe(Recipe):
    """A method's decisions for the one loop (see the module doc)."""

    def __init__(self, config: dict, method: Method, name: str, paths: DistillPaths, frame: pd.DataFrame,
                 caches: dict[int, LogitCache], schedule: list[int | str] | None, best: int,
                 subdomains: Subdomains | None, n_phases: int, total_steps: int) -> None:
        self.config, self.settings = config, config["distill"]
        self.method, self.name, self.paths = method, name, paths
        self.frame, self.caches, self.schedule, self.best = frame, caches, schedule, best
        self.subdomains, self.n_phases, self.total_steps = subdomains, n_phases, total_steps
        self.lr_schedule = "per_phase" if method.curriculum else self.settings["schedule"]
        self.description = f"distill {name}"
        self.top_k = min(cache.k for cache in caches.values())
        self.sample_ids = frame["sample_id"].to_numpy()
        self.counts = frame["completion_ids"].map(len).to_numpy()
        taid = self.settings["taid"]
        self.taid = (Taid(taid["t_start"], taid["t_end"], taid["step_size"], taid["momentum"])
                     if method.schedule == "taid" else None)
        self.probe = None
        if method.schedule == "scd":
            by_id = frame.set_index("sample_id", drop=False)
            self.probe = by_id.loc[subdomains.probe_ids].reset_index(drop=True)

    def start(self, ctx: LoopContext) -> None:
        if self.taid is not None and "taid" in ctx.state:
            self.taid.load_state_dict(ctx.state["taid"])

    def next_phase(self, ctx: LoopContext, index: int) -> Phase | None:
        if index == self.n_phases:
            return None
        return Phase(self.settings["epochs_per_phase"], record=self.checkpoint_record(ctx, index))

    def checkpoint_record(self, ctx: LoopContext, index: int) -> dict:
        """Phase ``index``'s teacher checkpoint: the fixed schedule's, or SCD's choice now (with
        both KL terms of every candidate)."""
        if self.schedule is not None:
            return {"checkpoint": self.schedule[index]}
        kl_student = ctx.no_grad(lambda: student_to_checkpoint_kl(
            ctx.model, self.probe, self.caches, self.config["cache"]["batch_size"], ctx.tokenizer.pad_token_id))
        chosen, candidates = scd_choose(self.subdomains.kl_best_to_c, kl_student)
        return {"checkpoint": chosen, "candidates": candidates}

    def epoch_start(self, ctx: LoopContext, phase: int, epoch: int) -> None:
        if self.method.paced:
            rule = PassRule(samples=self.settings["paced"]["samples"], metric=self.settings["paced"]["list_metric"],
                            threshold=self.settings["paced"]["pass_threshold"],
                            temperature=self.settings["paced"]["sample_temperature"],
                            max_new_tokens=self.config["evaluate"]["max_new_tokens"],
                            seed=self.config["seed"] * 1000 + phase * 100 + epoch)
            rates = ctx.no_grad(lambda: pass_rates(ctx.model, ctx.tokenizer, self.frame,
                                                   self.config["cache"]["batch_size"], rule))
            ctx.state["pass_rates"] = rates.tolist()

    def sample_weights(self, ctx: LoopContext, rows: Sequence[int]) -> Tensor:
        weights = super().sample_weights(ctx, rows)
        if not self.method.paced:
            return weights
        paced = self.settings["paced"]
        rates = torch.tensor(ctx.state["pass_rates"], dtype=torch.float64)[list(rows)]
        return weights * paced_weight(rates, paced["alpha"], paced["beta"]).float()

    def _target(self, rows: Sequence[int], checkpoint: int | str, device) -> SparseTarget:
        ids, counts = self.sample_ids[list(rows)].tolist(), self.counts[list(rows)].tolist()
        if checkpoint == AVERAGE:
            return average_target([c.targets(ids, counts, device) for c in self.caches.values()], self.top_k)
        return self.caches[checkpoint].targets(ids, counts, device)

    def _divergence_name(self, step: int) -> str:
        if self.taid is not None:
            return "taid"
        two_stage = self.method.paced and self.settings["paced"]["two_stage"]
        return divergence_name_at(self.settings["divergence"], two_stage, step, self.total_steps)

    def sample_terms(self, ctx: LoopContext, logits: Tensor, batch: Batch, phase: dict) -> dict[str, Tensor]:
        target = self._target(batch.index, phase["checkpoint"], logits.device)
        if self.taid is not None:
            terms = taid_sample_losses(logits, batch, target, self.taid, self.settings["temperature"])
            return {"loss": terms.loss, "ce": terms.ce, "kd": terms.kd}
        if self.method.adaptive:
            kd_weight = torch.from_numpy(self.subdomains.aw[phase["checkpoint"]][batch.index]).float()
        else:
            kd_weight = torch.full((batch.num_samples,), float(self.settings["kd_weight"]))
        kd_weight = kd_weight.to(logits.device)
        divergence = divergence_for(self.settings, self._divergence_name(ctx.progress["step"]))
        terms = sample_losses(logits, batch, target, kd_weight, divergence, self.settings["objective"])
        return {"loss": terms.loss, "ce": terms.ce, "kd": terms.kd, "kd_weight": kd_weight}

    def after_step(self, ctx: LoopContext, result: StepResult) -> dict:
        if self.taid is not None:
            self.taid.update(result.loss, result.step, self.total_steps)
            ctx.state["taid"] = self.taid.state_dict()
        return {"divergence": self._divergence_name(result.step - 1),
                "t": self.taid.t if self.taid is not None else None}

    def schedule_record(self, ctx: LoopContext) -> dict:
        """The content of ``schedule.json`` (format in docs/ARTIFACTS.md)."""
        phases = [{k: v for k, v in phase.items() if k != "plan"} for phase in ctx.progress["phases"]]
        record: dict[str, Any] = {
            "method": self.method.name, "name": self.name, "schedule": self.method.schedule,
            "adaptive_weight": self.method.adaptive, "paced": self.method.paced,
            "cd_mode": self.settings["cd_mode"] if self.method.schedule == "cd" else None,
            "best_index": self.best, "checkpoints": sorted(self.caches), "n_phases": len(phases),
            "epochs_per_phase": self.settings["epochs_per_phase"], "lr_schedule": self.lr_schedule,
            "total_steps": ctx.progress["step"], "phases": phases,
        }
        if self.method.schedule == "scd":
            record["probe"] = {"size": len(self.probe), "source": str(self.paths.summary),
                               "sample_ids": self.probe["sample_id"].tolist()}
            record["kl_definition"] = {"kl_best_to_c": CACHE_KL_DEFINITION, "kl_student_to_c": STUDENT_KL_DEFINITION}
            record["kl_best_to_c"] = {str(k): v for k, v in self.subdomains.kl_best_to_c.items()}
        return record

    def publish(self, ctx: LoopContext, state_dict: dict[str, Tensor]) -> None:
        """Write ``students/{name}/`` in one atomic step."""
        with atomic_dir(self.paths.output) as tmp:
            ctx.save_model(tmp, state_dict)
            ctx.tokenizer.save_pretrained(str(tmp))
            shutil.copy2(self.paths.state / LOG_FILE, tmp / LOG_FILE)
            write_json(tmp / SCHEDULE_FILE, self.schedule_record(ctx))
            if self.taid is not None:
                write_json(tmp / TAID_STATE_FILE, {**self.taid.state_dict(), "t_start": self.taid.t_start,
                                                   "t_end": self.taid.t_end, "momentum_beta": self.taid.beta,
                                                   "step_size": self.taid.alpha, "total_steps": self.total_steps})
            write_effective_config(self.config, tmp, "distill")


# --------------------------------------------------------------------------- the IOA curriculum


@dataclass
class CurriculumData:
    """What a curriculum run reads besides the training split (``ioa-plan``, ``synthesize``)."""

    plan: dict
    units: np.ndarray          # curriculum unit (module or half) of every frame row
    registers: np.ndarray      # "" for training rows, else remedial | standard | bridging
    val: pd.DataFrame          # validation rows scored at every gate (val_scores order)
    val_units: np.ndarray
    teacher_scores: dict[str, float]  # P_T per unit (validation)
    synthetic_rows: int


class CurriculumRecipe(DistillRecipe):
    """IOA's curriculum over any schedule and weighting (SPEC 4.6, :mod:`scd_pipeline.math.curriculum`).

    Each phase is one *pass* over a stage: the first pass trains on the stage's units (training
    rows and their ``standard`` synthetic items, plus the previous stage's ``bridging`` items); a
    remedial pass on the stage's units below mastery (their rows plus ``remedial`` and
    ``standard`` items). Either adds ``ioa.replay_share`` of rows replayed from earlier stages (a
    remedial pass also from the stage's mastered units), seeded by stage and pass. After every
    pass the live student is scored on the validation split (the one scoring path) and the mastery
    gate decides (advance, remedial, advance unmastered after ``ioa.max_remedial``); training ends
    after the last stage's gate. The phase's checkpoint follows the schedule: T* (td), SCD's
    choice at the pass start (scd), or for cd stage s of S distils from checkpoint ceil(s N / S).
    ``curriculum.json`` records every pass, score and decision, and the dependency strengths
    measured across the passes (IOA's conditional-performance definition).
    """

    def __init__(self, *args, curriculum: CurriculumData, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.curriculum = curriculum
        self.ioa = self.config["ioa"]
        self.stages = [[unit["unit"] for unit in stage["units"]] for stage in curriculum.plan["stages"]]
        self.checkpoints = sorted(self.caches)

    def start(self, ctx: LoopContext) -> None:
        super().start(ctx)
        ctx.state.setdefault("curriculum", {"stage": 0, "remedial": 0, "weak": None, "passes": []})

    # -- the gate
    def gate_scores(self, ctx: LoopContext) -> dict[str, float]:
        """The live student's P_S per unit on the validation rows."""
        predictions = ctx.no_grad(lambda: predict_split(
            ctx.model, ctx.tokenizer, self.curriculum.val, self.config["evaluate"]["batch_size"],
            self.config["evaluate"]["max_new_tokens"], where="validation split (mastery gate)"))
        scores = predictions["score"].groupby(self.curriculum.val_units).mean()
        return {str(unit): float(value) for unit, value in scores.items()}

    def close_pass(self, ctx: LoopContext) -> None:
        """Score the pass that just ended and decide (the mastery gate)."""
        state = ctx.state["curriculum"]
        record = state["passes"][-1]
        scores = self.gate_scores(ctx)
        units = record["units"]
        ratios = {u: mastery_ratio(self.curriculum.teacher_scores[u], scores[u]) for u in units}
        decision = mastery_decision(ratios, self.ioa["tau_mastery"], state["remedial"], self.ioa["max_remedial"])
        record.update({"scores": scores, "ratios": ratios, "decision": decision,
                       "last_step": ctx.progress["step"]})
        if decision == REMEDIAL:
            state["remedial"] += 1
            state["weak"] = sorted(u for u, r in ratios.items() if not mastered(r, self.ioa["tau_mastery"]))
        else:
            state.update(stage=state["stage"] + 1, remedial=0, weak=None)

    # -- the next pass
    def pass_rows(self, stage: int, weak: list[str] | None, number: int) -> tuple[list[int], dict]:
        units, registers = self.curriculum.units, self.curriculum.registers
        current = self.stages[stage] if weak is None else weak
        if weak is None:
            own = np.isin(units, current) & np.isin(registers, ["", "standard"])
            if stage > 0:
                own |= np.isin(units, self.stages[stage - 1]) & (registers == "bridging")
        else:
            own = np.isin(units, current) & np.isin(registers, ["", "standard", "remedial"])
        earlier = [u for s in self.stages[:stage] for u in s] + [u for u in self.stages[stage] if u not in current]
        pool = np.flatnonzero(np.isin(units, earlier) & np.isin(registers, ["", "standard"]))
        rows = np.flatnonzero(own).tolist()
        count = replay_count(len(rows), len(pool), self.ioa["replay_share"])
        replay = sorted(random.Random(f"{self.config['seed']}/{stage}/{number}").sample(pool.tolist(), count))
        synthetic = int((registers[rows] != "").sum()) if rows else 0
        return rows + replay, {"train": len(rows) - synthetic, "synthetic": synthetic, "replay": len(replay)}

    def checkpoint_record(self, ctx: LoopContext, index: int) -> dict:
        if self.method.schedule == "scd":
            return super().checkpoint_record(ctx, index)
        if self.method.schedule == "cd":
            stage = ctx.state["curriculum"]["stage"]
            position = math.ceil((stage + 1) * len(self.checkpoints) / len(self.stages)) - 1
            return {"checkpoint": self.checkpoints[position]}
        return {"checkpoint": self.best}

    def next_phase(self, ctx: LoopContext, index: int) -> Phase | None:
        state = ctx.state["curriculum"]
        if index > 0 and "decision" not in state["passes"][-1]:
            self.close_pass(ctx)
        if state["stage"] == len(self.stages):
            return None
        rows, counts = self.pass_rows(state["stage"], state["weak"], index)
        kind = "first" if state["weak"] is None else "remedial"
        units = self.stages[state["stage"]] if state["weak"] is None else state["weak"]
        state["passes"].append({"pass": index + 1, "stage": state["stage"] + 1, "kind": kind, "units": units,
                                "rows": counts, "first_step": ctx.progress["step"] + 1})
        record = {**self.checkpoint_record(ctx, index), "stage": state["stage"] + 1, "pass_kind": kind}
        return Phase(self.ioa["epochs_per_pass"], rows=rows, record=record)

    # -- the record
    def curriculum_record(self, ctx: LoopContext) -> dict:
        """``curriculum.json``: the plan's stages, every pass, and measured dependencies."""
        passes = ctx.state["curriculum"]["passes"]
        teacher = self.curriculum.teacher_scores
        trajectory = {u: [p["scores"][u] for p in passes if "scores" in p] for u in teacher}
        dependency = {}
        for i in teacher:
            for j in teacher:
                if i != j:
                    value = dependency_strength(trajectory[i], trajectory[j], teacher[i])
                    if value is not None:
                        dependency[f"{i} -> {j}"] = value
        return {"method": self.method.name, "name": self.name, "thresholds": self.curriculum.plan["thresholds"],
                "epochs_per_pass": self.ioa["epochs_per_pass"], "stages": self.stages,
                "teacher_scores": teacher, "synthetic_rows": self.curriculum.synthetic_rows,
                "passes": passes, "mastered_all": all(p.get("decision") == ADVANCE for p in passes
                                                      if p.get("decision") != REMEDIAL),
                "dependency": dependency,
                "dependency_definition": ("IOA: [P_S(j | r_i >= 0.9) - P_S(j | r_i < 0.7)] / P_S(j | r_i >= 0.9), "
                                          "r_i = P_S(i) / P_T(i), over the student's states after each pass; "
                                          "pairs whose states never meet both conditions are left out")}

    def publish(self, ctx: LoopContext, state_dict: dict[str, Tensor]) -> None:
        super().publish(ctx, state_dict)
        write_json(self.paths.output / CURRICULUM_FILE, self.curriculum_record(ctx))


def read_curriculum_data(config: dict, train: pd.DataFrame, synthetic: pd.DataFrame,
                         best_stats: pd.DataFrame) -> CurriculumData:
    """The plan, each row's unit and register, and the validation rows of the gates.

    ``best_stats``: T*'s per-sample cache stats (``sample_id``, ``nll_mean``) over the training
    and synthetic rows, which place rows of a split module in its easier or harder half.
    """
    plan = read_plan(config)
    nll = best_stats.set_index("sample_id")["nll_mean"]
    split = {m: float(v) for m, v in plan["split_nll"].items()}
    units = row_members(plan, train["tag"], nll.loc[train["sample_id"]].to_numpy())
    units += [member_of(str(m), float(v), split)
              for m, v in zip(synthetic["module"], nll.reindex(synthetic["sample_id"]).to_numpy(), strict=True)]
    scores = pd.read_parquet(ioa_dir(config) / VAL_SCORES_FILE)
    _, val = validation_rows(config)
    if val["sample_id"].astype(str).tolist() != scores["sample_id"].tolist():
        raise DataError(f"{ioa_dir(config) / VAL_SCORES_FILE}: scored other validation rows than "
                        "data/val.parquet holds; re-run `scd-pipeline ioa-plan`")
    teacher = {str(u): float(v) for u, v in scores.groupby("unit")["teacher_score"].mean().items()}
    registers = [""] * len(train) + synthetic["register"].astype(str).tolist()
    return CurriculumData(plan, np.asarray(units, dtype=object), np.asarray(registers, dtype=object), val,
                          scores["unit"].to_numpy(dtype=object), teacher, len(synthetic))


# --------------------------------------------------------------------------- the stage


def _fingerprint(config: dict, method: Method, paths: DistillPaths, caches: Mapping[int, LogitCache],
                 processes: int, inputs: Sequence[Path]) -> str:
    """Hash of everything that determines the run's result (every input it reads); resume state
    must match it."""
    distill = {k: v for k, v in config["distill"].items() if k not in ("log_every", "resume_every_minutes",
                                                                          "methods")}
    subdomains = [paths.subdomains, paths.summary] if method.needs_subdomains else []
    payload = {"method": method.name, "seed": config["seed"], "task": config["task"], "distill": distill,
               "ioa": config["ioa"] if method.curriculum else None,
               "evaluate": config["evaluate"] if method.curriculum else None,
               "cache_batch_size": config["cache"]["batch_size"], "processes": processes,
               "max_new_tokens": config["evaluate"]["max_new_tokens"],
               "caches": {k: c.meta["uid"] for k, c in caches.items()}, "init": model_identity(paths.init),
               "inputs": {str(path): sha256_file(path) for path in [*inputs, *subdomains]}}
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _curriculum_inputs(config: dict, paths: DistillPaths, train: pd.DataFrame, spec: Method,
                       caches: dict[int, LogitCache], best: int, tokenizer) -> tuple[pd.DataFrame, dict, CurriculumData, list[Path]]:
    """IOA: the training rows plus the synthetic items (one frame), every checkpoint's cache of
    both read as one, the plan and the gates' validation rows; and the files read."""
    synthetic = read_split(paths.synthetic)
    frame = pd.concat([train, synthetic[list(train.columns)]], ignore_index=True)
    synthetic_caches = {index: open_task_cache(config, index, tokenizer, synthetic=True) for index in caches}
    union = {index: CacheUnion([caches[index], synthetic_caches[index]]) for index in caches}
    best_stats = union[best].stats() if best in union else pd.concat(
        [open_task_cache(config, best, tokenizer, synthetic=flag).stats() for flag in (False, True)])
    curriculum = read_curriculum_data(config, train, synthetic, best_stats)
    files = [paths.synthetic, ioa_dir(config) / "plan.json", ioa_dir(config) / VAL_SCORES_FILE]
    if spec.needs_subdomains:
        files += [paths.synthetic_subdomains, paths.synthetic_summary]
    return frame, union, curriculum, files


def run_distill(config: dict, method: str, weighting: str | None = None, name: str | None = None,
                after_step: Callable[[StepResult], None] | None = None) -> Path:
    """Distil the initial student from the cached teacher checkpoints; return ``students/{name}``.

    ``after_step(result)`` is called after each optimizer step (and its resume state, if due).
    """
    from scd_pipeline.engine.models import load_model
    from scd_pipeline.engine.tokenization import check_data_tokenizer, load_tokenizer

    settings = config["distill"]
    spec = parse_method(method, weighting)
    name = name or default_name(method, weighting)
    paths = distill_paths(config, name)
    split_file = paths.data / f"{config['cache']['split']}.parquet"
    train = read_split(split_file)
    if (train["weight"] <= 0).all():
        raise DataError(f"{split_file}: column weight is 0 for every row; nothing to train on")
    checkpoints = read_checkpoints(paths.teacher)
    indices, best = checkpoint_indices(checkpoints), int(checkpoints["best_index"])
    n_phases = phase_count(settings, len(indices))
    schedule = fixed_schedule(spec, n_phases, indices, best, settings["cd_mode"])
    if spec.adaptive and schedule is not None and AVERAGE in schedule:
        raise ConfigError("distill.cd_mode average has no single checkpoint NLL for AW; use cd_mode "
                          "sequential or drop +aw")
    if spec.paced and settings["paced"]["two_stage"] and (spec.schedule == "taid" or spec.curriculum):
        raise ConfigError("distill.paced.two_stage switches the KD divergence half-way through the run, but "
                          f"{spec.name} has no fixed length (TAID has its own objective, the curriculum's "
                          "remedial rounds are open); set it to false for this method")
    if spec.curriculum:  # the curriculum's stages decide which checkpoints a cd schedule reaches
        schedule = None if spec.schedule in ("scd", "cd") else schedule
    needed = checkpoints_needed(indices, schedule)
    require_inputs(config, paths, spec, checkpoints, needed)
    tokenizer = load_tokenizer(paths.init)
    caches = {index: open_task_cache(config, index, tokenizer) for index in needed}  # verified
    frame, inputs, curriculum = train, [split_file], None
    train_caches = caches
    if spec.curriculum:
        frame, caches, curriculum, files = _curriculum_inputs(config, paths, train, spec, caches, best, tokenizer)
        inputs += files
    for cache in caches.values():
        check_cache_covers(cache, frame)
    subdomains = None
    if spec.needs_subdomains:
        synthetic_caches = {k: c.caches[1] for k, c in caches.items()} if spec.curriculum else None
        subdomains = read_subdomains(paths, frame, train_caches, synthetic_caches)

    accelerator = make_accelerator(settings["precision"])
    seed_everything(config["seed"])
    model, tokenizer = load_model(paths.init, dtype="float32", device="cpu")
    model.requires_grad_(True)  # every weight trains, also when init is a merged LoRA SFT student
    check_data_tokenizer(paths.data, tokenizer, paths.init)
    loop = LoopSettings.from_section(settings, settings["lr"], config["seed"])
    fingerprint = _fingerprint(config, spec, paths, caches, accelerator.num_processes, inputs)
    if spec.curriculum:
        recipe = CurriculumRecipe(config, spec, name, paths, frame, caches, schedule, best, subdomains,
                                  n_phases, None, curriculum=curriculum)
    else:
        total = n_phases * planned_steps(len(train), loop.batch_size, loop.grad_accum * accelerator.num_processes,
                                         settings["epochs_per_phase"])
        recipe = DistillRecipe(config, spec, name, paths, train, caches, schedule, best, subdomains, n_phases, total)
    loop = dataclasses.replace(loop, restart_each_phase=recipe.lr_schedule == "per_phase")
    run_training(recipe, accelerator, model, tokenizer, frame, loop, paths.state, fingerprint, after_step)
    return paths.output


def artifacts(config: dict, *, name: str) -> list[Artifact]:
    """What ``distill --name NAME`` writes: the student folder, and its resume state."""
    paths = distill_paths(config, name)
    return [Artifact(paths.output, (paths.output,)), Artifact(paths.state, (paths.state,), resume_state=True)]
