"""Training past one process: two processes (a gloo group on this CPU) give the weights of one
process with the same global batch, for SFT and for distillation, and a run killed mid-way
resumes under two processes to the uninterrupted result.

On a machine without CUDA, ``accelerate launch --multi_gpu --num_processes 2`` (torchrun) starts
the processes and ``training.make_accelerator`` joins them into one CPU group; the one-process
reference uses ``grad_accum: 2`` so both runs see the same micro-batches per optimizer step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from scd_pipeline.cli import app

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TOLERANCE = 1e-6  # max |difference| of any weight; measured: 0.0 (the 2-way all-reduce is exact here)
TINY = {
    "task": "demo", "results_dir": "results", "seed": 0,
    "data": {"demo": {"n_examples": 60, "test_size": 8}, "max_train_samples": 32},
    "models": {"teacher": {"source": "tiny:llama"}, "student": {"keep_every": 2}},
    "sft": {"batch_size": 4, "grad_accum": 1, "val_max_samples": 8,
            "teacher": {"n_checkpoints": 2, "epochs": 2, "lr": 0.01}, "student": {"epochs": 1, "lr": 0.01}},
    "cache": {"top_k": 8},
    "subdomains": {"probe_size": 8},
    "distill": {"phases": 2, "epochs_per_phase": 2, "batch_size": 4, "lr": 0.005},
}


def cli(workdir: Path, *args: str) -> None:
    old = os.getcwd()
    os.chdir(workdir)
    try:
        result = CliRunner().invoke(app, [*args, "--config", "tiny.yaml"])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output


# Every compared run computes on one thread: a GEMM split over two threads sums in another order,
# and at these learning rates a 1e-7 rounding difference grows to 1e-3 in the weights.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def alone(workdir: Path, *args: str) -> None:
    """``python -m scd_pipeline ...`` in ``workdir``: the one-process reference, on one thread."""
    result = subprocess.run([sys.executable, "-m", "scd_pipeline", *args, "--config", "tiny.yaml"], cwd=workdir,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = str(REPO / "workflow" / "accelerate" / "fsdp.yaml")  # the shipped one (bf16 overridden)


def launch(workdir: Path, *args: str, processes: int = 2, wait: bool = True, fsdp: bool = False):
    """``accelerate launch --multi_gpu --num_processes N -m scd_pipeline ...`` in ``workdir``;
    ``fsdp``: with the shipped FSDP config instead of ``--multi_gpu`` (DDP)."""
    how = ["--config_file", FSDP_CONFIG] if fsdp else ["--multi_gpu"]
    command = [ACCELERATE, "launch", *how, "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               "-m", "scd_pipeline", *args, "--config", "tiny.yaml"]
    env = ENV
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def max_difference(first: Path, second: Path) -> float:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """Models, data, a two-checkpoint teacher, its caches, the SFT student and the subdomains."""
    workdir = tmp_path_factory.mktemp("multiprocess")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cli(workdir, "prepare-model", "--role", "teacher")
    cli(workdir, "prepare-model", "--role", "student")
    cli(workdir, "prepare-data")
    cli(workdir, "sft", "--role", "teacher")
    cli(workdir, "sft", "--role", "student")
    for k in ("1", "2"):
        cli(workdir, "cache-logits", "--checkpoint", k)
    cli(workdir, "estimate-subdomains")
    return workdir


def copy_task(task: Path, target: Path) -> Path:
    """The prepared models and data only (a teacher run must not touch the shared tree)."""
    for part in ("results/models", "results/demo/data"):
        shutil.copytree(task / part, target / part)
    shutil.copy(task / "tiny.yaml", target / "tiny.yaml")
    return target


@pytest.fixture(scope="module")
def one_process_teacher(task, tmp_path_factory) -> Path:
    """The teacher SFT on one process with grad_accum 2: it sees two processes' micro-batches in
    one step."""
    one = copy_task(task, tmp_path_factory.mktemp("one"))
    alone(one, "sft", "--role", "teacher", "--grad-accum", "2")
    return one / "results" / "demo" / "teacher"


def test_two_process_sft_gives_the_one_process_weights(task, tmp_path, one_process_teacher):
    two = copy_task(task, tmp_path / "two")
    launch(two, "sft", "--role", "teacher", "--grad-accum", "1")
    for k in (1, 2):
        assert max_difference(two / "results" / "demo" / "teacher" / f"ckpt-{k}",
                              one_process_teacher / f"ckpt-{k}") <= TOLERANCE
    # the task's own teacher ran with grad_accum 1 on one process: another run, far away
    assert max_difference(task / "results" / "demo" / "teacher" / "ckpt-2", one_process_teacher / "ckpt-2") > 1e-3


def kill_at_step(process: subprocess.Popen, progress: Path, step: int) -> int:
    """SIGKILL the launcher and every rank once ``progress`` (a resume state) reaches ``step``;
    returns the step it had reached."""
    deadline = time.monotonic() + 300
    reached = 0
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file():
            reached = yaml.safe_load(progress.read_text())["step"]
            if reached >= step:
                break
        time.sleep(0.05)
    # the launcher and both ranks at once (torchrun starts its workers in sessions of their own)
    launcher = psutil.Process(process.pid)
    for member in [launcher, *launcher.children(recursive=True)]:
        member.send_signal(signal.SIGKILL)
    process.communicate()
    return reached


# Two processes under the shipped FSDP config shard the model themselves (accelerate would wrap
# DDP on CPU processes); FSDP's reduce-scatter and the sharded gradient norm add in another order
# than DDP's all-reduce. Measured (max |difference| of any weight): SFT 8.0e-7 at the last checkpoint
# after a kill and resume, distillation 1.2e-7.
FSDP_TOLERANCE = 1e-5


def test_fsdp_sft_killed_mid_way_resumes_from_its_shards_to_the_one_process_weights(task, tmp_path,
                                                                                   one_process_teacher):
    """Teacher SFT over two FSDP2 shards: validation at each checkpoint runs on the sharded model,
    a kill after step 3 resumes from the shards each process saved, and the checkpoints (weights
    and validation metrics) are the one-process run's."""
    workdir = copy_task(task, tmp_path / "fsdp")
    state = workdir / "results" / "demo" / ".state" / "sft-teacher"
    args = ("sft", "--role", "teacher", "--grad-accum", "1", "--set", "sft.resume_every_minutes=0")
    reached = kill_at_step(launch(workdir, *args, wait=False, fsdp=True), state / "latest" / "progress.json", 3)
    assert reached >= 3 and (state / "latest" / "rng-1.pt").is_file()  # shards, not accelerate's state
    assert sorted(p.name for p in (state / "latest").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    output = launch(workdir, *args, fsdp=True)
    assert "resuming at step" in output and "FSDP: 4 decoder layers sharded over 2 processes" in output
    teacher = workdir / "results" / "demo" / "teacher"
    for k in (1, 2):
        assert max_difference(teacher / f"ckpt-{k}", one_process_teacher / f"ckpt-{k}") <= FSDP_TOLERANCE
    records = [yaml.safe_load((d / "checkpoints.json").read_text())["checkpoints"] for d in (teacher, one_process_teacher)]
    assert [r["val_metric"] for r in records[0]] == pytest.approx([r["val_metric"] for r in records[1]])
    assert [r["val_loss"] for r in records[0]] == pytest.approx([r["val_loss"] for r in records[1]], rel=1e-4)


def test_fsdp_distillation_gives_the_ddp_weights_and_schedule(task, two_process_scd_aw):
    """SCD+AW over two FSDP2 shards: SCD's probe forwards run on the sharded student each phase;
    the student and its schedule are the two-process DDP run's (itself the one-process run's)."""
    output = launch(task, "distill", "--method", "scd_aw", "--name", "scd_aw-fsdp", "--set", "distill.grad_accum=1",
                    fsdp=True)
    assert "FSDP: " in output
    fsdp = task / "results" / "demo" / "students" / "scd_aw-fsdp"
    assert max_difference(fsdp, two_process_scd_aw) <= FSDP_TOLERANCE
    schedules = [yaml.safe_load((d / "schedule.json").read_text()) for d in (fsdp, two_process_scd_aw)]
    assert [p["checkpoint"] for p in schedules[0]["phases"]] == [p["checkpoint"] for p in schedules[1]["phases"]]


@pytest.fixture(scope="module")
def two_process_scd_aw(task) -> Path:
    launch(task, "distill", "--method", "scd_aw", "--name", "scd_aw-2p", "--set", "distill.grad_accum=1")
    return task / "results" / "demo" / "students" / "scd_aw-2p"


def test_two_process_distillation_gives_the_one_process_weights(task, two_process_scd_aw):
    alone(task, "distill", "--method", "scd_aw", "--name", "scd_aw-1p", "--set", "distill.grad_accum=2")
    one = task / "results" / "demo" / "students" / "scd_aw-1p"
    assert max_difference(two_process_scd_aw, one) <= TOLERANCE
    schedules = [yaml.safe_load((d / "schedule.json").read_text()) for d in (two_process_scd_aw, one)]
    assert [p["checkpoint"] for p in schedules[0]["phases"]] == [p["checkpoint"] for p in schedules[1]["phases"]]


def test_a_two_process_run_killed_mid_way_resumes_to_the_same_weights(task, two_process_scd_aw):
    state = task / "results" / "demo" / ".state" / "distill-scd_aw-killed"
    progress = state / "latest" / "progress.json"
    args = ("distill", "--method", "scd_aw", "--name", "scd_aw-killed", "--set", "distill.grad_accum=1",
            "--set", "distill.resume_every_minutes=0")
    step = kill_at_step(launch(task, *args, wait=False), progress, 3)
    assert step >= 3 and not (task / "results" / "demo" / "students" / "scd_aw-killed").exists()
    output = launch(task, *args)
    assert "resuming at step" in output
    assert max_difference(task / "results" / "demo" / "students" / "scd_aw-killed", two_process_scd_aw) <= TOLERANCE


# --- resume saves under two processes -----------------------------------------------------------

# Runs `scd-pipeline` with two delays: RANK0 seconds at the end of SftRecipe.after_step on rank 0
# (the step in which rank 0 alone writes a checkpoint, just before the ranks decide whether a resume
# save is due), and OTHERS seconds before every other rank writes its part (RNG state) into the
# resume save's folder.
SLOWED = """
import os, sys, time
import accelerate.accelerator
from scd_pipeline.stages import sft
rank0, others = float(sys.argv.pop(1)), float(sys.argv.pop(1))
after_step, save_part = sft.SftRecipe.after_step, accelerate.accelerator.save_accelerator_state
def slow_after_step(self, ctx, result):
    record = after_step(self, ctx, result)
    if ctx.accelerator.is_main_process:
        time.sleep(rank0)
    return record
def slow_save_part(*args, **kwargs):  # the folder exists: this process writes its RNG state into it
    if os.environ.get("RANK", "0") != "0":
        time.sleep(others)
    return save_part(*args, **kwargs)
sft.SftRecipe.after_step = slow_after_step
accelerate.accelerator.save_accelerator_state = slow_save_part
from scd_pipeline.cli import main
main()
"""
SAVES = {"sft.batch_size": 2, "sft.teacher.n_checkpoints": 4, "sft.teacher.epochs": 3}  # 24 steps


def launch_slowed(workdir: Path, rank0: float, others: float, *args: str, timeout: float = 240) -> str:
    """Two processes running SLOWED; a run still going after ``timeout`` s is killed and fails."""
    script = workdir / "slowed.py"
    script.write_text(SLOWED)
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
               str(script), str(rank0), str(others), *args, "--config", "tiny.yaml"]
    process = subprocess.Popen(command, cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(process.pid)
        for member in [launcher, *launcher.children(recursive=True)]:
            member.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"two-process SFT still running after {timeout} s (ranks waiting on each other):\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def never_saved(task, tmp_path_factory) -> Path:
    """The two-process teacher SFT whose resume state is never due (every 5 minutes)."""
    workdir = copy_task(task, tmp_path_factory.mktemp("never-saved"))
    sets = [f"--set={key}={value}" for key, value in {**SAVES, "sft.resume_every_minutes": 5}.items()]
    launch_slowed(workdir, 0.0, 0.0, "sft", "--role", "teacher", "--grad-accum", "1", *sets)
    return workdir / "results" / "demo" / "teacher"


@pytest.mark.parametrize(("every_minutes", "rank0", "others"),
                         [(0.01, 0.0, 0.0), (0.0, 0.0, 0.0), (0.01, 0.5, 0.0), (0.0, 0.0, 0.5)],
                         ids=["clock", "every-step", "clock-rank0-slow-step", "every-step-rank1-slow-save"])
def test_two_process_resume_saves_neither_hang_nor_change_the_weights(task, tmp_path, never_saved,
                                                                        every_minutes, rank0, others):
    """Every rank takes rank 0's decision to save, and no rank renames the resume state while
    another still writes into it: the run ends, with the weights of a run that never saved."""
    workdir = copy_task(task, tmp_path / "run")
    sets = [f"--set={key}={value}" for key, value in {**SAVES, "sft.resume_every_minutes": every_minutes}.items()]
    launch_slowed(workdir, rank0, others, "sft", "--role", "teacher", "--grad-accum", "1", *sets)
    for k in (1, 2, 3, 4):
        assert max_difference(workdir / "results" / "demo" / "teacher" / f"ckpt-{k}",
                              never_saved / f"ckpt-{k}") <= TOLERANCE
