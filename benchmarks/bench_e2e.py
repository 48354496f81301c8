"""End-to-end wall time of a pipeline run, per stage and in total, from Snakemake's benchmark files.

Every rule declares ``benchmark:``; Snakemake writes one TSV per job (columns ``s``, ``h:m:s``,
``max_rss``, ..., ``cpu_time``) under ``results/benchmarks/`` (models) and
``results/{task}/benchmarks/`` (everything else). This script only reads them (it never runs the
pipeline), groups jobs by stage, lists the jobs the config expects but that have no file yet
(not run, still running, or run by hand outside Snakemake), and prints:

* per stage: jobs found / expected, seconds summed over its jobs, the slowest job, peak RSS;
* total: the sum of all job seconds (the serial cost) and the wall span, from the earliest job
  start (file time minus its seconds) to the last job end (file time); target <= 20 min.

    .venv/bin/python benchmarks/bench_e2e.py                       # results/, task demo
    .venv/bin/python benchmarks/bench_e2e.py --task smdis --jobs   # also one line per job
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from _common import REPO_ROOT, format_table

TARGET_SECONDS = 20 * 60
# Stage of a benchmark file, by the rule name its stem starts with (pipeline order).
STAGES = ("prepare_model", "prepare_data", "sft_teacher", "sft_student", "cache_logits",
          "estimate_subdomains", "distill", "evaluate", "report")


@dataclass
class JobTime:
    """One job's benchmark file: its stem (rule + wildcards), seconds, end time, peak RSS, CPU time."""

    job: str
    seconds: float
    end: float
    max_rss_mb: float
    cpu_seconds: float

    @property
    def stage(self) -> str:
        return stage_of(self.job)


def stage_of(job: str) -> str:
    """The stage of a job stem, e.g. ``cache_logits_3`` -> ``cache_logits``."""
    for stage in STAGES:
        if job == stage or job.startswith(stage + "_"):
            return stage
    return job


def expected_jobs(config: dict) -> list[str]:
    """Benchmark stems of every job ``snakemake`` runs for ``config`` (mirrors workflow/rules)."""
    checkpoints = range(1, config["sft"]["teacher"]["n_checkpoints"] + 1)
    methods = list(config["distill"]["methods"])
    evaluated = ["teacher_base", "student_sft", *(f"teacher-ckpt-{k}" for k in checkpoints), *methods]
    return (["prepare_model_teacher", "prepare_model_student", "prepare_data", "sft_teacher", "sft_student"]
            + [f"cache_logits_{k}" for k in checkpoints] + ["estimate_subdomains"]
            + [f"distill_{m}" for m in methods] + [f"evaluate_{name}" for name in evaluated] + ["report"])


def read_job(path: Path) -> JobTime:
    """One Snakemake benchmark TSV (mean over its rows when the rule was repeated)."""
    frame = pd.read_csv(path, sep="\t")
    return JobTime(path.stem, float(frame["s"].mean()), path.stat().st_mtime,
                   float(pd.to_numeric(frame["max_rss"], errors="coerce").max()),
                   float(pd.to_numeric(frame["cpu_time"], errors="coerce").mean()))


def read_jobs(results: Path, task: str) -> list[JobTime]:
    folders = [results / "benchmarks", results / task / "benchmarks"]
    return [read_job(path) for folder in folders if folder.is_dir() for path in sorted(folder.glob("*.tsv"))]


def stage_rows(jobs: list[JobTime], expected: list[str]) -> list[dict]:
    rows = []
    for stage in dict.fromkeys([*STAGES, *(job.stage for job in jobs)]):
        mine = [job for job in jobs if job.stage == stage]
        wanted = [name for name in expected if stage_of(name) == stage]
        if not mine and not wanted:
            continue
        slowest = max(mine, key=lambda job: job.seconds, default=None)
        rows.append({"stage": stage, "jobs": f"{len(mine)}/{len(wanted)}",
                     "seconds": sum(job.seconds for job in mine),
                     "minutes": sum(job.seconds for job in mine) / 60,
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
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = load_run_config(args.results, args.task, args.config)
    expected = expected_jobs(config)
    jobs = read_jobs(args.results, args.task)
    if not jobs:
        raise SystemExit(f"no benchmark files under {args.results}/benchmarks or {args.results}/{args.task}/benchmarks")
    found = {job.job for job in jobs}
    missing = [name for name in expected if name not in found]
    total = sum(job.seconds for job in jobs)
    span = max(job.end for job in jobs) - min(job.end - job.seconds for job in jobs)
    print(f"# end-to-end run: {args.results}/{args.task} ({len(jobs)} of {len(expected)} expected jobs)")
    print(format_table(stage_rows(jobs, expected)))
    if args.jobs:
        print()
        print(format_table([{"job": job.job, "seconds": job.seconds, "peak RSS MB": job.max_rss_mb,
                             "CPU s": job.cpu_seconds} for job in jobs]))
    print(f"\nsum of job times: {total:.0f} s = {total / 60:.1f} min; wall span (first job start to last "
          f"job end): {span:.0f} s = {span / 60:.1f} min")
    if missing:
        print(f"incomplete: no benchmark file for {len(missing)} job(s): {', '.join(missing)}")
        print(f"target <= {TARGET_SECONDS // 60} min: not decidable yet "
              f"({'already missed' if total > TARGET_SECONDS else 'not yet exceeded'} by the jobs found)")
    else:
        print(f"target <= {TARGET_SECONDS // 60} min (sum of job times): "
              f"{'met' if total <= TARGET_SECONDS else 'missed'}")


if __name__ == "__main__":
    main()
