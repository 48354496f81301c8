"""Two jobs on one thread each, side by side, against the same two jobs one after the other on two threads.

On a small machine the workflow either runs one job at a time with every core (``threads: 2``) or
two jobs at once with one core each (``threads: 1``). This script measures which finishes a pair of
real stage jobs sooner, on a finished run (default ``results/``, task demo), for each stage that
fans out: ``cache`` (two teacher checkpoints' logit caches), ``evaluate`` (the SFT student and the
base teacher on the test split) and ``distill`` (two TD students for a shortened run,
``distill.epochs_per_phase`` = ``--epochs-per-phase``). Modes alternate over ``--rounds``; each job
is the real ``scd-pipeline`` command, writing into a scratch results folder that links the run's
inputs (the run itself is only read).

    .venv/bin/python benchmarks/bench_threads.py --rounds 2              # all three stages
    .venv/bin/python benchmarks/bench_threads.py --stages evaluate --rounds 3

Run it on an otherwise idle machine: it measures how the cores are shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCD = str(Path(sys.executable).parent / "scd-pipeline")
STAGES = ("cache", "evaluate", "distill")


def scratch_results(run: Path, task: str, into: Path) -> Path:
    """A results folder whose inputs are the run's (linked) and whose outputs are new."""
    (into / task).mkdir(parents=True)
    os.symlink((run / "models").resolve(), into / "models")
    for name in ("data", "teacher", "student_sft", "subdomains.parquet", "subdomains.json"):
        os.symlink((run / task / name).resolve(), into / task / name)
    shutil.copytree(run / task / "logits", into / task / "logits")  # cache jobs rewrite two of them
    return into


def pair_commands(stage: str, run: Path, task: str, scratch: Path, epochs_per_phase: float) -> list[list[str]]:
    common = ["--task", task, "--results-dir", str(scratch)]
    if stage == "cache":
        return [[SCD, "cache-logits", "--checkpoint", str(k), *common] for k in (1, 2)]
    if stage == "evaluate":
        return [[SCD, "evaluate", "--model", str(run / task / "student_sft"), "--name", "bench-sft", *common],
                [SCD, "evaluate", "--model", str(run / "models" / "teacher_base"), "--name", "bench-base", *common]]
    return [[SCD, "distill", "--method", "td", "--name", f"bench/td-{i}", *common,
             "--epochs-per-phase", str(epochs_per_phase), "--set", f"seed={i}"] for i in (0, 1)]


def clean(stage: str, scratch: Path, task: str) -> None:
    """Remove what the previous round wrote, so no job finds its output and skips."""
    root = scratch / task
    if stage == "cache":
        for k in (1, 2):
            for suffix in (".parquet", ".meta.json"):
                (root / "logits" / f"ckpt-{k}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(root / "eval", ignore_errors=True)
    shutil.rmtree(root / "students", ignore_errors=True)


def run_pair(commands: list[list[str]], threads: int, together: bool, log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with log.open("a") as out:
        if together:
            processes = [subprocess.Popen(c, env=env, stdout=out, stderr=subprocess.STDOUT) for c in commands]
            codes = [p.wait() for p in processes]
        else:
            codes = [subprocess.run(c, env=env, stdout=out, stderr=subprocess.STDOUT).returncode for c in commands]
    if any(codes):
        raise SystemExit(f"a job failed (exit {codes}); see {log}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="a finished run's results_dir")
    parser.add_argument("--task", default="demo")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode (alternating)")
    parser.add_argument("--epochs-per-phase", type=float, default=0.125, help="shortened distillation for the distill pair")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        scratch = scratch_results(args.results, args.task, Path(tmp) / "results")
        log = Path(tmp) / "jobs.log"
        print("| stage | two jobs one after the other, 2 threads each (s) | two jobs at once, 1 thread each (s) "
              "| ratio (at once / one after the other) |")
        print("|---|---|---|---|")
        for stage in args.stages:
            commands = pair_commands(stage, args.results, args.task, scratch, args.epochs_per_phase)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for together in (False, True):
                    clean(stage, scratch, args.task)
                    times[together].append(run_pair(commands, 1 if together else 2, together, log))
            serial, parallel = (statistics.median(times[m]) for m in (False, True))
            print(f"| {stage} | {serial:.1f} ({', '.join(f'{t:.1f}' for t in times[False])}) "
                  f"| {parallel:.1f} ({', '.join(f'{t:.1f}' for t in times[True])}) | {parallel / serial:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
