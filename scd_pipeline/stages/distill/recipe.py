"""A method's decisions for the one training loop (``engine/training.py``): the phase's checkpoint,
the sample weights, the loss terms, and what is published."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from scd_pipeline.engine.batching import Batch
from scd_pipeline.engine.config import write_effective_config
from scd_pipeline.engine.io import atomic_dir, write_json
from scd_pipeline.engine.logit_cache import LogitCache
from scd_pipeline.engine.methods import Method
from scd_pipeline.engine.scoring import PassRule, pass_rates
from scd_pipeline.engine.training import (
    LOG_FILE,
    LoopContext,
    Phase,
    Recipe,
    StepResult,
)
from scd_pipeline.math.losses import SparseTarget, Taid
from scd_pipeline.math.schedules import (
    CACHE_KL_DEFINITION,
    STUDENT_KL_DEFINITION,
    scd_choose,
)
from scd_pipeline.math.weighting import paced_weight
from scd_pipeline.stages.distill.inputs import (
    SCHEDULE_FILE,
    TAID_STATE_FILE,
    DistillPaths,
    Subdomains,
)
from scd_pipeline.stages.distill.objective import (
    AVERAGE,
    average_target,
    divergence_for,
    divergence_name_at,
    sample_losses,
    student_to_checkpoint_kl,
    taid_sample_losses,
)

# --------------------------------------------------------------------------- the recipe


class DistillRecipe(Recipe):
    """A method's decisions for the one loop (see the module doc)."""

    def __init__(self, config: dict, method: Method, name: str, paths: DistillPaths, frame: pd.DataFrame,
                 caches: dict[int, LogitCache], schedule: list[int | str] | None, best: int,
                 subdomains: Subdomains | None, n_phases: int, total_steps: int | None,
                 phase_steps: int | None = None, synthetic_rows: int = 0) -> None:
        self.config, self.settings = config, config["distill"]
        self.method, self.name, self.paths = method, name, paths
        self.frame, self.caches, self.schedule, self.best = frame, caches, schedule, best
        self.subdomains, self.n_phases, self.total_steps = subdomains, n_phases, total_steps
        # a phase is epochs_per_phase over the frame; with synthetic rows beside the training rows it
        # stops at the plain method's phase steps, so the budget is the plain method's
        self.phase_steps = phase_steps
        self.synthetic_rows = synthetic_rows  # IOA's teacher-written items among the frame's rows
        # an open curriculum (no step count up front) restarts AdamW and the LR schedule every pass
        self.lr_schedule = "per_phase" if total_steps is None else self.settings["schedule"]
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
        return Phase(self.settings["epochs_per_phase"], record=self.checkpoint_record(ctx, index),
                     max_steps=self.phase_steps)

    def checkpoint_record(self, ctx: LoopContext, index: int) -> dict:
        """Phase ``index``'s teacher checkpoint: the fixed schedule's, or SCD's choice now (with
        both KL terms of every candidate)."""
        if self.schedule is not None:
            return {"checkpoint": self.schedule[index]}
        kl_student = ctx.no_grad(lambda: student_to_checkpoint_kl(
            ctx.model, self.probe, self.caches, self.config["cache"]["batch_size"], ctx.tokenizer.pad_token_id))
        chosen, candidates = scd_choose(self.subdomains.kl_best_to_c, kl_student)
        # every process trains on rank 0's choice (a near tie may break differently elsewhere)
        return ctx.decide_on_rank0({"checkpoint": chosen, "candidates": candidates})

    def epoch_start(self, ctx: LoopContext, phase: int, epoch: int) -> None:
        if self.method.paced:
            rule = PassRule(samples=self.settings["paced"]["samples"], metric=self.settings["paced"]["list_metric"],
                            threshold=self.settings["paced"]["pass_threshold"],
                            temperature=self.settings["paced"]["sample_temperature"],
                            max_new_tokens=self.config["evaluate"]["max_new_tokens"],
                            seed=self.config["seed"] * 1000 + phase * 100 + epoch)
            rates = ctx.no_grad(lambda: pass_rates(ctx.model, ctx.tokenizer, self.frame,
                                                   self.config["cache"]["batch_size"], rule))
            ctx.state["pass_rates"] = ctx.decide_on_rank0(rates.tolist())  # one set of weights for all

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
            "total_steps": ctx.progress["step"], "train_tokens": ctx.progress.get("tokens", 0),
            "budget_steps": self.total_steps, "rows": len(self.frame), "synthetic_rows": self.synthetic_rows,
            "phases": phases,
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
