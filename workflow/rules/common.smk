# Helpers shared by the rules: config validation, the config file jobs read, paths.
import json
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from scd_pipeline.engine.config import validate_config

validate_config(config)

TASK = config["task"]
RESULTS = config["results_dir"]
TASK_DIR = f"{RESULTS}/{TASK}"
MODELS = f"{RESULTS}/models"
GPUS = config["resources"]["gpus"]  # the training rules (SFT, distill): one process per GPU
GPUS_ONE = min(GPUS, 1)  # every other rule that runs a model: one process, at most one GPU
CONDA_ENV = os.path.join(workflow.basedir, "envs", "scd-pipeline.yaml")
# Threads of a job that has siblings to run beside it (caches, student SFT, distillations,
# evaluations): half the cores, 1 to 4, so two such jobs share the machine. On 2 cores two
# one-thread jobs finish a pair sooner than one two-thread job after the other, and each one's
# start-up and saves overlap the other's compute (benchmarks/RESULTS.md §4). The teacher SFT and
# IOA's teacher-size jobs, alone on the critical path, take up to 4 (all of a small machine).
# On a cluster (--jobs, e.g. the SLURM profile) every job is its own allocation: 4 threads each.
# `--set-threads RULE=N` overrides either.
def _job_threads() -> int:
    if workflow.nodes:
        return 4
    try:
        cores = workflow.cores
    except WorkflowError:  # no --cores: a command that runs no job (e.g. `snakemake --report`)
        return 1
    return max(1, min(4, cores // 2))


JOB_THREADS = _job_threads()


def train_threads(threads: int) -> int:
    """Threads of a training job: on a cluster, ``threads`` per process (one per GPU); on one
    machine the job's threads, shared by its processes (``per_process_threads``)."""
    return threads * GPUS if workflow.nodes and GPUS > 1 else threads


# OMP_NUM_THREADS of each process of a training job: its threads over its processes, rounded up
# (N processes with the job's whole count each would oversubscribe the cores N times). Shell
# arithmetic, not a param: params are a rerun trigger, and --cores must not re-run training.
TRAIN_OMP = "{threads}" if GPUS <= 1 else f"$(( ({{threads}} + {GPUS - 1}) / {GPUS} ))"


# Host memory (mem_mb) and runtime (minutes) of the rules that run a model. With GPUs
# (resources.gpus >= 1) they come from `scd-pipeline plan`'s estimates for this config
# (engine/sizing.py: rule_resources) as soon as the models and the data are prepared: Snakemake
# evaluates a job's resources again when it is ready to run. On a CPU, and before then, each rule
# requests its fixed values. `--set-resources RULE:mem_mb=N RULE:runtime=M` overrides both.
_PLANNED: dict = {}


def _planned(rule_name: str) -> tuple[int, int] | None:
    if GPUS < 1:
        return None
    if not _PLANNED:
        from scd_pipeline.engine.sizing import rule_resources

        _PLANNED.update(rule_resources(config) or {})
    return _PLANNED.get(rule_name)


def planned_resources(rule_name: str) -> dict:
    """``mem_mb`` and ``runtime`` of a rule: the plan's when known, else its fixed values (both
    from engine/sizing.PLANNED_RULES). Use as ``resources: **planned_resources("rule"), gpu=...``."""
    from scd_pipeline.engine.sizing import PLANNED_RULES

    fixed = PLANNED_RULES[rule_name][1:]
    return {"mem_mb": lambda wildcards, attempt: (_planned(rule_name) or fixed)[0],
            "runtime": lambda wildcards, attempt: (_planned(rule_name) or fixed)[1]}


def _scd_command() -> str:
    """How rules call the package.

    With --sdm conda, rules run in envs/scd-pipeline.yaml and use this checkout's package;
    otherwise the scd-pipeline beside the Python running Snakemake (the project's .venv), else PATH.
    """
    from snakemake.settings.types import DeploymentMethod

    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return f"PYTHONPATH={workflow.basedir}${{PYTHONPATH:+:$PYTHONPATH}} python -m scd_pipeline"
    local_cli = Path(sys.executable).parent / "scd-pipeline"
    return str(local_cli) if local_cli.exists() else "scd-pipeline"


SCD = _scd_command()


def _train_command() -> str:
    """How the training rules (SFT, distillation) call the package.

    One process per job (``SCD``) unless ``resources.gpus`` > 1: then ``accelerate launch`` starts
    one process per GPU (DDP), or, with ``resources.accelerate_config``, whatever that accelerate
    config file sets up (e.g. FSDP for a teacher that does not fit one GPU; see the README).
    """
    if GPUS <= 1:
        return SCD
    from snakemake.settings.types import DeploymentMethod

    prefix = ""
    launcher = Path(sys.executable).parent / "accelerate"
    launcher = str(launcher) if launcher.exists() else "accelerate"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        prefix, launcher = f"PYTHONPATH={workflow.basedir}${{PYTHONPATH:+:$PYTHONPATH}} ", "accelerate"
    setup = config["resources"]["accelerate_config"]
    how = f"--config_file {setup}" if setup else "--multi_gpu"
    return f"{prefix}{launcher} launch {how} --num_processes {GPUS} --num_machines 1 -m scd_pipeline"


TRAIN = _train_command()


def _on_gpus(count: int) -> str:
    """The prefix that gives a job ``count`` GPUs of its own on one machine with several
    (``resources.local_gpus``): ``scd-pipeline run-on-gpus`` waits until they are free and sets
    CUDA_VISIBLE_DEVICES. Nothing on a cluster (SLURM assigns the GPUs it grants) or without GPUs."""
    local = config["resources"]["local_gpus"]
    if not local or count < 1 or workflow.nodes:
        return ""
    return f"{SCD} run-on-gpus --gpus {count} --of {local} --slots {RESULTS}/.gpus -- "


ON_GPUS = _on_gpus(GPUS)      # a training job: all of its GPUs
ON_GPU = _on_gpus(GPUS_ONE)   # every other job that runs a model: one


def _config_file(settings: dict) -> str:
    """The path of the file that hands ``settings`` (configfile + --config, validated) to the CLI.

    The name is the sha256 of the content, so a file never changes once written: a job reads
    exactly the settings of the Snakemake run that scheduled it, whatever another run (a dry run
    with other --config values, say) does meanwhile. The file is written when the workflow starts
    executing (onstart: never in a dry run) and only if absent. Rules still re-run on a change
    through their `params` (Snakemake's params rerun trigger), not through this path.
    """
    import hashlib

    import yaml

    text = yaml.safe_dump(dict(settings), sort_keys=True, allow_unicode=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = Path(RESULTS) / ".config" / f"{digest}.yaml"
    _CONFIG_FILES[path] = text
    return str(path)


def _write_config_files() -> None:
    """Write each config file a job may read, atomically, if it is not there yet."""
    from scd_pipeline.engine.io import atomic_path

    for path, text in _CONFIG_FILES.items():
        if not path.is_file():
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")


_CONFIG_FILES: dict[Path, str] = {}
CONFIG_FILE = _config_file(config)


onstart:
    _write_config_files()


def settings(*keys, exclude=()):
    """The config values a rule depends on, as one stable string (its params rerun trigger).

    ``exclude``: dotted keys inside ``keys`` that do not change the rule's result (e.g. the list
    of methods for one distillation job: adding a method must not re-run the others).
    """
    import copy

    picked = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        picked[key] = copy.deepcopy(node)
    for key in exclude:
        *parents, leaf = key.split(".")
        node = picked
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(picked, sort_keys=True)


# Artifacts that several rule files name (each is written by the rule file of the same stage).
CHECKPOINTS = list(range(1, config["sft"]["teacher"]["n_checkpoints"] + 1))
CACHES = expand(TASK_DIR + "/logits/ckpt-{k}.parquet", k=CHECKPOINTS)
SYNTHETIC = TASK_DIR + "/data/synthetic.parquet"
SYNTHETIC_CACHES = expand(TASK_DIR + "/logits/synthetic/ckpt-{k}.parquet", k=CHECKPOINTS)
IOA_PLAN = [TASK_DIR + "/ioa/plan.json", TASK_DIR + "/ioa/val_scores.parquet"]
SYNTHESIS_SUMMARY = TASK_DIR + "/ioa/synthesis.json"
