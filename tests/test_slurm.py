"""The workflow on a real single-node SLURM (127.0.0.1) through the slurm profile.

Brings up munged + slurmctld + slurmd with scripts/slurm-local.sh, runs the whole DAG on a tiny
config (tiny random models, a handful of samples) with workflow/profiles/slurm, checks that every
job ran under SLURM and that the outputs have the same structure as a local run, then stops every
daemon it started (by pid). Needs root to install and start SLURM; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_PATH
from tiny_workflow import tiny_workflow_config

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def run_snakemake(workdir: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", str(REPO / "config.yaml"), str(config), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PATH": REAL_PATH})


def output_structure(workdir: Path) -> list[str]:
    """Relative paths of the results, without run-specific logs and benchmarks."""
    results = workdir / "results"
    skip = {"logs", "benchmarks", ".config"}
    return sorted(
        str(path.relative_to(results)) for path in results.rglob("*")
        if path.is_file() and not (set(path.relative_to(results).parts) & skip)
    )


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("SLURM cannot be installed here: the test needs root (apt-get, /etc/slurm)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("SLURM cannot be installed here: no apt-get and no slurmctld")
    script = REPO / "scripts" / "slurm-local.sh"
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PATH": REAL_PATH})
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield
    finally:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": REAL_PATH})


def test_workflow_runs_under_slurm_and_matches_a_local_run(slurm, tiny_reference, tmp_path):
    config = tiny_workflow_config(tmp_path)
    on_slurm = tmp_path / "slurm"
    result = run_snakemake(
        on_slurm, config, "--profile", str(REPO / "workflow/profiles/slurm"), "--jobs", "2",
        "--max-threads", str(os.cpu_count() or 1),  # the local node has this many CPUs
        "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=30",
        "--slurm-no-account", "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    logs = sorted((on_slurm / "results").rglob("logs/*.log"))
    assert logs, "no rule logs written"
    for log in logs:
        first = log.read_text().splitlines()[:1]
        assert first and first[0].startswith("[scd-pipeline] SLURM job "), f"{log} did not run under SLURM"

    locally = tiny_reference[0]  # the same config, run locally once for all workflow tests
    assert output_structure(on_slurm) == output_structure(locally)
    assert output_structure(locally), "the local run produced nothing"
