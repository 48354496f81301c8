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
(``whole_run``; a curriculum under ``ioa.budget: matched`` gets the plain method's steps and
follows the same setting, an ``open`` one restarts at every pass). The teacher signal comes only from the caches ``logits/ckpt-{k}.parquet``: no
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
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.checkpoints import checkpoint_indices, read_checkpoints
from scd_pipeline.engine.io import sha256_file, sha256_text
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.logit_cache import LogitCache, open_task_cache
from scd_pipeline.engine.methods import Method, default_name, parse_method
from scd_pipeline.engine.training import (
    LoopSettings,
    StepResult,
    make_accelerator,
    model_identity,
    planned_steps,
    run_training,
    seed_everything,
)
from scd_pipeline.errors import ConfigError, DataError, ModelError
from scd_pipeline.stages.distill.curriculum import CurriculumRecipe, curriculum_inputs
from scd_pipeline.stages.distill.inputs import (
    DistillPaths,
    check_cache_covers,
    check_cache_width,
    distill_paths,
    read_subdomains,
    require_inputs,
    with_synthetic,
)
from scd_pipeline.stages.distill.objective import (
    AVERAGE,
    checkpoints_needed,
    fixed_schedule,
    phase_count,
)
from scd_pipeline.stages.distill.recipe import DistillRecipe

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
        frame, caches, curriculum, files = curriculum_inputs(config, paths, train, spec, caches, best, tokenizer)
        inputs += files
    elif spec.synthetic:  # the control: the curriculum's data without the curriculum
        frame, caches, _ = with_synthetic(config, paths, train, caches, tokenizer)
        inputs += [paths.synthetic] + ([paths.synthetic_subdomains, paths.synthetic_summary]
                                       if spec.needs_subdomains else [])
    for cache in caches.values():
        check_cache_covers(cache, frame)
        check_cache_width(cache, len(tokenizer))
    subdomains = None
    if spec.needs_subdomains:
        synthetic_caches = {k: c.caches[1] for k, c in caches.items()} if spec.uses_synthetic else None
        subdomains = read_subdomains(paths, frame, train_caches, synthetic_caches)

    accelerator = make_accelerator(settings["precision"])
    seed_everything(config["seed"])
    model, tokenizer = load_model(paths.init, dtype="float32", device="cpu")
    model.requires_grad_(True)  # every weight trains, also when init is a merged LoRA SFT student
    check_data_tokenizer(paths.data, tokenizer, paths.init)
    head = int(model.get_output_embeddings().weight.shape[0])
    if head < len(tokenizer):
        raise ModelError(f"{paths.init}: the student's head scores {head} ids but its tokenizer has "
                         f"{len(tokenizer)}; prepare the student from a model of this tokenizer")
    loop = LoopSettings.from_section(settings, settings["lr"], config["seed"])
    fingerprint = _fingerprint(config, spec, paths, caches, accelerator.num_processes, inputs)
    # the plain method's optimizer steps: phases x epochs_per_phase over the training rows (a
    # +synthetic control visits as many rows per phase, drawn from the training and synthetic rows)
    micro = loop.grad_accum * accelerator.num_processes
    phase_steps = planned_steps(len(train), loop.batch_size, micro, settings["epochs_per_phase"])
    plain = n_phases * phase_steps
    if spec.curriculum:  # a matched curriculum spends the same steps; an open one passes until its last gate
        recipe = CurriculumRecipe(config, spec, name, paths, frame, caches, schedule, best, subdomains, n_phases,
                                  plain if config["ioa"]["budget"] == "matched" else None,
                                  synthetic_rows=len(frame) - len(train), curriculum=curriculum)
    else:
        # a +synthetic control: each phase over the training and synthetic rows, cut at the plain phase's steps
        recipe = DistillRecipe(config, spec, name, paths, frame, caches, schedule, best, subdomains, n_phases, plain,
                               phase_steps if spec.synthetic else None, synthetic_rows=len(frame) - len(train))
    loop = dataclasses.replace(loop, restart_each_phase=recipe.lr_schedule == "per_phase")
    run_training(recipe, accelerator, model, tokenizer, frame, loop, paths.state, fingerprint, after_step)
    return paths.output


def artifacts(config: dict, *, name: str) -> list[Artifact]:
    """What ``distill --name NAME`` writes: the student folder, and its resume state."""
    paths = distill_paths(config, name)
    return [Artifact(paths.output, (paths.output,)), Artifact(paths.state, (paths.state,), resume_state=True)]
