"""Supervised fine-tuning: ``scd-pipeline sft --role teacher|student``, a recipe of the one loop.

The objective is the gold completion's mean token NLL per sample, weighted by the split's
``weight`` column (the loop's default), over one phase of ``sft.{role}.epochs`` epochs. The teacher
run saves N checkpoints evenly spaced over its optimizer steps (``teacher/ckpt-{k}/``) and
``teacher/checkpoints.json`` with each one's validation loss and metric and the best one (T*);
the student run is the same loop with one checkpoint at the end, published as ``student_sft/``.

Resume: everything needed to continue (accelerate state, progress, data order, finished
checkpoints, the metrics log) lives in ``{task}/.state/sft-{role}/``, outside the outputs that
Snakemake declares and deletes. A killed run started again continues from the last saved state,
re-publishes finished checkpoints without recomputing them, and removes the state when done.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.checkpoints import write_checkpoints
from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.io import atomic_dir, json_safe, sha256_file, sha256_text
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.naming import sft_student_dir
from scd_pipeline.engine.scoring import choice_categories, predict_split, split_kind, summarise
from scd_pipeline.engine.tokenization import check_data_tokenizer
from scd_pipeline.engine.training import (
    LOG_FILE,
    LoopContext,
    LoopSettings,
    Phase,
    Recipe,
    StepResult,
    append_log,
    checkpoint_steps,
    make_accelerator,
    model_identity,
    planned_steps,
    run_training,
    seed_everything,
)
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.math.metrics import kappa_weights, primary_metric

OUTPUT_NAMES = {"teacher": "teacher", "student": "student_sft"}


@dataclass(frozen=True)
class SftPaths:
    base_model: Path   # results/models/{role}_base
    data: Path         # results/{task}/data
    output: Path       # results/{task}/teacher or results/{task}/student_sft
    state: Path        # results/{task}/.state/sft-{role}


def sft_paths(config: dict, role: str, replicate: int = 0) -> SftPaths:
    """Where the SFT run of ``role`` reads and writes; the student's replicate ``s`` > 0 writes
    ``student_sft_seeds/seed-{s}`` (``naming.sft_student_dir``)."""
    root = task_dir(config)
    if replicate and role != "student":
        raise ConfigError(f"sft --replicate {replicate}: only the student has replicates (--role student)")
    if replicate < 0:
        raise ConfigError(f"sft --replicate {replicate}: a replicate is 0 or more")
    output = root / (sft_student_dir(replicate) if role == "student" else OUTPUT_NAMES[role])
    state = root / ".state" / (f"sft-{role}" + (f"-seed-{replicate}" if replicate else ""))
    return SftPaths(base_model=Path(config["results_dir"]) / "models" / f"{role}_base",
                    data=root / "data", output=output, state=state)


def n_checkpoints_for(config: dict, role: str) -> int:
    """N evenly spaced checkpoints for the teacher; the student keeps only its final weights."""
    return config["sft"]["teacher"]["n_checkpoints"] if role == "teacher" else 1


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (no extra disk, same filesystem) and fall back to a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_dir(source: Path, target: Path, extra: Sequence[Path] = ()) -> Path:
    """Atomically (re)create ``target`` from the files of ``source`` plus ``extra`` files."""
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        for path in extra:
            shutil.copy2(path, tmp / path.name)
    return target


def run_fingerprint(config: dict, role: str, paths: SftPaths, processes: int) -> str:
    """Hash of everything that determines the run's result; resume state must match it."""
    sft = {k: v for k, v in config["sft"].items() if k not in ("log_every", "resume_every_minutes")}
    payload = {"role": role, "seed": config["seed"], "task": config["task"], "sft": sft,
               "evaluate": {k: config["evaluate"][k] for k in ("batch_size", "max_new_tokens")},
               "base": model_identity(paths.base_model), "processes": processes,
               "train": sha256_file(paths.data / "train.parquet"),
               "val": sha256_file(paths.data / "val.parquet")}
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _save_checkpoint(ctx: LoopContext, state_dict: dict, target: Path, base_model: Path) -> None:
    """Weights only (a LoRA model saves its adapter, recording the base path) plus the tokenizer."""
    with atomic_dir(target) as tmp:
        if hasattr(ctx.model, "peft_config"):
            for adapter in ctx.model.peft_config.values():
                adapter.base_model_name_or_path = str(base_model)
        ctx.save_model(tmp, state_dict)
        ctx.tokenizer.save_pretrained(str(tmp))


def _apply_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                            lora_dropout=lora["dropout"],
                                            target_modules=list(lora["target_modules"]),
                                            task_type="CAUSAL_LM"))


