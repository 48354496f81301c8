"""Opening the model directories the pipeline writes, for every stage that runs a model.

``prepare-model`` writes ``{results_dir}/models/{role}_base/`` (see ``stages/prepare_model.py``);
``sft`` and ``distill`` write plain Hugging Face directories or LoRA adapters. :func:`load_model`
opens any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scd_pipeline.engine.io import read_json
from scd_pipeline.engine.tokenization import load_tokenizer
from scd_pipeline.errors import ModelError

TINY_SOURCE = "tiny:llama"        # models.{role}.source: a tiny random Llama (tests, smoke runs)
TEACHER_SOURCE = "teacher_base"   # models.student.source: the prepared teacher


def model_dir(config: dict, role: str) -> Path:
    """Where ``prepare-model --role {role}`` writes: ``{results_dir}/models/{role}_base``."""
    return Path(config["results_dir"]) / "models" / f"{role}_base"


# --------------------------------------------------------------------------- loading


def torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return names[dtype]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0]}" if text else exc.__class__.__name__


def check_model_dir(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model directory {path}: not found (pass a directory written by prepare-model, "
                         "sft or distill)")
    if not path.is_dir():
        raise ModelError(f"model directory {path}: is a file; pass the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path}: not a Hugging Face model directory (no config.json)")


def from_pretrained(source: str, dtype: Any = "auto", **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` with a one-line ModelError instead of a traceback."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... here
        raise ModelError(f"model {source}: cannot be loaded ({first_line(exc)})") from exc


def is_model_dir(path: str | Path) -> bool:
    """A directory :func:`load_model` opens: a Hugging Face model or a LoRA adapter (``sft.mode: lora``)."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def adapter_base_path(adapter_dir: str | Path) -> Path:
    """The base model directory recorded in a LoRA adapter's ``adapter_config.json``.

    The recorded path is tried as written (relative to the working directory, as sft saves it)
    and then relative to the adapter directory.
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    recorded = read_json(config_file).get("base_model_name_or_path")
    if not recorded:
        raise ModelError(f"{config_file}: no base_model_name_or_path; cannot tell which base model "
                         "the adapter belongs to")
    for candidate in (Path(recorded), adapter_dir / recorded):
        if candidate.is_dir():
            return candidate
    raise ModelError(f"{config_file}: base model {recorded} not found (run from the directory the "
                     "adapter was trained in, or fix base_model_name_or_path)")


def load_model(path: str | Path, dtype: str = "auto", device: str | None = None):
    """Open any model directory the pipeline writes; return ``(model, tokenizer)`` in eval mode.

    A LoRA adapter directory (``adapter_config.json``, as ``sft.mode: lora`` writes) is merged
    into the base it records, so every stage gets a plain causal LM. ``dtype="auto"`` is bfloat16
    on a CUDA device that supports it, float32 otherwise (fastest on CPU); ``device`` defaults to
    CUDA when available.
    """
    import torch

    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_model(adapter_base_path(path), dtype=dtype, device=device)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        if _has_tokenizer(path):
            tokenizer = load_tokenizer(path)
        return model.eval(), tokenizer
    check_model_dir(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(str(path), dtype=torch_dtype(dtype, device))
    tokenizer = load_tokenizer(path)
    return model.to(device).eval(), tokenizer


def select_layers(num_layers: int, keep_layers: list[int] | None, keep_every: int | None,
                  key: str) -> list[int]:
    """Decoder layer indices to keep: ``keep_layers`` if given, else ``0, k, 2k, ...``, else all.

    ``key`` (e.g. ``models.student``) names the config keys in errors.
    """
    if keep_layers is not None:
        where = f"config key {key}.keep_layers"
        if not keep_layers:
            raise ModelError(f"{where}: empty; list at least one decoder layer (or null for all)")
        bad = [i for i in keep_layers if not 0 <= i < num_layers]
        if bad:
            raise ModelError(f"{where}: layer {bad[0]} is out of range (the model has {num_layers} "
                             f"decoder layers, 0..{num_layers - 1})")
        if len(set(keep_layers)) != len(keep_layers):
            raise ModelError(f"{where}: {keep_layers} repeats a layer; list each layer once")
        if list(keep_layers) != sorted(keep_layers):
            raise ModelError(f"{where}: {keep_layers} is not in increasing order; sort it")
        return list(keep_layers)
    if keep_every is not None:
        if keep_every < 1:
            raise ModelError(f"config key {key}.keep_every: {keep_every} must be at least 1")
        return list(range(0, num_layers, keep_every))
    return list(range(num_layers))
