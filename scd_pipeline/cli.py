"""The ``scd-pipeline`` command: one sub-command per pipeline stage.

Every command reads the validated config (``--config``, default: ./config.yaml or the repository's),
applies its own options and any ``--set key.path=value`` on top, and writes the effective config
beside its outputs. Heavy libraries are imported inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from scd_pipeline.errors import ScdError

app = typer.Typer(
    name="scd-pipeline",
    help="Distil a fine-tuned domain LLM (teacher) into a smaller student: data, models, SFT, "
    "logit caches, subdomains, scheduled distillation, evaluation, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (default: ./config.yaml if present, "
                 "else the repository's config.yaml).", show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any config key, e.g. --set data.max_length=256 "
                 "(repeatable; value parsed as YAML).", show_default=False),
]
TaskOption = Annotated[
    Optional[str],
    typer.Option("--task", "-t", help="Task name: demo, crade, rrtnm, smdis, jmmlu_med, nrner, "
                 "pubmedqa or custom (default: config 'task').", show_default=False),
]
ResultsOption = Annotated[
    Optional[Path],
    typer.Option("--results-dir", help="Root of all outputs (default: config 'results_dir').",
                 show_default=False),
]


class Role(str, Enum):
    teacher = "teacher"
    student = "student"


def build_config(config_path: Optional[Path], sets: Optional[list[str]], **options: Any) -> dict:
    """Config file, then explicit options (dotted keys), then ``--set`` assignments; validated."""
    from scd_pipeline.config import load_config, parse_assignment

    if config_path is None and Path("config.yaml").is_file():
        config_path = Path("config.yaml")
    overrides = {key: value for key, value in options.items() if value is not None}
    for assignment in sets or []:
        key, value = parse_assignment(assignment)
        overrides[key] = value
    return load_config(config_path, overrides)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command("prepare-data")
def prepare_data_command(
    task: TaskOption = None,
    config: ConfigOption = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Tokenizer directory (default: the prepared teacher, {results_dir}/models/teacher_base).",
        show_default=False)] = None,
    jmed_root: Annotated[Optional[Path], typer.Option(
        help="JMED-LLM data root (default: config data.jmed_root).", show_default=False)] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(
        help="Cap on training rows (default: config data.max_train_samples).", show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option(
        help="Cap on prompt+completion tokens; over-long prompts are cut (default: config "
        "data.max_length).", show_default=False)] = None,
    balance: Annotated[Optional[str], typer.Option(
        help="Class balancing of the training split: none, undersample, oversample, weights.",
        show_default=False)] = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Build train/val/test Parquet splits and manifest.json under {results_dir}/{task}/data/."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"data.jmed_root": str(jmed_root) if jmed_root else None,
                              "data.max_train_samples": max_train_samples,
                              "data.max_length": max_length, "data.balance": balance})
        from scd_pipeline.data import prepare_data

        out = prepare_data(cfg, tokenizer_path=tokenizer)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}")


@app.command("prepare-model")
def prepare_model_command(
    role: Annotated[Role, typer.Option(help="Which model to prepare.")] = Role.teacher,
    source: Annotated[Optional[str], typer.Option(
        help="Hub id, local directory, embedded:smollm2-135m-instruct, tiny:llama, or (student) "
        "teacher_base (default: config models.{role}.source).", show_default=False)] = None,
    keep_every: Annotated[Optional[int], typer.Option(
        help="Depth-prune: keep every k-th decoder layer (default: config models.{role}.keep_every).",
        show_default=False)] = None,
    keep_layers: Annotated[Optional[str], typer.Option(
        help="Depth-prune: comma-separated decoder layer indices to keep, e.g. 0,4,8 "
        "(default: config models.{role}.keep_layers).", show_default=False)] = None,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Write {results_dir}/models/{role}_base/ (safetensors + tokenizer + model_manifest.json)."""
    try:
        layers = None
        if keep_layers:
            try:
                layers = [int(part) for part in keep_layers.split(",") if part.strip()]
            except ValueError:
                _fail(f"--keep-layers {keep_layers!r}: expected comma-separated integers, e.g. 0,4,8")
        cfg = build_config(config, set_, results_dir=str(results_dir) if results_dir else None,
                           **{f"models.{role.value}.source": source,
                              f"models.{role.value}.keep_every": keep_every,
                              f"models.{role.value}.keep_layers": layers})
        from scd_pipeline.models import prepare_model

        out = prepare_model(cfg, role.value)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
