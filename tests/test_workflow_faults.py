"""The workflow under faults, on the tiny DAG (tiny random models, 24 training rows, 2 teacher
checkpoints, one distilled student: scd_aw).

- A dry run with other settings, made while the workflow runs, changes nothing the running jobs
  read: every job reads the content-addressed config file of the run that scheduled it.
- The workflow killed at seeded random points (the Snakemake process alone, leaving its job
  running as an orphan, or its whole process group), each time resumed as Snakemake or the stage
  advises (--unlock, --rerun-incomplete, wait for the running writer), ends with the artifacts of
  an uninterrupted run: weights bit for bit, cache columns, schedules, metrics, summary.

Both compare against one uninterrupted reference run (the session fixture ``tiny_reference``; the
dry run happens during it). Most of the time is the 16 jobs' Python start-up (torch, transformers), paid by the reference
run, again by the interrupted one and by each restart: about 14 minutes measured on 2 cores shared
with other work (load 4.5), roughly half that on idle ones. `pytest -m "not workflow"` skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from tiny_workflow import ENV, end_group, snakemake, start, tiny_workflow_config

pytestmark = pytest.mark.workflow

KILL_SEED = 13
KILLS = 6  # alternately the Snakemake process alone and its whole process group
HELD = re.compile(r"is being written by pid (\d+)")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def jobs_in_group(pgid: int) -> list[tuple[int, str]]:
    """The scd-pipeline processes of a process group (Snakemake's running jobs)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        argv = cmdline.split()
        if int(fields[2]) == pgid and any(arg.endswith("/scd-pipeline") for arg in argv[:2]):  # not the shell
            found.append((int(stat.parent.name), cmdline.split("scd-pipeline", 1)[1].strip()))
    return found


# --- what an interruption must not change -----------------------------------------------------------

def digest(value) -> str:
    """sha256 of a JSON rendering (NaN renders as NaN, so equal values compare equal)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def frame_digest(path: Path) -> str:
    """Content of a Parquet file (columns and values), not its bytes."""
    table = pq.read_table(path)
    return digest({name: table.column(name).to_pylist() for name in table.column_names})


def without(record: dict, *keys: str) -> dict:
    return {key: value for key, value in record.items() if key not in keys}


def fingerprint(results: Path) -> dict[str, object]:
    """What must not depend on interruptions, per artifact. Left out, because they legitimately
    differ between two runs: logs/, benchmarks/ and the train logs' tokens_per_s (timings); cache
    files' bytes (the Parquet footer holds a random uid and the creation time: their columns are
    compared) and their sidecars' uid, created, capture time, throughput, file size and weight file
    mtimes; eval/*.json seconds and samples/s; subdomains.json's cache uids; the rendered report
    (it quotes the above; summary.csv carries its numbers); lock files and .snakemake metadata."""
    task = results / "demo"
    found: dict[str, object] = {}
    for weights in sorted(results.rglob("*.safetensors")):
        found[str(weights.relative_to(results))] = hashlib.sha256(weights.read_bytes()).hexdigest()
    for table in sorted(task.glob("data/*.parquet")) + sorted(task.glob("eval/*.parquet")) + \
            sorted(task.glob("logits/*.parquet")) + [task / "subdomains.parquet"]:
        found[str(table.relative_to(results))] = frame_digest(table)
    for sidecar in sorted(task.glob("logits/*.meta.json")):
        meta = json.loads(sidecar.read_text())
        found[str(sidecar.relative_to(results))] = {
            **without(meta, "uid", "created", "capture_seconds", "tokens_per_second", "file_bytes",
                      "bytes_per_token"), "checkpoint": meta["checkpoint"]["sha256"]}
    for log in sorted(task.rglob("train_log.jsonl")):
        found[str(log.relative_to(results))] = [without(json.loads(line), "tokens_per_s")
                                                for line in log.read_text().splitlines()]
    for name in ["teacher/checkpoints.json", *[str(p.relative_to(task)) for p in task.glob("students/*/schedule.json")]]:
        found[f"demo/{name}"] = json.loads((task / name).read_text())
    for metrics in sorted(task.glob("eval/*.json")):
        found[str(metrics.relative_to(results))] = without(json.loads(metrics.read_text()), "seconds",
                                                           "samples_per_s")
    subdomains = json.loads((task / "subdomains.json").read_text())
    subdomains["caches"] = {k: without(v, "uid") for k, v in subdomains["caches"].items()}
    found["demo/subdomains.json"] = subdomains
    found["demo/summary.csv"] = (task / "summary.csv").read_text()
    return {key: value if isinstance(value, str) else digest(value) for key, value in found.items()}


