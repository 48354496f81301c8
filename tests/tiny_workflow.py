"""The tiny workflow shared by the workflow tests: its config, how Snakemake is started, and one
uninterrupted reference run (session fixture ``tiny_reference`` in conftest.py), which the fault
tests compare artifacts against and the SLURM test compares its output structure with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def tiny_workflow_config(root: Path) -> Path:
    config = {
        "task": "demo",
        "results_dir": "results",
        "data": {"demo": {"n_examples": 40, "test_size": 8}, "max_train_samples": 24},
        "models": {"teacher": {"source": "tiny:llama"}, "student": {"keep_every": 2}},
        # The resume state after every step (resume_every_minutes: 0): a killed training job resumes
        # mid-run, as a long one does, instead of starting again within its first 5 minutes.
        "sft": {"batch_size": 4, "val_max_samples": 8, "teacher": {"n_checkpoints": 2, "epochs": 1},
                "student": {"epochs": 1}, "resume_every_minutes": 0},
        "cache": {"top_k": 8},
        "subdomains": {"probe_size": 8},
        "distill": {"methods": ["scd_aw"], "phases": 2, "epochs_per_phase": 1, "batch_size": 4,
                    "resume_every_minutes": 0},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, *extra: str) -> list[str]:
    # Two one-thread jobs at a time: the jobs are mostly Python start-up, which does not thread.
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
            str(REPO / "config.yaml"), str(workdir / "tiny.yaml"), "--cores", "2", "--max-threads", "1",
            *extra]


def start(workdir: Path, *extra: str, log: str) -> subprocess.Popen:
    """Snakemake in a new process group (its jobs inherit it), output to ``workdir/log``."""
    with open(workdir / log, "w") as out:
        return subprocess.Popen(snakemake(workdir, *extra), stdout=out, stderr=subprocess.STDOUT,
                                env=ENV, start_new_session=True)


def end_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reference_run(workdir: Path) -> tuple[Path, float]:
    """The uninterrupted tiny workflow in ``workdir``, with a dry run of other settings (seed 7)
    made while it runs; returns the folder and when the dry run ended."""
    tiny_workflow_config(workdir)
    run = start(workdir, log="run.log")
    try:
        manifest = workdir / "results/demo/data/manifest.json"
        while not manifest.exists() and run.poll() is None:
            time.sleep(0.1)
        # Data is prepared with seed 0; teacher SFT and everything after it are still to run.
        dry = subprocess.run(snakemake(workdir, "-n", "--ignore-incomplete", "--config", "seed=7"),
                             capture_output=True, text=True,
                             env=ENV, timeout=300)
        dry_run_ended = time.time()
        assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
        run.wait(timeout=1200)
    finally:
        end_group(run.pid)
    assert run.returncode == 0, (workdir / "run.log").read_text()[-4000:]
    return workdir, dry_run_ended


