"""The ``scd-pipeline`` command: one sub-command per pipeline stage.

Every command reads the validated config (``--config``, default: ./config.yaml, else the defaults
shipped with the package; ``scd-pipeline init`` writes them out to edit),
applies its own options and any ``--set key.path=value`` on top, and writes the effective config
beside its outputs. Heavy libraries are imported inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import gc
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from scd_pipeline.errors import ConfigError, ScdError


class _OneLineErrors(TyperGroup):
    """A file-system error anywhere in a stage (read-only disk, a file where a folder belongs, a
    full disk) ends the command with one ``error:`` line naming the path, exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as exc:
            from scd_pipeline.engine.io import describe_os_error

            _fail(describe_os_error(exc))


app = typer.Typer(
    cls=_OneLineErrors,
    name="scd-pipeline",
    help="Distil a fine-tuned domain LLM (teacher) into a smaller student: data, models, SFT, "
    "logit caches, subdomains, scheduled distillation, evaluation, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file, merged onto the defaults (default: "
                 "./config.yaml if present; `scd-pipeline init` writes one).", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key, e.g. --set data.max_length=256 "
                 "(repeatable; value parsed as YAML).", show_default=False),
]
TaskOption = Annotated[
    str | None,
    typer.Option("--task", "-t", help="Task name: demo, crade, rrtnm, smdis, jmmlu_med, nrner, "
                 "pubmedqa or custom (default: config 'task').", show_default=False),
]
ResultsOption = Annotated[
    Path | None,
    typer.Option("--results-dir", help="Root of all outputs (default: config 'results_dir').",
                 show_default=False),
]


@app.callback()
def _announce_cluster_job() -> None:
    """Under SLURM, say which job and node ran the stage (the first line of every rule log)."""
    import os
    import socket

    job = os.environ.get("SLURM_JOB_ID")
    if job:
        typer.echo(f"[scd-pipeline] SLURM job {job} on {socket.gethostname()}", err=True)


class Role(str, Enum):
    teacher = "teacher"
    student = "student"


def build_config(config_path: Path | None, sets: list[str] | None, **options: Any) -> dict:
    """Config file, then explicit options (dotted keys), then ``--set`` assignments; validated."""
    from scd_pipeline.engine.config import load_config, parse_assignment

    if config_path is None and Path("config.yaml").is_file():
        config_path = Path("config.yaml")
    overrides = {key: value for key, value in options.items() if value is not None}
    for assignment in sets or []:
        key, value = parse_assignment(assignment)
        overrides[key] = value
    return load_config(config_path, overrides)


def _lock(command: str, config: dict, **ids):
    """The exclusive locks of what ``command``'s stage declares it writes, held for the block."""
    from scd_pipeline.engine.locking import stage_lock
    from scd_pipeline.stages import artifacts

    return stage_lock(config, artifacts(command, config, **ids))