# --- the uninterrupted run, with a dry run of other settings made meanwhile -------------------------

def test_jobs_read_the_config_of_their_run_not_a_later_dry_runs(tiny_reference):
    workdir, dry_run_ended = tiny_reference
    results = workdir / "results"
    effective = sorted(results.rglob("*.config.yaml"))  # each stage writes the config it ran with
    seeds = {str(p.relative_to(results)): yaml.safe_load(p.read_text())["seed"] for p in effective}
    assert len(seeds) >= 8 and set(seeds.values()) == {0}, seeds
    after = [p for p in effective if p.stat().st_mtime > dry_run_ended]
    assert after, "no stage ran after the dry run: the race was not exercised"
    assert len(list((results / ".config").iterdir())) == 1  # the dry run wrote no config file


def test_adding_a_method_plans_only_that_method(tiny_reference):
    # A distillation job's params leave out distill.methods: listing one more method trains and
    # evaluates that one, keeps the students already there, and rewrites the report.
    workdir, _ = tiny_reference
    dry = subprocess.run(snakemake(workdir, "-n", "--config", "distill={methods: [scd_aw, td]}"),
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, flags=re.M))
    assert planned == {"all": "1", "distill": "1", "evaluate": "1", "report": "1", "total": "4"}, dry.stdout
    outputs = " ".join(re.findall(r"^\s*output: (.*)$", dry.stdout, flags=re.M))
    assert "students/td" in outputs and "students/scd_aw" not in outputs, outputs


def test_the_run_evaluates_t_star_on_the_test_split_and_no_other_teacher_checkpoint(tiny_reference):
    # The other checkpoints' validation metric is in checkpoints.json (the report's teacher plot);
    # a test-split evaluation of each would be work no table reads.
    workdir, _ = tiny_reference
    task = workdir / "results" / "demo"
    best = json.loads((task / "teacher" / "checkpoints.json").read_text())["best_index"]
    assert sorted(p.name for p in (task / "eval").glob("teacher-ckpt-*")) == [
        f"teacher-ckpt-{best}.json", f"teacher-ckpt-{best}.predictions.parquet"]
    assert f"Teacher (T* = ckpt-{best})" in (task / "report.md").read_text()