class SftRecipe(Recipe):
    """Plain weighted NLL over one phase; checkpoints (validated on ``val``) at ``save_steps``."""

    def __init__(self, config: dict, role: str, paths: SftPaths, val: pd.DataFrame, total_steps: int) -> None:
        self.config, self.role, self.paths, self.val = config, role, paths, val
        self.description = f"sft {role}"
        self.total_steps = total_steps
        self.save_steps = checkpoint_steps(total_steps, n_checkpoints_for(config, role))
        self.kind = split_kind(val, str(paths.data / "val.parquet"))
        self.metric_name = primary_metric(self.kind, config["sft"]["val_metric"])
        self.categories = choice_categories(val) if self.kind == "choice" else []

    def start(self, ctx: LoopContext) -> None:
        ctx.state.setdefault("checkpoints", [])
        ctx.state.setdefault("loss_since_checkpoint", 0.0)
        ctx.state.setdefault("steps_since_checkpoint", 0)
        if ctx.accelerator.is_main_process and self.role == "teacher":
            for record in ctx.state["checkpoints"]:  # Snakemake may have deleted them
                publish_dir(self.paths.state / record["path"], self.paths.output / record["path"])

    def next_phase(self, ctx: LoopContext, index: int) -> Phase | None:
        return Phase(epochs=self.config["sft"][self.role]["epochs"]) if index == 0 else None

    def after_step(self, ctx: LoopContext, result: StepResult) -> dict:
        state = ctx.state
        state["loss_since_checkpoint"] += result.loss
        state["steps_since_checkpoint"] += 1
        if result.step not in self.save_steps:
            return {}
        evaluate = self.config["evaluate"]
        predictions = ctx.no_grad(lambda: predict_split(ctx.model, ctx.tokenizer, self.val, evaluate["batch_size"],
                                                        evaluate["max_new_tokens"], where="val"))
        val_metrics = summarise(predictions, self.kind, self.categories,
                                kappa_weights(self.config["task"]))["metrics"]
        index = self.save_steps.index(result.step) + 1
        plan = result.phase_record["plan"]
        record = json_safe({"index": index, "path": f"ckpt-{index}", "step": result.step,
                            "epoch": plan[result.step - result.phase_record["first_step"]]["epoch"],
                            "train_loss": state["loss_since_checkpoint"] / state["steps_since_checkpoint"],
                            "val_loss": val_metrics["loss"], "val_metric": val_metrics[self.metric_name]})
        state["checkpoints"].append(record)
        state["loss_since_checkpoint"], state["steps_since_checkpoint"] = 0.0, 0
        state_dict = ctx.full_state_dict()  # every process takes part
        if ctx.accelerator.is_main_process:
            _save_checkpoint(ctx, state_dict, self.paths.state / record["path"], self.paths.base_model)
            append_log(self.paths.state / LOG_FILE, {"event": "checkpoint", **record,
                                                     "val_metrics": json_safe(val_metrics)})
            if self.role == "teacher":
                publish_dir(self.paths.state / record["path"], self.paths.output / record["path"])
        return {}

    def publish(self, ctx: LoopContext, state_dict: dict) -> None:
        """The teacher's checkpoints.json last (its checkpoints are already out), or student_sft/
        (the final weights were saved as the last checkpoint: ``state_dict`` is not needed)."""
        paths, records = self.paths, ctx.state["checkpoints"]
        log_path = paths.state / LOG_FILE
        if self.role == "teacher":
            paths.output.mkdir(parents=True, exist_ok=True)
            wanted = {record["path"] for record in records}
            for stale in paths.output.glob("ckpt-*"):  # left by an earlier run with more checkpoints
                if stale.name not in wanted:
                    shutil.rmtree(stale)
            for record in records:
                if not (paths.output / record["path"]).is_dir():
                    publish_dir(paths.state / record["path"], paths.output / record["path"])
            shutil.copy2(log_path, paths.output / LOG_FILE)
            write_effective_config(self.config, paths.output, "sft")
            write_checkpoints(paths.output, records, self.metric_name)
        else:
            config_file = write_effective_config(self.config, paths.state, "sft")
            publish_dir(paths.state / records[-1]["path"], paths.output, extra=[log_path, config_file])


def run_sft(config: dict, role: str, after_step: Callable[[StepResult], None] | None = None,
            replicate: int = 0) -> Path:
    """Fine-tune ``results/models/{role}_base`` on the task's training split; return the output dir.

    ``replicate`` s > 0 (student only): the same run with seed = config seed + s, written to
    ``student_sft_seeds/seed-{s}`` (the SFT student's replicates, references for replicated
    methods). ``after_step(result)`` is called after each optimizer step once its checkpoint and
    resume state (if due) are saved; tests use it to simulate a kill.
    """
    paths = sft_paths(config, role, replicate)
    config = {**config, "seed": config["seed"] + replicate}
    sft = config["sft"]
    train = read_split(paths.data / "train.parquet")
    val = read_split(paths.data / "val.parquet")
    if sft["val_max_samples"]:
        val = val.head(sft["val_max_samples"]).reset_index(drop=True)
    split_kind(train, str(paths.data / "train.parquet"))
    if (train["weight"] <= 0).all():
        raise DataError(f"{paths.data / 'train.parquet'}: column weight is 0 for every row; nothing to train on")

    accelerator = make_accelerator(sft["precision"])
    seed_everything(config["seed"])
    model, tokenizer = load_model(paths.base_model, dtype="float32", device="cpu")
    check_data_tokenizer(paths.data, tokenizer, paths.base_model)
    if sft["mode"] == "lora":
        model = _apply_lora(model, sft["lora"])
    settings = LoopSettings.from_section(sft, sft[role]["lr"], config["seed"])
    total = planned_steps(len(train), settings.batch_size, settings.grad_accum * accelerator.num_processes,
                          sft[role]["epochs"])
    recipe = SftRecipe(config, role, paths, val, total)
    run_training(recipe, accelerator, model, tokenizer, train, settings, paths.state,
                 run_fingerprint(config, role, paths, accelerator.num_processes), after_step)
    return paths.output


def artifacts(config: dict, *, role: str, replicate: int = 0) -> list[Artifact]:
    """What ``sft --role ROLE [--replicate S]`` writes: its output folder, and its resume state."""
    paths = sft_paths(config, role, replicate)
    return [Artifact(paths.output, (paths.output,)), Artifact(paths.state, (paths.state,), resume_state=True)]