def _fail(message: str) -> None:
    """End the command with one ``error:`` line and exit status 2."""
    from scd_pipeline.engine import worklog

    worklog.discard()  # the error is the one line a failed stage writes
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command("init")
def init_command(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("config.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write the default config (every key, with a comment) to PATH to edit; stages then read it
    from the working directory, or pass it with --config."""
    from scd_pipeline.engine.config import DEFAULT_CONFIG
    from scd_pipeline.engine.io import atomic_path

    if path.exists() and not force:
        _fail(f"{path}: already exists; edit it, or pass --force to overwrite it with the defaults")
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(DEFAULT_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    except OSError as exc:
        _fail(f"{path}: cannot write the config ({exc.strerror}); choose a writable place")
    typer.echo(f"wrote {path}: every setting with its default; edit it, then run the stages from this folder")


@app.command("prepare-data")
def prepare_data_command(
    task: TaskOption = None,
    config: ConfigOption = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="Tokenizer directory (default: the prepared teacher, {results_dir}/models/teacher_base).",
        show_default=False)] = None,
    jmed_root: Annotated[Path | None, typer.Option(
        help="JMED-LLM data root (default: config data.jmed_root).", show_default=False)] = None,
    max_train_samples: Annotated[int | None, typer.Option(
        help="Cap on training rows (default: config data.max_train_samples).", show_default=False)] = None,
    max_length: Annotated[int | None, typer.Option(
        help="Cap on prompt+completion tokens; over-long prompts are cut (default: config "
        "data.max_length).", show_default=False)] = None,
    balance: Annotated[str | None, typer.Option(
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
        from scd_pipeline.stages.prepare_data import prepare_data

        with _lock("prepare-data", cfg):
            out = prepare_data(cfg, tokenizer_path=tokenizer)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}")


@app.command("prepare-model")
def prepare_model_command(
    role: Annotated[Role, typer.Option(help="Which model to prepare.")] = Role.teacher,
    source: Annotated[str | None, typer.Option(
        help="Hub id, local directory, embedded:smollm2-135m-instruct, tiny:llama, or (student) "
        "teacher_base (default: config models.{role}.source).", show_default=False)] = None,
    keep_every: Annotated[int | None, typer.Option(
        help="Depth-prune: keep every k-th decoder layer (default: config models.{role}.keep_every).",
        show_default=False)] = None,
    keep_layers: Annotated[str | None, typer.Option(
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
        from scd_pipeline.stages.prepare_model import prepare_model

        with _lock("prepare-model", cfg, role=role.value):
            out = prepare_model(cfg, role.value)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}")


@app.command("cache-logits")
def cache_logits_command(
    checkpoint: Annotated[int, typer.Option(
        "--checkpoint", help="Teacher checkpoint index K (teacher/ckpt-K, as in checkpoints.json).")],
    task: TaskOption = None,
    top_k: Annotated[int | None, typer.Option(
        help="Teacher log-probs kept per completion token, plus one tail bucket (default: config "
        "cache.top_k).", show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option(
        help="Stored log-prob precision: fp16, fp32 or int8 (8-bit codes, 0.1 nat) (default: config cache.dtype).", show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Teacher temperature applied before caching (default: config cache.temperature).",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Samples per teacher forward (default: config cache.batch_size).", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(
        help="Split to cache: train, val or test (default: config cache.split).", show_default=False)] = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Cache IOA's teacher-written items (data/synthetic.parquet, from `synthesize`) "
        "instead of the split: logits/synthetic/ckpt-K.parquet.")] = False,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Cache one teacher checkpoint's top-k completion log-probs: {results_dir}/{task}/logits/ckpt-K.parquet
    + ckpt-K.meta.json (one job per checkpoint)."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"cache.top_k": top_k, "cache.dtype": dtype, "cache.temperature": temperature,
                              "cache.batch_size": batch_size, "cache.split": split})
        from scd_pipeline.stages.cache_logits import cache_logits

        with _lock("cache-logits", cfg, checkpoint=checkpoint, synthetic=synthetic):
            meta = cache_logits(cfg, checkpoint, synthetic)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {meta['path']}: {meta['rows']} samples, {meta['tokens']} completion tokens, "
               f"k={meta['k']} {meta['dtype']}, {meta['bytes_per_token']:.1f} B/token, "
               f"{meta['tokens_per_second']:.1f} tokens/s ({meta['capture_seconds']:.1f} s)")


@app.command("cache-info")
def cache_info_command(
    file: Annotated[Path, typer.Argument(help="A cache file, e.g. results/demo/logits/ckpt-1.parquet.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as one JSON object.")] = False,
) -> None:
    """Rows, tokens, k, dtype, size, bytes/token and the sidecar meta of a teacher-logit cache."""
    import json

    try:
        from scd_pipeline.engine.logit_cache import cache_info

        info = cache_info(file)
    except ScdError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    for key in ("path", "rows", "tokens", "k", "dtype", "id_dtype", "temperature", "format_version",
                "file_bytes", "row_groups"):
        typer.echo(f"{key}: {info[key]}")
    typer.echo(f"bytes_per_token: {info['bytes_per_token']:.2f}")
    typer.echo("meta: " + (json.dumps(info["sidecar"], default=str) if info["sidecar"] else
                           "MISSING sidecar (the cache will be refused; re-run cache-logits)"))
    if info["sidecar_mismatch"]:
        typer.echo(f"sidecar disagrees with the file on: {', '.join(info['sidecar_mismatch'])} (the cache "
                   "will be refused; re-run cache-logits)")


@app.command("run-on-gpus", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_on_gpus_command(
    context: typer.Context,
    gpus: Annotated[int, typer.Option(help="GPUs this command needs.")] = 1,
    of: Annotated[int, typer.Option(help="GPUs of this machine that the jobs share.")] = 1,
    slots: Annotated[Path, typer.Option(help="Folder of the per-GPU lock files (one per machine and "
                                              "results folder).")] = Path("results/.gpus"),
) -> None:
    """Run a command on GPUs no other job holds: wait until GPUS of the machine's OF are free,
    set CUDA_VISIBLE_DEVICES to them and run the command given after --; the GPUs are free
    again when it exits, however it ends. The workflow puts this before every job that uses a GPU
    when resources.local_gpus is set (several GPUs on one machine, no SLURM)."""
    try:
        from scd_pipeline.engine.gpu_slots import run_on_gpus

        run_on_gpus(gpus, of, slots, list(context.args))
    except (ScdError, OSError) as exc:
        _fail(str(exc) if isinstance(exc, ScdError) else f"run-on-gpus: {exc}")


@app.command("plan")
def plan_command(
    task: TaskOption = None,
    config: ConfigOption = None,
    gpus: Annotated[int | None, typer.Option(
        help="GPUs of a training job (default: config resources.gpus, at least 1).", show_default=False)] = None,
    peak_tflops: Annotated[float, typer.Option(help="Peak dense bf16 TFLOPS of one GPU (H100 SXM: 989).")] = 989.0,
    utilisation: Annotated[float, typer.Option(help="Share of the peak the jobs reach (MFU).")] = 0.4,
    rows: Annotated[int | None, typer.Option(
        help="Training rows (default: the prepared data's, else data.max_train_samples).", show_default=False)] = None,
    prompt_tokens: Annotated[float | None, typer.Option(
        help="Mean prompt tokens per row (default: the prepared data's).", show_default=False)] = None,
    completion_tokens: Annotated[float | None, typer.Option(
        help="Mean completion tokens per row (default: the prepared data's).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as one JSON object.")] = False,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Size a run before making it: per rule, its jobs, GPUs, compute time at the stated
    utilisation, GPU memory per GPU, host memory and disk, from the models' shapes (built on the
    meta device: nothing is downloaded or loaded) and the data. Estimates, not measurements."""
    import dataclasses
    import json

    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None)
        from scd_pipeline.engine.sizing import plan_run, rule_requests, workload
        from scd_pipeline.math.sizing import Hardware

        hardware = Hardware(gpus=gpus or max(cfg["resources"]["gpus"], 1), peak_tflops=peak_tflops,
                            utilisation=utilisation)
        work = workload(cfg, rows, prompt_tokens, completion_tokens)
        teacher, student, estimates = plan_run(cfg, hardware, work)
    except ScdError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"hardware": dataclasses.asdict(hardware), "workload": dataclasses.asdict(work),
                               "teacher": dataclasses.asdict(teacher), "student": dataclasses.asdict(student),
                               "rules": [dataclasses.asdict(e) for e in estimates],
                               "requests": {rule: {"mem_mb": mem, "runtime": minutes}
                                            for rule, (mem, minutes) in rule_requests(estimates).items()}}, indent=2))
        return
    typer.echo(f"teacher {teacher.params / 1e9:.2f} B parameters ({teacher.layers} layers, head {teacher.vocab} rows); "
               f"student {student.params / 1e9:.2f} B ({student.layers} layers, head {student.vocab})")
    typer.echo(f"data: {work.train_rows} training rows of {work.prompt_tokens:.0f} + {work.completion_tokens:.0f} "
               f"tokens, {work.val_rows} validation rows per checkpoint, {work.test_rows} test rows")
    typer.echo(f"GPUs: {hardware.gpus} per training job at {hardware.utilisation:.0%} of {hardware.peak_tflops:g} "
               "TFLOPS (estimates from counts: see scd_pipeline/math/sizing.py for what each leaves out)")
    header = f"{'rule':<28} {'jobs':>4} {'GPUs':>4} {'h/job':>8} {'GPU-h':>8} {'GPU GB':>7} {'host GB':>8} {'disk GB':>8}"
    typer.echo(header)
    for e in estimates:
        typer.echo(f"{e.rule:<28} {e.jobs:>4} {e.gpus:>4} {e.hours:>8.2f} {e.total_gpu_hours:>8.1f} "
                   f"{e.gpu_memory_gb:>7.1f} {e.host_memory_gb:>8.1f} {e.disk_gb:>8.1f}")
    typer.echo("what each job of a Snakemake rule requests with resources.gpus >= 1 (mem_mb, runtime minutes; "
               "--set-resources overrides):")
    typer.echo("  " + ", ".join(f"{rule} {mem} MB {minutes} min" for rule, (mem, minutes) in rule_requests(estimates).items()))


