"""End-to-end wall time of a pipeline run, per stage and in total, from Snakemake's benchmark files.

Every rule declares ``benchmark:``; Snakemake writes one TSV per job (columns ``s``, ``h:m:s``,
``max_rss``, ..., ``cpu_time``) under ``results/benchmarks/`` (models) and
``results/{task}/benchmarks/`` (everything else). Every job's log ends with the package's
``scd-work`` lines (``scd_pipeline.engine.worklog``): the tokens each kind of compute loop processed and
its steady-state rate, so ``compute`` = tokens / steady rate is the compute-bound part of the job
and ``overhead`` = wall - compute the rest (interpreter and library start, model loading, Parquet
I/O, saves, warm-up, idle). This script only reads these files (it never runs the pipeline),
groups jobs by stage, lists the jobs the config expects but that have no file yet (not run, still
running, or run by hand outside Snakemake), and prints:

* per stage: jobs found / expected, seconds summed over its jobs, compute-bound seconds and the
  overhead's share, the slowest job, peak RSS, CPU seconds;
* total: the sum of all job seconds (the serial cost), the compute-bound share, the wall span
  (earliest job start, i.e. file time minus its seconds, to the last job end: how long the run
  took, judged against the 20-min target) and the share of the machine's cores in use over that
  span (CPU seconds of all jobs / (cores x span));
* core-seconds: each job's seconds times the threads Snakemake gave it (read from the run's
  ``.snakemake/log/*.snakemake.log``; ``--snakemake-logs``), compute-bound core-seconds likewise,
  and the overhead's share of them: the share of the cores the run held for work that was not
  compute-bound (a one-thread job's start-up holds one core, a two-thread job's holds two).
  Shared model-preparation jobs that ended more than 10 minutes before the task's first job are a
  reused earlier run's: listed, not counted.

    .venv/bin/python benchmarks/bench_e2e.py                       # results/, task demo
    .venv/bin/python benchmarks/bench_e2e.py --task smdis --jobs   # also one line per job
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from _common import REPO_ROOT, format_table

from scd_pipeline.engine.methods import parse_method
from scd_pipeline.engine.naming import (
    default_eval_name,
    replicate_eval_name,
    replicate_student_name,
)
from scd_pipeline.engine.worklog import parse as parse_work

TARGET_SECONDS = 20 * 60
# Stage of a benchmark file, by the rule name its stem starts with (pipeline order).
STAGES = ("prepare_model", "prepare_data", "sft_teacher", "sft_student", "cache_logits",
          "estimate_subdomains", "ioa_plan", "synthesize", "cache_logits_synthetic",
          "estimate_subdomains_synthetic", "distill", "evaluate", "report", "multitask_report")


@dataclass
class JobTime:
    """One job's benchmark file: its stem (rule + wildcards), seconds, end time, peak RSS, CPU time,
    and the compute-bound seconds of its log's ``scd-work`` lines (None: no log or no lines)."""

    job: str
    seconds: float
    end: float
    max_rss_mb: float
    cpu_seconds: float
    compute_seconds: float | None = None
    threads: int = 1

    @property
    def stage(self) -> str:
        return stage_of(self.job)


def stage_of(job: str) -> str:
    """The stage of a job stem, e.g. ``cache_logits_3`` -> ``cache_logits`` (the longest match:
    ``cache_logits_synthetic_3`` -> ``cache_logits_synthetic``)."""
    for stage in sorted(STAGES, key=len, reverse=True):
        if job == stage or job.startswith(stage + "_"):
            return stage
    return job


def expected_jobs(config: dict, best: int | str = "{T*}") -> list[str]:
    """Benchmark stems of every job ``snakemake`` runs for ``config`` (mirrors workflow/rules);
    ``best``: T*'s index (the one teacher checkpoint evaluated on the test split)."""
    checkpoints = range(1, config["sft"]["teacher"]["n_checkpoints"] + 1)
    methods = list(config["distill"]["methods"])
    replicates = config.get("replicates", 1)
    if replicates == 1:
        students, evals = methods, [default_eval_name(f"students/{m}") for m in methods]
    else:
        students = [replicate_student_name(m, s) for m in methods for s in range(replicates)]
        evals = [replicate_eval_name(m, s) for m in methods for s in range(replicates)]
    curricula = [parse_method(m) for m in methods if parse_method(m).curriculum]
    ioa = []
    if curricula:
        ioa = ["ioa_plan", "synthesize"] + [f"cache_logits_synthetic_{k}" for k in checkpoints]
        ioa += ["estimate_subdomains_synthetic"] if any(m.needs_subdomains for m in curricula) else []
    evaluated = ["teacher_base", "student_sft", f"teacher-ckpt-{best}", *evals]
    return (["prepare_model_teacher", "prepare_model_student", "prepare_data", "sft_teacher", "sft_student"]
            + [f"cache_logits_{k}" for k in checkpoints] + ["estimate_subdomains"] + ioa
            + [f"distill_{m}" for m in students] + [f"evaluate_{name}" for name in evaluated] + ["report"])


