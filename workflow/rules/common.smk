# Helpers shared by the rules: config validation, the effective config file, paths.
import json
import os
import re
import sys
from pathlib import Path

from scd_pipeline.config import validate_config

validate_config(config)

TASK = config["task"]
RESULTS = config["results_dir"]
TASK_DIR = f"{RESULTS}/{TASK}"
MODELS = f"{RESULTS}/models"
GPUS = config["resources"]["gpus"]
CONDA_ENV = os.path.join(workflow.basedir, "envs", "scd-pipeline.yaml")


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


def _write_effective_config() -> str:
    """The merged, validated config (configfile + --config) as a file the CLI reads.

    Rewritten only when its content changes, so re-running an unchanged workflow does nothing;
    rules re-run on a change through their `params` (Snakemake's params rerun trigger).
    """
    import yaml

    path = Path(RESULTS) / ".config" / f"{TASK}.yaml"
    text = yaml.safe_dump(dict(config), sort_keys=True, allow_unicode=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return str(path)


CONFIG_FILE = _write_effective_config()


def settings(*keys):
    """The config values a rule depends on, as one stable string (its params rerun trigger)."""
    picked = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return json.dumps(picked, sort_keys=True)