@app.command("estimate-subdomains")
def estimate_subdomains_command(
    task: TaskOption = None,
    probe_size: Annotated[int | None, typer.Option(
        help="Samples of the fixed probe set for the KL between checkpoints (default: config "
        "subdomains.probe_size).", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Samples per student forward (default: config cache.batch_size).", show_default=False)] = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="The same table for IOA's synthetic items (their caches logits/synthetic/): "
        "subdomains-synthetic.parquet + .json, AW of those rows for +aw curricula.")] = False,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """SFS/TFS, adaptive weights and KL(T* || c) from the SFT student and every checkpoint's cache:
    {results_dir}/{task}/subdomains.parquet + subdomains.json."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"subdomains.probe_size": probe_size, "cache.batch_size": batch_size})
        from scd_pipeline.stages.estimate_subdomains import estimate_subdomains

        with _lock("estimate-subdomains", cfg, synthetic=synthetic):
            summary = estimate_subdomains(cfg, synthetic)
    except ScdError as exc:
        _fail(str(exc))
    if synthetic:
        typer.echo(f"wrote {', '.join(summary['paths'])}: {summary['samples']} synthetic items")
        return
    loss = summary["loss"]
    typer.echo(f"wrote {', '.join(summary['paths'])}: SFS share {summary['sfs_share']:.3f}; loss gap "
               f"S-T* {loss['gap']:+.4f} = SFS {loss['advantage_sfs']:+.4f} + TFS {loss['deficit_tfs']:+.4f}; "
               f"error gap {summary['metric']['gap']:+.4f}; best checkpoint {summary['best_index']}")


@app.command("sft")
def sft_command(
    role: Annotated[Role, typer.Option(help="teacher: N dense checkpoints + checkpoints.json; "
                                       "student: the SFT baseline student_sft/.")] = Role.teacher,
    task: TaskOption = None,
    mode: Annotated[str | None, typer.Option(
        help="full or lora fine-tuning (default: config sft.mode).", show_default=False)] = None,
    epochs: Annotated[float | None, typer.Option(
        help="Epochs, fractions allowed (default: config sft.{role}.epochs).", show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate (default: config sft.{role}.lr).", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Samples per micro-batch (default: config sft.batch_size).", show_default=False)] = None,
    grad_accum: Annotated[int | None, typer.Option(
        help="Micro-batches per optimizer step (default: config sft.grad_accum).", show_default=False)] = None,
    n_checkpoints: Annotated[int | None, typer.Option(
        help="Teacher checkpoints evenly spaced over the run (default: config "
        "sft.teacher.n_checkpoints).", show_default=False)] = None,
    replicate: Annotated[int, typer.Option(
        help="Student only: replicate S > 0 trains with seed = config seed + S into "
        "{task}/student_sft_seeds/seed-S/ (the SFT student's seeds beside replicated methods).")] = 0,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Fine-tune {results_dir}/models/{role}_base on the task: {task}/teacher/ckpt-{k}/ +
    checkpoints.json, or {task}/student_sft/. Resumes a killed run from {task}/.state/sft-{role}/.
    Several GPUs: `accelerate launch -m scd_pipeline sft ...`."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"sft.mode": mode, f"sft.{role.value}.epochs": epochs,
                              f"sft.{role.value}.lr": lr, "sft.batch_size": batch_size,
                              "sft.grad_accum": grad_accum, "sft.teacher.n_checkpoints": n_checkpoints})
        from scd_pipeline.stages.sft import run_sft

        with _lock("sft", cfg, role=role.value, replicate=replicate):
            out = run_sft(cfg, role.value, replicate=replicate)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}")


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option(
        help="Model directory: a base model, teacher/ckpt-K, a LoRA adapter directory, student_sft "
        "or a distilled student.")],
    task: TaskOption = None,
    split: Annotated[str | None, typer.Option(
        help="test, val, or heldout (the extra held-out split, written to eval/heldout/; default: "
        "config evaluate.split).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="Output name eval/{name}.json (default: from the path, e.g. teacher-ckpt-3, student_sft).",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Samples per forward (default: config evaluate.batch_size).", show_default=False)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Generation budget of list tasks (default: config evaluate.max_new_tokens).",
        show_default=False)] = None,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Score a model on a prepared split: {results_dir}/{task}/eval/{name}.json (metrics overall and
    per tag) + {name}.predictions.parquet."""
    import json

    try:
        from scd_pipeline.engine.naming import HELDOUT_SPLIT, default_eval_name
        from scd_pipeline.stages.evaluate import evaluate

        if split not in (None, "test", "val", HELDOUT_SPLIT):
            raise ConfigError(f"--split {split!r}: expected test, val or {HELDOUT_SPLIT}")
        # the held-out split is a per-command choice (eval/heldout/), not a config value
        held = split == HELDOUT_SPLIT
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"evaluate.split": None if held else split, "evaluate.batch_size": batch_size,
                              "evaluate.max_new_tokens": max_new_tokens})
        split = split or cfg["evaluate"]["split"]
        with _lock("evaluate", cfg, name=name or default_eval_name(model), split=split):
            out = evaluate(cfg, model, split=split, name=name)
    except ScdError as exc:
        _fail(str(exc))
    result = json.loads(out.read_text(encoding="utf-8"))
    shown = ", ".join(f"{key} {value:.4f}" for key, value in result.get("metrics", {}).items() if value is not None)
    typer.echo(f"wrote {out}: {shown or result.get('empty', 'no metrics')}")