def read_job(path: Path, folder: Path) -> JobTime:
    """One Snakemake benchmark TSV (mean over its rows when the rule was repeated) and the
    ``scd-work`` lines of the job's log (``../logs/{stem}.log`` beside the benchmark folder)."""
    frame = pd.read_csv(path, sep="\t")
    stem = path.relative_to(folder).with_suffix("").as_posix()  # replicates: distill_td/seed-1
    log = folder.parent / "logs" / f"{stem}.log"
    compute = None
    if log.is_file():
        records = parse_work(log.read_text(encoding="utf-8", errors="replace").splitlines())
        compute = sum(r["compute_seconds"] for r in records) if records else None
    return JobTime(stem, float(frame["s"].mean()), path.stat().st_mtime,
                   float(pd.to_numeric(frame["max_rss"], errors="coerce").max()),
                   float(pd.to_numeric(frame["cpu_time"], errors="coerce").mean()), compute)


def job_threads(logs: list[Path]) -> dict[str, int]:
    """Threads per benchmark stem, from Snakemake's run logs (oldest first, the latest run of a job
    wins): each job block names its ``benchmark:`` file and, above one thread, ``threads: N``."""
    threads: dict[str, int] = {}
    for log in sorted(logs, key=lambda p: p.stat().st_mtime):
        for block in re.split(r"\n(?=\[)", log.read_text(encoding="utf-8", errors="replace")):
            bench = re.search(r"^\s+benchmark: (\S+)\.tsv$", block, re.M)
            if bench:
                found = re.search(r"^\s+threads: (\d+)$", block, re.M)
                stem = re.sub(r"^.*?/benchmarks/", "", bench.group(1))
                threads[stem] = int(found.group(1)) if found else 1
    return threads


# A shared job (``results/benchmarks/``: model preparation) that ended this long before the task's
# first job started was run for an earlier task and reused by this run: not part of its cost.
EARLIER_RUN_GAP_S = 10 * 60


def read_jobs(results: Path, task: str) -> tuple[list[JobTime], list[JobTime]]:
    """The jobs of the task's run, and the shared jobs of an earlier run that it reused."""
    def read(folder: Path) -> list[JobTime]:
        return [read_job(path, folder) for path in sorted(folder.rglob("*.tsv"))] if folder.is_dir() else []

    own, shared = read(results / task / "benchmarks"), read(results / "benchmarks")
    if not own:
        return shared, []
    first_start = min(job.end - job.seconds for job in own)
    reused = [job for job in shared if job.end < first_start - EARLIER_RUN_GAP_S]
    return [job for job in shared if job not in reused] + own, reused


def compute_part(jobs: list[JobTime]) -> float:
    """Compute-bound seconds of ``jobs`` (a job without ``scd-work`` lines counts as all overhead)."""
    return sum(job.compute_seconds or 0.0 for job in jobs)


def stage_rows(jobs: list[JobTime], expected: list[str]) -> list[dict]:
    rows = []
    for stage in dict.fromkeys([*STAGES, *(job.stage for job in jobs)]):
        mine = [job for job in jobs if job.stage == stage]
        wanted = [name for name in expected if stage_of(name) == stage]
        if not mine and not wanted:
            continue
        slowest = max(mine, key=lambda job: job.seconds, default=None)
        seconds, compute = sum(job.seconds for job in mine), compute_part(mine)
        rows.append({"stage": stage, "jobs": f"{len(mine)}/{len(wanted)}",
                     "seconds": seconds, "minutes": seconds / 60, "compute s": compute,
                     "overhead": f"{(seconds - compute) / seconds:.0%}" if seconds else "",
                     "slowest job": f"{slowest.job} ({slowest.seconds:.0f} s)" if slowest else "",
                     "peak RSS MB": max((job.max_rss_mb for job in mine), default=0.0),
                     "CPU s": sum(job.cpu_seconds for job in mine)})
    return rows


