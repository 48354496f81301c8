"""The pipeline's stages: one module per ``scd-pipeline`` command and per ``workflow/rules/*.smk``.

A stage reads its inputs as artifacts on disk and writes its outputs; it never imports another
stage. Each declares what it writes in ``artifacts(config, **ids)``, which the command locks before
the stage runs (``engine/locking.py``) and whose leftovers of a killed run it removes.
"""

from __future__ import annotations

from importlib import import_module

from scd_pipeline.engine.locking import Artifact

COMMANDS = ("prepare-model", "prepare-data", "sft", "cache-logits", "estimate-subdomains", "ioa-plan",
            "synthesize", "distill", "evaluate", "report")


def module_name(command: str) -> str:
    """``scd_pipeline.stages.<command with '-' as '_'>``: the module of ``scd-pipeline COMMAND``."""
    if command not in COMMANDS:
        raise ValueError(f"no stage named {command!r}; the stages are {', '.join(COMMANDS)}")
    return f"{__name__}.{command.replace('-', '_')}"


def artifacts(command: str, config: dict, **ids) -> list[Artifact]:
    """What ``scd-pipeline COMMAND`` writes (docs/ARTIFACTS.md), as its stage declares it.

    ``role`` for prepare-model and sft, ``checkpoint`` (and ``synthetic``) for cache-logits,
    ``synthetic`` for estimate-subdomains, ``name`` (the output name after defaults) for distill
    and evaluate.
    """
    return import_module(module_name(command)).artifacts(config, **ids)