def test_a_dry_run_writes_nothing(tmp_path):
    tiny_workflow_config(tmp_path)
    dry = subprocess.run(snakemake(tmp_path, "-n", "-p"), capture_output=True, text=True, env=ENV, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    paths = set(re.findall(r"--config (results/\.config/[0-9a-f]{16}\.yaml)", dry.stdout + dry.stderr))
    assert len(paths) == 1  # every job of the run reads one content-addressed file
    assert not (tmp_path / "results").exists()


# --- killed at random points ------------------------------------------------------------------------

def test_killed_workflow_resumes_to_the_artifacts_of_an_uninterrupted_run(tiny_reference, tmp_path):
    rng = random.Random(KILL_SEED)
    # Kill points spread over the DAG: a seeded delay after the n-th job of the workflow has
    # started (n drawn from its ~16 jobs), so a kill lands inside that job or soon after it.
    # Every second kill takes the whole process group, the others only Snakemake (orphaning its jobs).
    ordinals = sorted(rng.sample(range(1, 15), KILLS))
    plan = [(n, round(rng.uniform(0.2, 8.0), 2), "group" if i % 2 else "snakemake")
            for i, n in enumerate(ordinals)]
    workdir = tmp_path / "faults"
    workdir.mkdir()
    tiny_workflow_config(workdir)
    flags: list[str] = []
    groups: list[int] = []
    history: list[str] = []
    jobs_seen: set[str] = set()
    try:
        for attempt in range(40):
            done = sum(h.startswith("killed") for h in history)
            kill = plan[done] if done < KILLS else None
            run = start(workdir, *flags, log=f"attempt{attempt}.log")
            groups.append(run.pid)
            if kill is not None:
                ordinal, delay, target = kill
                while run.poll() is None and len(jobs_seen) < ordinal:
                    jobs_seen.update(job for _, job in jobs_in_group(run.pid))
                    time.sleep(0.05)
                if run.poll() is None:
                    time.sleep(delay)
                if run.poll() is None:
                    running = [job for _, job in jobs_in_group(run.pid)]
                    (os.killpg if target == "group" else os.kill)(run.pid, signal.SIGKILL)
                    run.wait()
                    history.append(f"killed {target} {delay}s after job {ordinal} started, during {running}")
                    continue
            run.wait(timeout=1200)
            output = (workdir / f"attempt{attempt}.log").read_text()
            if run.returncode == 0:
                history.append("finished")
                break
            # Follow the advice printed by Snakemake, or by a stage refusing a second writer.
            if "--unlock" in output and "cannot be locked" in output:
                subprocess.run(snakemake(workdir, "--unlock"), capture_output=True, env=ENV, timeout=300,
                               check=True)
                history.append("unlocked")
            elif "--rerun-incomplete" in output and "--rerun-incomplete" not in flags:
                flags.append("--rerun-incomplete")
                history.append("added --rerun-incomplete")
            else:
                writers = {int(pid) for log in (workdir / "results").rglob("logs/*.log")
                           for pid in HELD.findall(log.read_text(errors="replace"))}
                assert writers, f"unexpected failure after {history}:\n{output[-4000:]}"
                while any(alive(pid) for pid in writers):
                    time.sleep(0.2)
                history.append(f"waited for the running writer(s) {sorted(writers)}")
        else:
            pytest.fail(f"no complete run after 40 attempts: {history}")
    finally:
        for pgid in groups:  # orphans of a killed Snakemake stay in its group
            end_group(pgid)

    kills = [h for h in history if h.startswith("killed")]
    assert len(kills) >= 5, history
    expected = fingerprint(tiny_reference[0] / "results")
    got = fingerprint(workdir / "results")
    differing = sorted(key for key in expected.keys() | got.keys() if expected.get(key) != got.get(key))
    assert not differing, f"differs from the uninterrupted run after {history}: {differing}"
    print("\n".join(history))


# --- how a run ends ----------------------------------------------------------------------------------

def test_a_run_ends_naming_its_report_and_conclusion_and_snakemakes_report_builds_as_written(tiny_reference):
    workdir, _ = tiny_reference
    log = (workdir / "run.log").read_text()
    ending = log[log.rindex("scd-pipeline: report"):]
    assert ending.startswith("scd-pipeline: report results/demo/report.md (HTML beside it)")
    conclusion = next(line for line in (workdir / "results/demo/report.md").read_text().splitlines()
                      if line.startswith("At n = "))
    assert conclusion in ending
    # README: `snakemake --report report.html` after a run, no --cores (it runs no job)
    command = [c for c in snakemake(workdir) if c not in ("--cores", "2", "--max-threads", "1")]
    built = subprocess.run([*command, "--report", "report.html"], capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (workdir / "report.html").stat().st_size > 10_000


def test_a_failed_run_ends_saying_what_failed_and_what_to_do(tmp_path):
    config = tiny_workflow_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings.update(task="crade", data={**settings["data"], "jmed_root": str(tmp_path / "no-such-folder")})
    config.write_text(yaml.safe_dump(settings))
    run = subprocess.run(snakemake(tmp_path), capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode != 0
    assert "Error in rule prepare_data" in run.stderr
    ending = run.stdout[run.stdout.index("scd-pipeline: the run stopped because a job failed"):]
    # the failed job's log and its one-line error
    assert f"  results/crade/logs/prepare_data.log: error: {tmp_path / 'no-such-folder'}" in ending
    assert ending.rstrip().endswith("Fix the cause and run the same command again: finished jobs are kept.")