def load_run_config(results: Path, task: str, config_path: Path | None) -> dict:
    """The config of the run: ``--config``, else the effective config Snakemake wrote
    (``results/.config/{task}.yaml``), else the repository defaults."""
    for candidate in (config_path, results / ".config" / f"{task}.yaml", REPO_ROOT / "config.yaml"):
        if candidate is not None and candidate.is_file():
            return yaml.safe_load(candidate.read_text(encoding="utf-8"))
    raise SystemExit(f"no config found for task {task}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="the run's results_dir")
    parser.add_argument("--task", default="demo", help="task of the run")
    parser.add_argument("--config", type=Path, default=None,
                        help="config of the run (default: results/.config/{task}.yaml, else config.yaml)")
    parser.add_argument("--jobs", action="store_true", help="also print one line per job")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores of the machine that ran it")
    parser.add_argument("--snakemake-logs", type=Path, default=None,
                        help="folder of Snakemake's run logs (default: .snakemake/log beside the results folder)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = load_run_config(args.results, args.task, args.config)
    index = args.results / args.task / "teacher" / "checkpoints.json"
    best = json.loads(index.read_text(encoding="utf-8"))["best_index"] if index.is_file() else "{T*}"
    expected = expected_jobs(config, best)
    jobs, reused = read_jobs(args.results, args.task)
    log_dir = args.snakemake_logs or args.results.resolve().parent / ".snakemake" / "log"
    threads = job_threads(sorted(log_dir.glob("*.snakemake.log")) if log_dir.is_dir() else [])
    for job in jobs:
        job.threads = threads.get(job.job, 1)
    if not jobs:
        raise SystemExit(f"no benchmark files under {args.results}/benchmarks or {args.results}/{args.task}/benchmarks")
    found = {job.job for job in jobs}
    missing = [name for name in expected if name not in found | {job.job for job in reused}]
    total = sum(job.seconds for job in jobs)
    span = max(job.end for job in jobs) - min(job.end - job.seconds for job in jobs)
    print(f"# end-to-end run: {args.results}/{args.task} ({len(jobs)} of {len(expected)} expected jobs)")
    print(format_table(stage_rows(jobs, expected)))
    if args.jobs:
        print()
        print(format_table([{"job": job.job, "seconds": job.seconds,
                             "compute s": float("nan") if job.compute_seconds is None else job.compute_seconds,
                             "threads": job.threads, "peak RSS MB": job.max_rss_mb, "CPU s": job.cpu_seconds}
                            for job in jobs]))
    compute = compute_part(jobs)
    cpu = sum(job.cpu_seconds for job in jobs)
    print(f"\nsum of job times: {total:.0f} s = {total / 60:.1f} min; compute-bound {compute:.0f} s, overhead "
          f"{total - compute:.0f} s ({(total - compute) / total:.0%}); wall span (first job start to last job end): "
          f"{span:.0f} s = {span / 60:.1f} min; cores in use over the span: {cpu / (args.cores * span):.0%} "
          f"of {args.cores} ({cpu:.0f} CPU s)")
    held = sum(job.seconds * job.threads for job in jobs)
    busy = sum((job.compute_seconds or 0.0) * job.threads for job in jobs)
    print(f"core-seconds held by jobs (seconds x threads, {len(threads)} jobs' threads from Snakemake's logs, "
          f"else 1): {held:.0f}; compute-bound {busy:.0f}; overhead {held - busy:.0f} ({(held - busy) / held:.0%})")
    if reused:
        print(f"reused from an earlier run (not counted): {', '.join(job.job for job in reused)}")
    unmeasured = [job.job for job in jobs if job.compute_seconds is None]
    if unmeasured:
        print(f"no scd-work lines (counted as overhead): {', '.join(unmeasured)}")
    if missing:
        print(f"incomplete: no benchmark file for {len(missing)} job(s): {', '.join(missing)}")
        print(f"target <= {TARGET_SECONDS // 60} min: not decidable yet "
              f"({'already missed' if span > TARGET_SECONDS else 'not yet exceeded'} by the jobs found)")
    else:
        print(f"target <= {TARGET_SECONDS // 60} min (wall span): {'met' if span <= TARGET_SECONDS else 'missed'}")


if __name__ == "__main__":
    main()
