"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the training loop: sharding, inference on a
sharded model, the whole state dict, and a sharded resume state.

accelerate applies FSDP only on accelerators: on a CPU process group (gloo) its ``prepare`` wraps
the model in plain DDP whatever the launch config says. When the launch asks for FSDP
(``accelerate launch --config_file workflow/accelerate/fsdp.yaml`` sets ``ACCELERATE_USE_FSDP``)
and accelerate will not shard, :func:`shard` does it here: one unit per decoder layer, then the
root. On GPUs accelerate shards; everything after that (inference, state dicts, resume) goes
through the functions below either way, chosen by whether the model *is* sharded, not by who
sharded it.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from scd_pipeline.errors import ConfigError

MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (``distributed_type: FSDP`` in the accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shards_below_accelerate(accelerator) -> bool:
    """FSDP was asked for but accelerate will not apply it (several CPU processes)."""
    return fsdp_requested() and accelerator.num_processes > 1 and not getattr(accelerator, "is_fsdp2", False) \
        and accelerator.distributed_type.name == "MULTI_CPU"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: modules of its ``_no_split_modules`` classes (or subclasses:
    ``fully_shard`` turns a layer's class into ``FSDPLlamaDecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def shard(wrapper: torch.nn.Module) -> int:
    """``fully_shard`` each decoder layer of ``wrapper.model``, then ``wrapper`` (the root: the
    embeddings, final norm and head). ``FSDP_RESHARD_AFTER_FORWARD`` (set by the launcher from
    ``fsdp_reshard_after_forward``) decides whether a layer frees its gathered weights after its
    forward. Returns the number of layer units. Build the optimizer after this call: the
    parameters become sharded ``DTensor``s."""
    from torch.distributed.fsdp import fully_shard

    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "shard_grad_op")
    layers = decoder_layers(wrapper.model)
    if not layers:
        raise ConfigError("FSDP: the model names no decoder layer class (_no_split_modules); it cannot be "
                          "sharded layer by layer")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(wrapper, reshard_after_forward=reshard)
    return len(layers)


def check_units(model: torch.nn.Module) -> int:
    """The number of decoder layers that are FSDP units; a ConfigError when none is: FSDP would then
    gather the whole model at once (one unit) and its activation checkpointing would wrap nothing."""
    from torch.distributed.fsdp import FSDPModule

    layers = decoder_layers(model)
    units = sum(isinstance(layer, FSDPModule) for layer in layers)
    if not units:
        names = sorted(getattr(model, "_no_split_modules", None) or [])
        raise ConfigError(f"FSDP made none of the {len(layers)} decoder layers ({', '.join(names) or 'none named'}) "
                          "a unit of its own; set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (or "
                          "fsdp_transformer_layer_cls_to_wrap) in the accelerate config")
    return units


def is_sharded(module: torch.nn.Module) -> bool:
    """Some of ``module``'s parameters are FSDP shards (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def several_processes() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


@contextlib.contextmanager
def gathered_root(root: torch.nn.Module) -> Iterator[None]:
    """Inference on the inner model of a sharded ``root`` (e.g. ``generate``, which calls the
    model many times outside ``root.forward``): the root unit's own weights (embeddings, norm,
    head) are gathered for the duration; each decoder layer gathers its own in its forward, as in
    training, so no process ever holds the whole model. A collective: every process runs the same
    number of forwards (generation stays in step through ``synced_gpus``)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    # Before the first training forward (SCD's probe at phase 1) FSDP has not yet found its root; a
    # layer's forward would then make itself the root. Settle it here, as the root's forward would.
    root._get_fsdp_state()._lazy_init()
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded ``module``, assembled on rank 0 in CPU memory (empty on
    the other processes). A collective. Tied parameters (e.g. embeddings and head) come back as one
    tensor under each name, as from an unsharded model, so ``save_pretrained`` stores them once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for tied in names.values():
        for other in tied[1:]:
            if tied[0] in full:
                full[other] = full[tied[0]]
    return full


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng-{rank}.pt"


def save_sharded(directory: str | Path, module: torch.nn.Module, optimizer, rank: int) -> None:
    """Model and optimizer shards (``torch.distributed.checkpoint``: each process writes its own
    part, nothing is gathered) and this process's RNG states into ``directory``. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(module, _raw(optimizer))
    dcp.save({MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}, checkpoint_id=str(directory))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, _rng_file(directory, rank))


def load_sharded(directory: str | Path, module: torch.nn.Module, optimizer, rank: int) -> None:
    """Undo :func:`save_sharded` into a model sharded the same way. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(module, _raw(optimizer))
    state = {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(module, _raw(optimizer), model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIMIZER_KEY])
    rng = torch.load(_rng_file(directory, rank), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
