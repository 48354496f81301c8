"""Supervised fine-tuning: ``scd-pipeline sft --role teacher|student``.

One loop for both roles. The teacher run saves N checkpoints evenly spaced over its optimizer
steps (``teacher/ckpt-{k}/``) and ``teacher/checkpoints.json`` with each one's validation loss and
metric and the best one (T*); the student run is the same loop with one checkpoint at the end,
published as ``student_sft/``. The loss is the gold completion's mean token NLL per sample,
weighted by the split's ``weight`` column; the LM head runs at completion positions only.

Resume: everything needed to continue (accelerate state, progress, data order, finished
checkpoints, the metrics log) lives in ``{task}/.state/sft-{role}/``, outside the outputs that
Snakemake declares and deletes. A killed run started again continues from the last saved state,
re-publishes finished checkpoints without recomputing them, and removes the state when done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from scd_pipeline.batching import frame_batch, read_split
from scd_pipeline.config import task_dir, write_effective_config
from scd_pipeline.errors import DataError
from scd_pipeline.evaluate import (
    check_data_tokenizer,
    choice_categories,
    json_safe,
    predict_split,
    split_kind,
    summarise,
)
from scd_pipeline.io import atomic_dir, sha256_file, sha256_text, write_json
from scd_pipeline.metrics import kappa_weights, primary_metric
from scd_pipeline.models import load_model
from scd_pipeline.training import (
    CompletionLM,
    PlannedStep,
    append_log,
    build_optimizer,
    checkpoint_steps,
    cosine_schedule,
    make_accelerator,
    model_identity,
    per_sample_mean_nll,
    process_share,
    read_resume_progress,
    restore_resume_state,
    save_resume_state,
    seed_everything,
    training_plan,
    truncate_log,
)

OUTPUT_NAMES = {"teacher": "teacher", "student": "student_sft"}
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class SftPaths:
    base_model: Path   # results/models/{role}_base
    data: Path         # results/{task}/data
    output: Path       # results/{task}/teacher or results/{task}/student_sft
    state: Path        # results/{task}/.state/sft-{role}


def sft_paths(config: dict, role: str) -> SftPaths:
    """Where the SFT run of ``role`` reads and writes."""
    root = task_dir(config)
    return SftPaths(base_model=Path(config["results_dir"]) / "models" / f"{role}_base",
                    data=root / "data", output=root / OUTPUT_NAMES[role],
                    state=root / ".state" / f"sft-{role}")


def n_checkpoints_for(config: dict, role: str) -> int:
    """N evenly spaced checkpoints for the teacher; the student keeps only its final weights."""
    return config["sft"]["teacher"]["n_checkpoints"] if role == "teacher" else 1


def best_checkpoint_index(records: Sequence[dict]) -> int:
    """Index of T*: the best ``val_metric`` (higher is better); ties go to the later step."""
    def key(record: dict) -> tuple[float, int]:
        metric = record["val_metric"]
        return (float("-inf") if metric is None or metric != metric else metric, record["step"])
    return max(records, key=key)["index"]


def backward_step(wrapper: torch.nn.Module, frame: pd.DataFrame, micro_batches: Sequence[Sequence[int]],
                  step_weight: float, pad_id: int, accelerator, loss_scale: float = 1.0) -> tuple[float, int]:
    """Forward + backward over this process's micro-batches of one optimizer step.

    Each micro-batch adds ``sum_i w_i * nll_i / step_weight`` (times ``loss_scale``), so the
    accumulated gradient is that of the whole step's weighted mean loss, however it is split.
    Gradients are synchronised across processes only on the last micro-batch. Returns this
    process's share of the step loss and the number of (non-pad) tokens it processed.
    """
    device = accelerator.device
    loss_total, tokens = 0.0, 0
    for j, rows in enumerate(micro_batches):
        batch = frame_batch(frame, rows, pad_id).to(device)
        weights = torch.tensor([float(frame["weight"].iat[r]) for r in rows], device=device)
        last = j == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(wrapper):
            logits = wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask)
            loss = (weights * per_sample_mean_nll(logits, batch)).sum() * (loss_scale / step_weight)
            accelerator.backward(loss)
        loss_total += float(loss.detach())
        tokens += int(batch.attention_mask.sum())
    return loss_total, tokens


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


def _save_checkpoint(model, tokenizer, target: Path, base_model: Path) -> None:
    """Weights only (a LoRA model saves its adapter, recording the base path) plus the tokenizer."""
    with atomic_dir(target) as tmp:
        if hasattr(model, "peft_config"):
            for adapter in model.peft_config.values():
                adapter.base_model_name_or_path = str(base_model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def _apply_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                            lora_dropout=lora["dropout"],
                                            target_modules=list(lora["target_modules"]),
                                            task_type="CAUSAL_LM"))


def _validation_frame(paths: SftPaths, max_samples: int | None) -> pd.DataFrame:
    frame = read_split(paths.data / "val.parquet")
    return frame.head(max_samples).reset_index(drop=True) if max_samples else frame


def run_sft(config: dict, role: str, after_step: Callable[[int], None] | None = None) -> Path:
    """Fine-tune ``results/models/{role}_base`` on the task's training split; return the output dir.

    ``after_step(step)`` is called after each optimizer step once its checkpoint and resume
    state (if due) are saved; tests use it to simulate a kill.
    """
    from tqdm.auto import tqdm

    sft = config["sft"]
    role_settings = sft[role]
    paths = sft_paths(config, role)
    train = read_split(paths.data / "train.parquet")
    val = _validation_frame(paths, sft["val_max_samples"])
    kind = split_kind(train, str(paths.data / "train.parquet"))
    metric_name = primary_metric(kind, sft["val_metric"])
    categories = choice_categories(val) if kind == "choice" else []
    weights_kind = kappa_weights(config["task"])
    if (train["weight"] <= 0).all():
        raise DataError(f"{paths.data / 'train.parquet'}: column weight is 0 for every row; nothing to train on")

    accelerator = make_accelerator(sft["precision"])
    seed_everything(config["seed"])
    model, tokenizer = load_model(paths.base_model, dtype="float32", device="cpu")
    check_data_tokenizer(paths.data, tokenizer, paths.base_model)
    if sft["mode"] == "lora":
        model = _apply_lora(model, sft["lora"])
    model.train()
    processes, process = accelerator.num_processes, accelerator.process_index
    lengths = [len(p) + len(c) for p, c in zip(train["prompt_ids"], train["completion_ids"], strict=True)]
    plan = training_plan(lengths, sft["batch_size"], sft["grad_accum"] * processes,
                         role_settings["epochs"], config["seed"])
    total_steps = len(plan)
    save_steps = checkpoint_steps(total_steps, n_checkpoints_for(config, role))

    wrapper = CompletionLM(model)
    optimizer = build_optimizer(wrapper, role_settings["lr"], sft["weight_decay"])
    scheduler = cosine_schedule(optimizer, total_steps, sft["warmup_ratio"])
    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)

    fingerprint = run_fingerprint(config, role, paths, processes)
    log_path = paths.state / LOG_FILE
    saved = read_resume_progress(paths.state)
    if saved is not None and saved["fingerprint"] == fingerprint:
        progress = restore_resume_state(accelerator, paths.state)
        plan = [PlannedStep(step["micro_batches"], step["epoch"]) for step in progress["plan"]]
        tqdm.write(f"sft {role}: resuming at step {progress['step']}/{total_steps} from {paths.state}")
    else:
        if saved is not None:
            tqdm.write(f"sft {role}: {paths.state} was saved by a run with other settings or data; "
                       "starting afresh")
        if accelerator.is_main_process:
            shutil.rmtree(paths.state, ignore_errors=True)
            paths.state.mkdir(parents=True, exist_ok=True)
        progress = {"fingerprint": fingerprint, "step": 0, "total_steps": total_steps,
                    "checkpoint_steps": save_steps, "checkpoints": [],
                    "loss_since_checkpoint": 0.0, "steps_since_checkpoint": 0,
                    "plan": [{"micro_batches": s.micro_batches, "epoch": s.epoch} for s in plan]}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        truncate_log(log_path, progress["step"])
        if role == "teacher":
            for record in progress["checkpoints"]:  # Snakemake may have deleted them
                publish_dir(paths.state / record["path"], paths.output / record["path"])

    unwrapped = accelerator.unwrap_model(wrapper).model
    pad_id = tokenizer.pad_token_id
    log_every = sft["log_every"]
    resume_every_s = sft["resume_every_minutes"] * 60
    last_save = time.monotonic()
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.monotonic()
    bar = tqdm(total=total_steps, initial=progress["step"], desc=f"sft {role}", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)

    for step_index in range(progress["step"], total_steps):
        planned = plan[step_index]
        step_weight = sum(float(train["weight"].iat[r]) for rows in planned.micro_batches for r in rows)
        mine, share = process_share(planned.micro_batches, process, processes)
        local_loss, local_tokens = backward_step(wrapper, train, mine, max(step_weight, 1e-12), pad_id,
                                                 accelerator, loss_scale=processes * share)
        if sft["max_grad_norm"] is not None:
            accelerator.clip_grad_norm_(wrapper.parameters(), sft["max_grad_norm"])
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step = step_index + 1
        totals = accelerator.reduce(torch.tensor([local_loss / processes, float(local_tokens)],
                                                 device=accelerator.device), reduction="sum")
        step_loss, step_tokens = float(totals[0]), int(totals[1])
        progress["step"] = step
        progress["loss_since_checkpoint"] += step_loss
        progress["steps_since_checkpoint"] += 1
        window_loss, window_steps, window_tokens = window_loss + step_loss, window_steps + 1, window_tokens + step_tokens
        tokens_per_s = window_tokens / max(time.monotonic() - window_start, 1e-9)
        bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", tok_s=f"{tokens_per_s:.0f}")
        bar.update(1)
        if accelerator.is_main_process and (step % log_every == 0 or step == total_steps):
            append_log(log_path, {"step": step, "epoch": planned.epoch,
                                   "loss": window_loss / window_steps,
                                   "lr": step_lr,
                                   "tokens_per_s": round(tokens_per_s, 1)})
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.monotonic()

        if step in save_steps:
            index = save_steps.index(step) + 1
            unwrapped.eval()
            with accelerator.autocast():
                predictions = predict_split(unwrapped, tokenizer, val, config["evaluate"]["batch_size"],
                                            config["evaluate"]["max_new_tokens"], where="val")
            unwrapped.train()
            val_metrics = summarise(predictions, kind, categories, weights_kind)["metrics"]
            record = {"index": index, "path": f"ckpt-{index}", "step": step, "epoch": planned.epoch,
                      "train_loss": progress["loss_since_checkpoint"] / progress["steps_since_checkpoint"],
                      "val_loss": val_metrics["loss"], "val_metric": val_metrics[metric_name]}
            record = json_safe(record)
            progress["checkpoints"].append(record)
            progress["loss_since_checkpoint"], progress["steps_since_checkpoint"] = 0.0, 0
            if accelerator.is_main_process:
                _save_checkpoint(unwrapped, tokenizer, paths.state / record["path"], paths.base_model)
                append_log(log_path, {"event": "checkpoint", **record, "val_metrics": json_safe(val_metrics)})
                if role == "teacher":
                    publish_dir(paths.state / record["path"], paths.output / record["path"])
            save_resume_state(accelerator, paths.state, progress)
            last_save = time.monotonic()
        elif step < total_steps and time.monotonic() - last_save >= resume_every_s:
            save_resume_state(accelerator, paths.state, progress)
            last_save = time.monotonic()
        if after_step is not None:
            after_step(step)
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(config, role, paths, progress["checkpoints"], metric_name)
    accelerator.wait_for_everyone()
    return paths.output


def _finish(config: dict, role: str, paths: SftPaths, records: list[dict], metric_name: str) -> None:
    """Publish the outputs (checkpoints.json last, or student_sft/ at once); drop the resume state."""
    log_path = paths.state / LOG_FILE
    if role == "teacher":
        paths.output.mkdir(parents=True, exist_ok=True)
        wanted = {record["path"] for record in records}
        for stale in paths.output.glob("ckpt-*"):  # left by an earlier run with more checkpoints
            if stale.name not in wanted:
                shutil.rmtree(stale)
        for record in records:
            if not (paths.output / record["path"]).is_dir():
                publish_dir(paths.state / record["path"], paths.output / record["path"])
        shutil.copy2(log_path, paths.output / LOG_FILE)
        write_effective_config(config, paths.output, "sft")
        best = best_checkpoint_index(records)
        write_json(paths.output / "checkpoints.json",
                   {"metric": metric_name, "best_index": best,
                    "checkpoints": [{**record, "best": record["index"] == best} for record in records]})
    else:
        config_file = write_effective_config(config, paths.state, "sft")
        publish_dir(paths.state / records[-1]["path"], paths.output, extra=[log_path, config_file])
    shutil.rmtree(paths.state)
