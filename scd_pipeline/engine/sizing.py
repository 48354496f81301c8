"""The inputs of ``scd-pipeline plan``: model shapes (built on the meta device: no weights are read
or downloaded) and the data's size, from a config; the arithmetic is ``math/sizing.py``."""

from __future__ import annotations

from pathlib import Path

from scd_pipeline.engine.config import task_dir
from scd_pipeline.engine.io import read_json
from scd_pipeline.engine.models import (
    TEACHER_SOURCE,
    TINY_SOURCE,
    is_model_dir,
    model_dir,
    select_layers,
)
from scd_pipeline.errors import ConfigError, DataError, ModelError
from scd_pipeline.math.sizing import (
    Estimate,
    Hardware,
    ModelShape,
    Workload,
    plan_estimates,
    requested,
)


def _source_config(config: dict, role: str):
    """The Hugging Face config the role's model is (or will be) prepared from."""
    from transformers import AutoConfig

    prepared = model_dir(config, role)
    if is_model_dir(prepared) and (prepared / "config.json").is_file():
        return AutoConfig.from_pretrained(prepared), False  # already pruned
    spec = config["models"][role]
    source = spec["source"]
    if role == "student" and source == TEACHER_SOURCE:
        return _source_config(config, "teacher")[0], True
    if source == TINY_SOURCE:
        from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama

        return tiny_llama(byte_level_tokenizer(), **config["models"]["tiny"]).config, True
    if source.startswith("embedded:"):
        raise ModelError(f"models.{role}.source {source}: its shape is read from the prepared model; run "
                         f"`scd-pipeline prepare-model --role {role}` first")
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True), True
    except Exception as exc:  # OSError, ValueError: no such directory or cached hub id
        raise ModelError(f"models.{role}.source {source}: no config.json there or in the local Hugging Face "
                         "cache; give a local model directory (its config.json is enough for a plan)") from exc


def model_shape(config: dict, role: str) -> ModelShape:
    """Parameters, layers, hidden size and head rows of the role's model, after its layer pruning."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_config, prune = _source_config(config, role)
    if prune:
        spec = config["models"][role]
        kept = select_layers(hf_config.num_hidden_layers, spec.get("keep_layers"), spec.get("keep_every"),
                             f"models.{role}")
        hf_config.num_hidden_layers = len(kept)
        for key in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the kept layers
            values = getattr(hf_config, key, None)
            if isinstance(values, list) and len(values) > len(kept):
                setattr(hf_config, key, [values[i] for i in kept])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return ModelShape(params=sum(p.numel() for p in model.parameters()), layers=hf_config.num_hidden_layers,
                      hidden=hf_config.hidden_size, vocab=int(model.get_output_embeddings().weight.shape[0]))


def workload(config: dict, rows: int | None = None, prompt_tokens: float | None = None,
             completion_tokens: float | None = None) -> Workload:
    """Rows and mean token lengths: the prepared data's manifest, else the given values (``rows``
    defaults to data.max_train_samples)."""
    manifest_path = task_dir(config) / "data" / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else None
    if manifest is not None:
        sizes, lengths = manifest["split_sizes"], manifest["token_lengths"]["train"]
        val = min(config["sft"]["val_max_samples"] or sizes["val"], sizes["val"])  # scored per checkpoint
        return Workload(rows or sizes["train"], val, sizes["test"],
                        prompt_tokens or lengths["prompt"]["mean"], completion_tokens or lengths["completion"]["mean"])
    rows = rows or config["data"]["max_train_samples"]
    if rows is None or prompt_tokens is None or completion_tokens is None:
        raise DataError(f"{Path(manifest_path)}: not found; give --rows (or data.max_train_samples), "
                        "--prompt-tokens and --completion-tokens, or run `scd-pipeline prepare-data` first")
    val = config["sft"]["val_max_samples"] or max(1, round(rows * config["data"]["val_fraction"]))
    return Workload(rows, val, 100, prompt_tokens, completion_tokens)


def uses_fsdp(config: dict) -> bool:
    """The training rules run under FSDP: resources.accelerate_config names an FSDP config."""
    import yaml

    setup = config["resources"]["accelerate_config"]
    if not setup or config["resources"]["gpus"] <= 1:
        return False
    path = Path(setup)
    if not path.is_file():
        raise DataError(f"resources.accelerate_config {setup}: not found (a path from the working directory)")
    return str((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("distributed_type", "")).upper() == "FSDP"


def plan_run(config: dict, hardware: Hardware, work: Workload) -> tuple[ModelShape, ModelShape, list[Estimate]]:
    """The model shapes and, per rule, what one task's workflow costs under ``config``."""
    teacher, student = model_shape(config, "teacher"), model_shape(config, "student")
    sft, distill = config["sft"], config["distill"]
    checkpoints = sft["teacher"]["n_checkpoints"]
    estimates = plan_estimates(
        teacher, student, work, hardware, checkpoints=checkpoints, teacher_epochs=sft["teacher"]["epochs"],
        student_epochs=sft["student"]["epochs"], phases=distill["phases"] or checkpoints,
        epochs_per_phase=distill["epochs_per_phase"], methods=len(distill["methods"]),
        replicates=config["replicates"], top_k=config["cache"]["top_k"], sft_batch=sft["batch_size"],
        distill_batch=distill["batch_size"], score_batch=config["cache"]["batch_size"],
        sft_checkpointing=sft["gradient_checkpointing"], distill_checkpointing=distill["gradient_checkpointing"],
        fsdp=uses_fsdp(config))
    return teacher, student, estimates


# The Snakemake rules that take their resources from the plan: rule -> (the estimate of the work it
# does, its fixed host memory in MB and runtime in minutes: what it requests on a CPU or before the
# plan is known; the memory is also the floor of the planned request).
PLANNED_RULES = {
    "sft_teacher": ("sft_teacher", 16000, 480),
    "sft_student": ("sft_student", 16000, 480),
    "sft_student_replicate": ("sft_student", 16000, 480),
    "distill": ("distill", 16000, 480),
    "cache_logits": ("cache_logits", 8000, 120),
    "cache_logits_synthetic": ("cache_logits", 8000, 60),
    "estimate_subdomains": ("estimate_subdomains", 8000, 60),
    "estimate_subdomains_synthetic": ("estimate_subdomains", 8000, 60),
    "evaluate": ("evaluate (T*, base teacher)", 8000, 60),
}


def rule_resources(config: dict) -> dict[str, tuple[int, int]] | None:
    """Per planned rule, ``(mem_mb, runtime minutes)`` a job requests on GPUs (``requested``), from
    the plan of this config; None while the models' shapes or the prepared data cannot be read yet
    (the rules then request their fixed values; Snakemake evaluates again when a job is ready, its
    inputs made)."""
    try:
        work = workload(config)
        _, _, estimates = plan_run(config, Hardware(gpus=max(config["resources"]["gpus"], 1)), work)
    except (ConfigError, DataError, ModelError, OSError, ValueError, KeyError):  # not known (yet), or unreadable
        return None
    return rule_requests(estimates)


def rule_requests(estimates: list[Estimate]) -> dict[str, tuple[int, int]]:
    """Per planned rule, ``(mem_mb, runtime minutes)`` from the plan's ``estimates``."""
    by_name = {e.rule: e for e in estimates}
    return {rule: requested(by_name[estimate], floor) for rule, (estimate, floor, _) in PLANNED_RULES.items()}
