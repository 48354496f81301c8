"""The IOA curriculum as a recipe: stage by stage through the plan, with replay, mastery gates on
the validation split and remedial passes (``ioa-plan`` and ``synthesize`` write its inputs)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor

from scd_pipeline.engine.curriculum_files import (
    VAL_SCORES_FILE,
    ioa_dir,
    read_plan,
    validation_rows,
)
from scd_pipeline.engine.io import write_json
from scd_pipeline.engine.logit_cache import LogitCache, open_task_cache
from scd_pipeline.engine.methods import Method
from scd_pipeline.engine.scoring import predict_split
from scd_pipeline.engine.training import (
    LoopContext,
    Phase,
)
from scd_pipeline.errors import DataError
from scd_pipeline.math.curriculum import (
    ADVANCE,
    REMEDIAL,
    dependency_strength,
    fresh_remedial,
    gate,
    member_of,
    replay_count,
    row_members,
)
from scd_pipeline.stages.distill.inputs import CURRICULUM_FILE, DistillPaths, with_synthetic
from scd_pipeline.stages.distill.recipe import DistillRecipe

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
    remedial pass on the stage's units below mastery (their rows and ``standard`` items, plus
    ``remedial`` items the student has not trained on yet, a ``1 / max_remedial`` share of each
    unit's per round). Either adds ``ioa.replay_share`` of rows replayed from earlier stages (a
    remedial pass also from the stage's mastered units), seeded by stage and pass. After every
    pass the live student is scored on the validation split (the one scoring path) and the mastery
    gate, over every unit of the stage (a unit mastered before a remedial pass can slip during it),
    decides (advance, remedial, advance unmastered after ``ioa.max_remedial``); training ends
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
        ctx.state.setdefault("curriculum", {"stage": 0, "remedial": 0, "weak": None, "passes": [], "used": []})

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
        scores = ctx.decide_on_rank0(self.gate_scores(ctx))  # every process takes rank 0's gate
        ratios, decision, weak = gate(self.stages[state["stage"]], self.curriculum.teacher_scores, scores,
                                      self.ioa["tau_mastery"], state["remedial"], self.ioa["max_remedial"])
        record.update({"scores": scores, "ratios": ratios, "decision": decision,
                       "last_step": ctx.progress["step"]})
        if decision == REMEDIAL:
            state["remedial"] += 1
            state["weak"] = weak
        else:
            state.update(stage=state["stage"] + 1, remedial=0, weak=None)

    # -- the next pass
    def pass_rows(self, stage: int, weak: list[str] | None, number: int,
                  used: list[int] | None = None) -> tuple[list[int], dict]:
        """The rows of the next pass and their counts. A remedial pass takes each weak unit's
        ``remedial`` items not yet trained on (``used``, which it extends), ``fresh_remedial`` of
        them per unit, so that every remedial round of ``ioa.max_remedial`` meets new items; once
        a unit's items are spent they are taken again (counted as ``repeated``)."""
        units, registers = self.curriculum.units, self.curriculum.registers
        current = self.stages[stage] if weak is None else weak
        own = np.isin(units, current) & np.isin(registers, ["", "standard"])
        if weak is None and stage > 0:
            own |= np.isin(units, self.stages[stage - 1]) & (registers == "bridging")
        earlier = [u for s in self.stages[:stage] for u in s] + [u for u in self.stages[stage] if u not in current]
        pool = np.flatnonzero(np.isin(units, earlier) & np.isin(registers, ["", "standard"]))
        rows = np.flatnonzero(own).tolist()
        remedial, repeated = [], 0
        if weak is not None:
            used = used if used is not None else []
            for unit in weak:
                items = np.flatnonzero((units == unit) & (registers == "remedial")).tolist()
                take = fresh_remedial(len(items), self.ioa["max_remedial"])
                seen = set(used)
                fresh = [row for row in items if row not in seen]
                if len(fresh) < take:  # spent: the unit's items come round again
                    repeated += take - len(fresh)
                    used[:] = [row for row in used if row not in set(items)]
                    fresh += [row for row in items if row in seen][: take - len(fresh)]
                remedial += fresh[:take]
                used += fresh[:take]
        count = replay_count(len(rows) + len(remedial), len(pool), self.ioa["replay_share"])
        replay = sorted(random.Random(f"{self.config['seed']}/{stage}/{number}").sample(pool.tolist(), count))
        synthetic = int((registers[rows] != "").sum()) if rows else 0
        counts = {"train": len(rows) - synthetic, "synthetic": synthetic + len(remedial), "replay": len(replay)}
        if weak is not None:
            counts.update(remedial=len(remedial), repeated=repeated)
        return sorted(rows + remedial) + replay, counts

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
            state["ended"] = "last gate"
            return None
        spent = ctx.progress["step"]
        if self.total_steps is not None and spent >= self.total_steps:
            state["ended"] = "budget"  # the plain method's steps are spent: the student so far is published
            return None
        rows, counts = self.pass_rows(state["stage"], state["weak"], index, state.setdefault("used", []))
        kind = "first" if state["weak"] is None else "remedial"
        units = self.stages[state["stage"]] if state["weak"] is None else state["weak"]
        state["passes"].append({"pass": index + 1, "stage": state["stage"] + 1, "kind": kind, "units": units,
                                "rows": counts, "first_step": ctx.progress["step"] + 1})
        record = {**self.checkpoint_record(ctx, index), "stage": state["stage"] + 1, "pass_kind": kind}
        return Phase(self.ioa["epochs_per_pass"], rows=rows, record=record,
                     max_steps=None if self.total_steps is None else self.total_steps - spent)

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
                "budget": self.ioa["budget"], "budget_steps": self.total_steps, "steps": ctx.progress["step"],
                "ended": ctx.state["curriculum"].get("ended"),
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


def curriculum_inputs(config: dict, paths: DistillPaths, train: pd.DataFrame, spec: Method,
                       caches: dict[int, LogitCache], best: int, tokenizer) -> tuple[pd.DataFrame, dict, CurriculumData, list[Path]]:
    """IOA: the training rows plus the synthetic items (one frame), every checkpoint's cache of
    both read as one, the plan and the gates' validation rows; and the files read."""
    frame, union, synthetic = with_synthetic(config, paths, train, caches, tokenizer)
    best_stats = union[best].stats() if best in union else pd.concat(
        [open_task_cache(config, best, tokenizer, synthetic=flag).stats() for flag in (False, True)])
    curriculum = read_curriculum_data(config, train, synthetic, best_stats)
    files = [paths.synthetic, ioa_dir(config) / "plan.json", ioa_dir(config) / VAL_SCORES_FILE]
    if spec.needs_subdomains:
        files += [paths.synthetic_subdomains, paths.synthetic_summary]
    return frame, union, curriculum, files
