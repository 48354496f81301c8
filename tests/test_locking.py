"""One writer per artifact, stale temporaries, and file-system errors at the CLI boundary.

The two concurrent cases run the real command twice on a tiny task (tiny random Llamas, 24
training rows): the first writer is paused with SIGSTOP once it holds its lock, so the second one
deterministically meets a live writer; then the first is resumed and must finish as if alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import tiny_workflow_config
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.locking import (
    Artifact,
    LockHeld,
    lock_file,
    stage_lock,
    stale_temporaries,
)
from scd_pipeline.stages import artifacts as stage_artifacts

SCD = str(Path(sys.executable).parent / "scd-pipeline")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HELD = re.compile(r"^error: (?P<artifact>\S+) is being written by pid (?P<pid>\d+) \((?P<command>.*), "
                  r"started [0-9: -]+\); wait for it to finish, or stop it \(kill (?P=pid)\), then re-run$")


def run_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCD, *args], cwd=workdir, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    """A working directory with tiny.yaml (results_dir: results) and its models, data and the two
    teacher checkpoints, made by the CLI (in-process)."""
    workdir = tmp_path_factory.mktemp("tiny")
    config = tiny_workflow_config(workdir)
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for args in (["prepare-model", "--role", "teacher"], ["prepare-model", "--role", "student"],
                     ["prepare-data"], ["sft", "--role", "teacher"]):
            result = runner.invoke(app, [*args, "--config", config.name])
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return workdir


@pytest.fixture
def task_copy(tiny_task, tmp_path) -> Path:
    shutil.copytree(tiny_task, tmp_path / "work", copy_function=shutil.copy2)
    return tmp_path / "work"


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path``: size and mtime (what a second writer must leave alone)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def start_and_pause(workdir: Path, args: list[str], writing: Path) -> subprocess.Popen:
    """Start ``scd-pipeline ARGS``; SIGSTOP it once ``writing`` exists (it is writing then), so that
    it is a live writer for as long as the test needs."""
    first = subprocess.Popen([SCD, *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:
        if (workdir / writing).exists():
            first.send_signal(signal.SIGSTOP)
            return first
        time.sleep(0.005)
    first.kill()
    out, err = first.communicate()
    pytest.fail(f"the first writer never became a live writer (exit {first.returncode}): {err[-2000:]}")


def resume(first: subprocess.Popen) -> tuple[int, str, str]:
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    return first.returncode, out, err


def test_two_cache_writers_of_one_checkpoint_one_succeeds_the_other_says_who(task_copy):
    args = ["cache-logits", "--checkpoint", "2", "--config", "tiny.yaml"]
    first = start_and_pause(task_copy, args, Path("results/demo/logits"))  # made when it starts writing
    try:
        before = tree(task_copy / "results")
        second = run_cli(task_copy, *args)
        after = tree(task_copy / "results")
    finally:
        code, out, err = resume(first)

    assert second.returncode == 2, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and second.stdout == "", second.stderr
    held = HELD.match(lines[0])
    assert held, lines[0]
    assert held["artifact"] == "results/demo/logits/ckpt-2.parquet" and int(held["pid"]) == first.pid
    assert held["command"] == "scd-pipeline cache-logits --checkpoint 2 --config tiny.yaml"
    assert after == before  # nothing of the first writer touched
    assert code == 0 and out.startswith("wrote results/demo/logits/ckpt-2.parquet"), err
    info = CliRunner().invoke(app, ["cache-info", str(task_copy / "results/demo/logits/ckpt-2.parquet")])
    assert info.exit_code == 0 and "rows: 24" in info.output


def test_a_second_teacher_sft_leaves_the_running_one_alone(task_copy):
    # The orphan case: Snakemake was killed, its teacher SFT job still runs, a rerun starts another.
    shutil.rmtree(task_copy / "results/demo/teacher")
    args = ["sft", "--role", "teacher", "--config", "tiny.yaml"]
    first = start_and_pause(task_copy, args, Path("results/demo/.state/sft-teacher/ckpt-1"))  # at step 3 of 6
    try:
        before = tree(task_copy / "results")
        second = run_cli(task_copy, *args)
        after = tree(task_copy / "results")
    finally:
        code, out, err = resume(first)

    assert second.returncode == 2, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and HELD.match(lines[0]), second.stderr
    assert HELD.match(lines[0])["artifact"] == "results/demo/teacher"  # the first of its two locks
    assert int(HELD.match(lines[0])["pid"]) == first.pid
    assert after == before
    assert code == 0, err
    checkpoints = json.loads((task_copy / "results/demo/teacher/checkpoints.json").read_text())
    assert [c["path"] for c in checkpoints["checkpoints"]] == ["ckpt-1", "ckpt-2"]
    assert all((task_copy / "results/demo/teacher" / c["path"] / "model.safetensors").is_file()
               for c in checkpoints["checkpoints"])
    assert not (task_copy / "results/demo/.state/sft-teacher").exists()


# --- the lock itself ---------------------------------------------------------------------------

HOLDER = """
import sys, time
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.locking import stage_lock
from scd_pipeline.stages import artifacts
config = load_config(None, {"results_dir": sys.argv[2], "task": "demo"})
with stage_lock(config, artifacts(sys.argv[1], config, name="td")):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the locks of ``command`` (distill --name td by default)."""
    started = []

    def start(command: str = "distill") -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, command, str(tmp_path / "results")],
                                   stdout=subprocess.PIPE, text=True, env=ENV)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def config_at(tmp_path: Path) -> dict:
    return load_config(None, {"results_dir": str(tmp_path / "results"), "task": "demo"})


def test_the_lock_names_the_holder_and_dies_with_it(tmp_path, holder):
    config = config_at(tmp_path)
    first = holder()
    with pytest.raises(LockHeld) as error, stage_lock(config, stage_artifacts("distill", config, name="td")):
        pass
    assert str(error.value).startswith(f"{tmp_path}/results/demo/students/td is being written by pid "
                                       f"{first.pid} (python -c ")
    first.kill()  # SIGKILL: nothing runs to release it, the OS does
    first.wait()
    with stage_lock(config, stage_artifacts("distill", config, name="td")) as artifacts:
        assert [a.path.name for a in artifacts] == ["td", "distill-td"]
        holder_record = json.loads(lock_file(config, artifacts[0].path).read_text())
        assert holder_record["pid"] == os.getpid()


def test_only_rank_0_of_a_multi_process_launch_locks(tmp_path, holder, monkeypatch):
    config = config_at(tmp_path)
    holder()
    monkeypatch.setenv("LOCAL_RANK", "1")  # accelerate launch: the other processes of the job
    with stage_lock(config, stage_artifacts("distill", config, name="td")):
        pass
    monkeypatch.setenv("RANK", "0")  # RANK decides when both are set
    with pytest.raises(LockHeld), stage_lock(config, stage_artifacts("distill", config, name="td")):
        pass


def test_stale_temporaries_are_removed_only_under_the_lock(tmp_path, holder):
    config = config_at(tmp_path)
    root = tmp_path / "results" / "demo"
    leftovers = [root / "students" / ".td.k2j4.tmp" / "model.safetensors",  # io.atomic_dir
                 root / "students" / ".td.old" / "config.json",             # atomic_dir's swap
                 root / "students" / "td" / ".train_log.jsonl.x1.tmp",      # io.atomic_path
                 root / ".state" / "distill-td" / ".latest.step12.tmp" / "progress.json"]
    kept = [root / "students" / "td" / "model.safetensors",
            root / "students" / ".tdx.a.tmp",                                # another artifact's
            root / ".state" / "distill-td" / ".latest.old" / "progress.json"]  # a resume point
    holder()  # a live writer, whose temporaries these are
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with pytest.raises(LockHeld), stage_lock(config, stage_artifacts("distill", config, name="td")):
        pass
    assert all(path.exists() for path in leftovers + kept)


def test_stale_temporaries_of_a_killed_writer_go_when_the_next_one_starts(tmp_path, capsys):
    config = config_at(tmp_path)
    root = tmp_path / "results" / "demo"
    leftovers = [root / "students" / ".td.k2j4.tmp" / "model.safetensors",
                 root / "students" / ".td.old" / "config.json",
                 root / "students" / "td" / ".train_log.jsonl.x1.tmp",
                 root / ".state" / "distill-td" / ".latest.step12.tmp" / "progress.json"]
    kept = [root / "students" / "td" / "model.safetensors", root / "students" / ".tdx.a.tmp",
            root / ".state" / "distill-td" / ".latest.old" / "progress.json"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with stage_lock(config, stage_artifacts("distill", config, name="td")):
        pass
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)
    assert not (root / "students" / ".td.k2j4.tmp").exists()
    assert "removed " in capsys.readouterr().err


def test_cache_logits_removes_what_a_killed_run_left(task_copy):
    # What a cache-logits killed mid-write leaves (io.atomic_path names), found on the next start.
    logits = task_copy / "results/demo/logits"
    logits.mkdir(parents=True, exist_ok=True)
    stale = [logits / ".ckpt-2.parquet.q8x_1c.tmp", logits / ".ckpt-2.meta.json.u2v9.tmp",
             logits / ".ckpt-2.decoded.5f3e.tmp"]
    other = logits / ".ckpt-1.parquet.a1b2.tmp"  # checkpoint 1's writer may be running
    for path in stale + [other]:
        path.write_bytes(b"PAR1 half written")
    result = run_cli(task_copy, "cache-logits", "--checkpoint", "2", "--config", "tiny.yaml")
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in stale) and other.exists()


def test_stage_artifacts_follow_the_documented_layout(tmp_path):
    config = config_at(tmp_path)
    root = Path(config["results_dir"])

    def names(command, **ids):
        return [[str(part.relative_to(root)) for part in artifact.parts]
                for artifact in stage_artifacts(command, config, **ids)]

    assert names("prepare-model", role="student") == [["models/student_base"]]
    assert names("sft", role="teacher") == [["demo/teacher"], ["demo/.state/sft-teacher"]]
    assert names("cache-logits", checkpoint=3) == [[
        "demo/logits/ckpt-3.parquet", "demo/logits/ckpt-3.meta.json", "demo/logits/ckpt-3.decoded",
        "demo/logits/cache-logits.ckpt-3.config.yaml"]]
    assert names("evaluate", name="teacher-ckpt-1") == [[
        "demo/eval/teacher-ckpt-1.json", "demo/eval/teacher-ckpt-1.predictions.parquet"]]
    assert stage_artifacts("distill", config, name="td")[1].resume_state
    assert stale_temporaries(Artifact(root / "missing", (root / "missing",))) == []


# --- every command is wired -----------------------------------------------------------------------

COMMANDS = {  # command: (the artifact a running writer holds, the command line of a second writer)
    "prepare-model": ({"role": "teacher"}, ["prepare-model", "--role", "teacher"]),
    "prepare-data": ({}, ["prepare-data"]),
    "sft": ({"role": "student"}, ["sft", "--role", "student"]),
    "cache-logits": ({"checkpoint": 1}, ["cache-logits", "--checkpoint", "1"]),
    "estimate-subdomains": ({}, ["estimate-subdomains"]),
    "distill": ({"name": "scd_aw"}, ["distill", "--method", "scd_aw"]),
    "evaluate": ({"name": "teacher-ckpt-2"}, ["evaluate", "--model", "results/demo/teacher/ckpt-2"]),
    "report": ({}, ["report"]),
}

WIRING_HOLDER = """
import json, sys, time
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.locking import stage_lock
from scd_pipeline.stages import artifacts
config = load_config(sys.argv[2])
with stage_lock(config, artifacts(sys.argv[1], config, **json.loads(sys.argv[3]))):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_stage_command_takes_its_lock_first(tiny_task, command, monkeypatch):
    ids, args = COMMANDS[command]
    monkeypatch.chdir(tiny_task)
    process = subprocess.Popen([sys.executable, "-c", WIRING_HOLDER, command, "tiny.yaml", json.dumps(ids)],
                               stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert process.stdout.readline().strip() == "locked"
        before = tree(tiny_task / "results")
        result = CliRunner().invoke(app, [*args, "--config", "tiny.yaml"])
    finally:
        process.kill()
        process.wait()
    assert result.exit_code == 2, result.output
    assert re.match(rf"error: \S+ is being written by pid {process.pid} \(python -c ", result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert tree(tiny_task / "results") == before


# --- file-system errors: one line, exit 2 ---------------------------------------------------------

ADVICE = "set results_dir (--results-dir or config key results_dir) to a writable folder"


def test_results_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    result = run_cli(tmp_path, "prepare-model", "--role", "teacher", "--source", "tiny:llama",
                     "--results-dir", "results")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: results is a file where a folder is needed (for results/.locks/models); move the file "
        f"away or {ADVICE}"]


def test_results_dir_on_a_read_only_file_system_is_one_line(tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("needs unshare to mount a read-only file system")
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (f"mount -t tmpfs -o ro none {mount} || exit 77; cd {tmp_path} && {SCD} prepare-model "
              f"--role teacher --source tiny:llama --results-dir {mount}/results")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                            env=ENV, timeout=120)
    if result.returncode == 77 or "unshare:" in result.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {result.stderr.strip()[:200]}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {mount}/results: read-only file system; {ADVICE}"]


def test_a_file_system_error_deep_inside_a_stage_is_one_line(tmp_path, tiny_tokenizer_dir, monkeypatch):
    # The lock is fine; prepare-data then finds a file where the task folder belongs.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "demo").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"demo": {"n_examples": 40, "test_size": 8}}}))
    result = CliRunner().invoke(app, ["prepare-data", "--config", str(config), "--tokenizer",
                                      str(tiny_tokenizer_dir), "--results-dir", "results"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: results/demo is a file where a folder is needed; move the file away or {ADVICE}"]