@app.command("report")
def report_command(
    task: TaskOption = None,
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated tasks, e.g. demo,smdis: write the paper's Table 1 across them "
        "({results_dir}/tasks-demo+smdis/report.md, report.html, summary.csv) instead of one task's "
        "report.", show_default=False)] = None,
    resamples: Annotated[int | None, typer.Option(
        help="Paired bootstrap resamples of the test rows, at least 1000 (default: config "
        "report.resamples).", show_default=False)] = None,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Compare the teacher (T*), the SFT student and every distilled student, with paired-bootstrap
    intervals: {results_dir}/{task}/report.md, report.html, summary.csv, sfs_tfs.csv and plots/*.png.
    Missing evaluations are listed as "not run"."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"report.resamples": resamples})
        from scd_pipeline.stages.report import build_report
        from scd_pipeline.stages.report.multitask import build_multitask_report, parse_tasks

        if tasks is not None:
            table = build_multitask_report(cfg, parse_tasks(tasks))
            typer.echo(f"wrote {table.markdown}, {table.html} and {table.summary_csv}")
            for line in table.missing:
                typer.echo(f"not run: {line}")
            return
        with _lock("report", cfg):
            result = build_report(cfg)
    except ScdError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {result.markdown}, {result.html}, {result.summary_csv}, {result.outcome_csv} and "
               f"{len(result.plots)} plots in {result.markdown.parent / 'plots'}")
    for line in result.missing_evals:
        typer.echo(f"not run: {line}")
    for line in result.missing_plots:
        typer.echo(f"missing plot: {line}")


@app.command("ioa-plan")
def ioa_plan_command(
    task: TaskOption = None,
    tau_gap: Annotated[float | None, typer.Option(
        help="A module is deficient when (P_T - P_S) / P_T exceeds this (default: config ioa.tau_gap).",
        show_default=False)] = None,
    tau_zpd: Annotated[float | None, typer.Option(
        help="Zone of proximal development: the largest drop in mean P_S from one stage to the next, as "
        "a share of the earlier stage's (default: config ioa.tau_zpd).", show_default=False)] = None,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """IOA's Identifier and Organizer: score T* and the SFT student per knowledge module on the
    validation split, mark deficient modules and order them into stages: {results_dir}/{task}/ioa/
    plan.json + val_scores.parquet."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"ioa.tau_gap": tau_gap, "ioa.tau_zpd": tau_zpd})
        from scd_pipeline.stages.ioa_plan import plan_curriculum

        with _lock("ioa-plan", cfg):
            plan = plan_curriculum(cfg)
    except ScdError as exc:
        _fail(str(exc))
    stages = " | ".join(", ".join(unit["unit"] for unit in stage["units"]) for stage in plan["stages"])
    typer.echo(f"wrote {', '.join(plan['paths'])}: {len(plan['modules'])} modules ({plan['basis']}), "
               f"deficient: {', '.join(plan['deficient']) or 'none'}; stages: {stages}")


@app.command("synthesize")
def synthesize_command(
    task: TaskOption = None,
    per_prompt: Annotated[int | None, typer.Option(
        help="Items the teacher samples from each few-shot prompt (default: config "
        "ioa.synthesis.per_prompt).", show_default=False)] = None,
    max_items_per_module: Annotated[int | None, typer.Option(
        help="Kept items per deficient module (default: config ioa.synthesis.max_items_per_module).",
        show_default=False)] = None,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """IOA's Adapter: T* writes remedial, standard and bridging items for every deficient module of
    ioa/plan.json, answers them, and keeps those that parse, that it is confident of and that are no
    near-duplicate of a validation or test row: {results_dir}/{task}/data/synthetic.parquet +
    ioa/synthesis.json. Resumes a killed run from {task}/.state/synthesize/."""
    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"ioa.synthesis.per_prompt": per_prompt,
                              "ioa.synthesis.max_items_per_module": max_items_per_module})
        from scd_pipeline.stages.synthesize import synthesize

        with _lock("synthesize", cfg):
            summary = synthesize(cfg)
    except ScdError as exc:
        _fail(str(exc))
    rejected = ", ".join(f"{reason} {count}" for reason, count in summary["rejected"].items() if count)
    typer.echo(f"wrote {', '.join(summary['paths'])}: {summary['generated']} generated, {summary['kept']} kept"
               + (f"; rejected: {rejected}" if rejected else ""))


class Weighting(str, Enum):
    none = "none"
    aw = "aw"
    paced = "paced"


@app.command("distill")
def distill_command(
    method: Annotated[str, typer.Option(
        help="td (T* every phase), cd (checkpoint k in phase k), scd (scheduled: argmin KL(T*||c) + "
        "KL(S||c) per phase), scd_aw (scd + adaptive weight), taid, or ioa (IOA's mastery-gated "
        "curriculum with T* targets); suffixes +aw / +paced / +ioa allowed, e.g. td+paced, scd_aw+ioa.")],
    weighting: Annotated[Weighting | None, typer.Option(
        help="Per-sample weighting added to the method: none, aw (KD weight L_S^SFT/(L_S^SFT+L_c*)) "
        "or paced (p(1-p) on the loss).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="Output folder students/{name} (default: the method string, plus +WEIGHTING).",
        show_default=False)] = None,
    task: TaskOption = None,
    phases: Annotated[int | None, typer.Option(
        help="Number of phases N (default: config distill.phases, null = one per teacher checkpoint).",
        show_default=False)] = None,
    epochs_per_phase: Annotated[float | None, typer.Option(
        help="Epochs per phase E, fractions allowed (default: config distill.epochs_per_phase).",
        show_default=False)] = None,
    init: Annotated[str | None, typer.Option(
        help="Initial student: base (models/student_base) or sft (student_sft) (default: config "
        "distill.init).", show_default=False)] = None,
    divergence: Annotated[str | None, typer.Option(
        help="KD divergence: forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl, generalized_jsd, "
        "total_variation or akl (default: config distill.divergence).", show_default=False)] = None,
    kd_weight: Annotated[float | None, typer.Option(
        help="lambda in (1 - lambda) CE + lambda KD when AW is off (default: config distill.kd_weight).",
        show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate of every phase (default: config distill.lr).", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Samples per micro-batch (default: config distill.batch_size).", show_default=False)] = None,
    config: ConfigOption = None,
    results_dir: ResultsOption = None,
    set_: SetOption = None,
) -> None:
    """Distil the student from the cached teacher checkpoints (no teacher forward):
    {results_dir}/{task}/students/{name}/ (model, train_log.jsonl, schedule.json). Resumes a killed
    run from {task}/.state/distill-{name}/. Several GPUs: `accelerate launch -m scd_pipeline distill ...`."""
    import json

    try:
        cfg = build_config(config, set_, task=task, results_dir=str(results_dir) if results_dir else None,
                           **{"distill.phases": phases, "distill.epochs_per_phase": epochs_per_phase,
                              "distill.init": init, "distill.divergence": divergence,
                              "distill.kd_weight": kd_weight, "distill.lr": lr, "distill.batch_size": batch_size})
        from scd_pipeline.engine.methods import default_name
        from scd_pipeline.stages.distill import run_distill
        from scd_pipeline.stages.distill.inputs import SCHEDULE_FILE

        weighting_name = weighting.value if weighting else None
        with _lock("distill", cfg, name=name or default_name(method, weighting_name)):
            out = run_distill(cfg, method, weighting_name, name)
    except ScdError as exc:
        _fail(str(exc))
    schedule = json.loads((out / SCHEDULE_FILE).read_text(encoding="utf-8"))
    checkpoints = ", ".join(str(phase["checkpoint"]) for phase in schedule["phases"])
    typer.echo(f"wrote {out}: {schedule['method']}, {schedule['n_phases']} phases from checkpoints "
               f"[{checkpoints}], {schedule['total_steps']} steps")


# --help lists the stages in pipeline order, whatever order they are defined in above.
PIPELINE_ORDER = ("init", "plan", "prepare-model", "prepare-data", "sft", "cache-logits", "cache-info",
                  "estimate-subdomains", "ioa-plan", "synthesize", "distill", "evaluate", "report", "run-on-gpus")
app.registered_commands.sort(key=lambda command: PIPELINE_ORDER.index(command.name))


# Allocations (net of frees) between young-generation collections in a stage's process; Python's
# default is 700.
GC_FIRST_THRESHOLD = 10_000


def main() -> None:
    """The ``scd-pipeline`` console command and ``python -m scd_pipeline``: one stage, one process.

    The cyclic garbage collector is set for a short process that loads torch and transformers
    (about a million objects that live until exit): with the default threshold, importing them
    sets off full collections that walk all of them (~1 s per job), and the interpreter walks them
    once more at exit (~1 s). A higher first threshold makes full collections rare, and freezing
    the heap when the stage returns leaves the exit walk out. Reference counting still frees
    tensors at once, and files and atexit handlers close as usual. Tests that call ``app`` in
    their own process keep Python's defaults.
    """
    gc.set_threshold(GC_FIRST_THRESHOLD, *gc.get_threshold()[1:])
    try:
        app(prog_name="scd-pipeline")
    finally:
        gc.freeze()
