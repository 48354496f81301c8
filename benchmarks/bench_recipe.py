"""Distillation recipe ablations on a finished run: each variant over several seeds, with intervals.

Why does a distilled student lose to (or beat) the student trained on the labels alone? Every
variant below is one ``scd-pipeline distill`` of the finished pipeline in ``--results`` (its
teacher caches, subdomains and SFT student; no teacher forward runs), repeated for ``--seeds``
seeds (``--set seed=SEED+s``), each then scored with ``scd-pipeline evaluate``. The ``sft``
variant is the control: CE only (``distill.kd_weight 0``), one phase of the SFT student's two
epochs, through the same loop and seeds, so every variant is compared with a label-only student
of the same seeds. Runs go to a separate results folder (``--workdir``; the finished run's inputs
are linked in), so the pipeline's own report never sees them; a variant already evaluated there
is not run again.

Ablations are scored on the **validation** split by default (``--split``): choosing a recipe on
the test rows would tune it to the rows that later judge it. Intervals: the package's paired
bootstrap over rows and seeds (``scd_pipeline.math.stats``), the same resamples for every variant.
Two reference rows are scored on the same split: T* (the run's best teacher checkpoint) and the
run's SFT student, so the table shows the teacher's margin the variants could close.

``--student-keep-every K`` asks whether a smaller student (a larger teacher margin) is what
distillation needs: the work folder then prepares its own depth-pruned student (every K-th
layer), trains its SFT student and estimates its subdomains (the teacher, its checkpoints and
caches stay the run's), and every variant and the control use that student.

    .venv/bin/python benchmarks/bench_recipe.py --results results --seeds 3
    .venv/bin/python benchmarks/bench_recipe.py --variants sft,td,td-init-sft --seeds 3
    .venv/bin/python benchmarks/bench_recipe.py --variants td,scd_aw --student-keep-every 6
    .venv/bin/python benchmarks/bench_recipe.py --tiny      # CI-size check on tiny models (~2 min)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, format_table, machine_line

from scd_pipeline.engine.config import load_config
from scd_pipeline.math.stats import PairedBootstrap, difference, metric_evidence
from scd_pipeline.stages.report.evidence import sample_scores, score_metric

CLI = [sys.executable, "-m", "scd_pipeline"]
CONTROL = "sft"
# name -> (method, config overrides); each a single change from the default recipe unless named
VARIANTS: dict[str, tuple[str, dict]] = {
    "sft": ("td", {"distill.kd_weight": 0.0, "distill.phases": 1, "distill.epochs_per_phase": 2.0}),
    "td": ("td", {}),
    "td-one-phase": ("td", {"distill.phases": 1, "distill.epochs_per_phase": 2.0}),
    "td-lambda-0.2": ("td", {"distill.kd_weight": 0.2}),
    "td-whole-run": ("td", {"distill.schedule": "whole_run"}),
    "td-budget-2x": ("td", {"distill.epochs_per_phase": 1.0}),
    "td-init-sft": ("td", {"distill.init": "sft"}),
    "sft-init-sft": ("td", {"distill.init": "sft", "distill.kd_weight": 0.0, "distill.phases": 1,
                            "distill.epochs_per_phase": 2.0}),
    "td-reverse-kl": ("td", {"distill.divergence": "reverse_kl"}),
    "td-temperature-2": ("td", {"distill.temperature": 2.0}),
    "scd_aw": ("scd_aw", {}),
    "scd_aw-init-sft": ("scd_aw", {"distill.init": "sft"}),
    "scd_aw-whole-run": ("scd_aw", {"distill.schedule": "whole_run"}),
}
# The run's inputs a distillation reads (linked into the work folder, never written there).
LINKED = ("data", "teacher", "logits", "student_sft", "subdomains.parquet", "subdomains.json")
# The student's side of them: built in the work folder instead when the student changes.
STUDENT_SIDE = ("student_sft", "subdomains.parquet", "subdomains.json")
# Reference rows (one model each, no seeds): T* and the SFT student, scored on the same split.
REFERENCES = ("T*", "student_sft")
TINY = {
    "task": "demo", "results_dir": "results",
    "data": {"demo": {"n_examples": 120, "test_size": 8}, "max_train_samples": 24},
    "models": {"teacher": {"source": "tiny:llama"}, "student": {"keep_every": 2}},
    "sft": {"batch_size": 4, "val_max_samples": 8, "teacher": {"n_checkpoints": 2, "epochs": 1},
            "student": {"epochs": 1}},
    "cache": {"top_k": 8}, "subdomains": {"probe_size": 8},
    "distill": {"phases": 2, "epochs_per_phase": 1, "batch_size": 4},
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO_ROOT / "results"), help="results_dir of the finished run")
    parser.add_argument("--task", default="demo")
    parser.add_argument("--config", default=None, help="the run's config file (default: the repository's config.yaml)")
    parser.add_argument("--workdir", default=None, help="where the ablation runs go (default: {results}-recipe)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} ({CONTROL} is always added)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of each distill / evaluate")
    parser.add_argument("--student-keep-every", type=positive_int, default=None, metavar="K",
                        help="ablate with a smaller student (every K-th teacher layer), prepared, SFT-trained and "
                        "subdomain-estimated in the work folder (default work folder: {results}-recipe-every-K)")
    parser.add_argument("--tiny", action="store_true", help="build a tiny run in a temporary folder and ablate it")
    return parser.parse_args()


def run(command: list[str], cwd: Path, threads: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{(result.stderr or result.stdout)[-2000:]}")
    return time.perf_counter() - started


def link_run(results: Path, work: Path, task: str, own_student: bool) -> None:
    """``work`` sees the finished run's models and task inputs through symbolic links (with
    ``own_student``: the teacher's side only; the student's is built by :func:`build_student`)."""
    (work / task).mkdir(parents=True, exist_ok=True)
    if own_student:
        (work / "models").mkdir(exist_ok=True)
        links = [(results / "models" / "teacher_base", work / "models" / "teacher_base")]
        links += [(results / task / n, work / task / n) for n in LINKED if n not in STUDENT_SIDE]
    else:
        links = [(results / "models", work / "models")] + [(results / task / n, work / task / n) for n in LINKED]
    for source, target in links:
        if not source.exists():
            sys.exit(f"{source}: not found; run the pipeline first (snakemake --cores all)")
        if not target.exists():
            target.symlink_to(source.resolve())


def build_tiny(root: Path, threads: int) -> tuple[Path, Path]:
    """A tiny finished run (tiny random models, 24 rows): its results folder and config."""
    import yaml

    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "results_dir": str(root / "results")}))
    for stage in (["prepare-model", "--role", "teacher"], ["prepare-model", "--role", "student"], ["prepare-data"],
                  ["sft", "--role", "teacher"], ["sft", "--role", "student"], ["cache-logits", "--checkpoint", "1"],
                  ["cache-logits", "--checkpoint", "2"], ["estimate-subdomains"]):
        run([*CLI, *stage, "--config", str(config)], root, threads)
    return root / "results", config


def build_student(work: Path, task: str, base: list[str], threads: int) -> None:
    """The work folder's own student: prepared, SFT-trained, subdomains estimated (each step
    skipped when its output is already there). ``base``: results dir, config and sets."""
    steps = [(work / "models" / "student_base", ["prepare-model", "--role", "student"]),
             (work / task / "student_sft", ["sft", "--role", "student", "--task", task]),
             (work / task / "subdomains.parquet", ["estimate-subdomains", "--task", task])]
    for output, stage in steps:
        if not output.exists():
            took = run([*CLI, *stage, *base], REPO_ROOT, threads)
            print(f"{' '.join(stage)}: {took:.0f} s", file=sys.stderr)


def score_references(work: Path, args: argparse.Namespace, base: list[str]) -> None:
    """T* (the best teacher checkpoint) and the SFT student of ``work``, scored on the split."""
    from scd_pipeline.engine.checkpoints import checkpoint_entry, read_checkpoints

    teacher = work / args.task / "teacher"
    checkpoints = read_checkpoints(teacher)
    models = {"T*": teacher / checkpoint_entry(checkpoints, int(checkpoints["best_index"]))["path"],
              "student_sft": work / args.task / "student_sft"}
    for name, model in models.items():
        eval_name = f"{reference_stem(name)}@{args.split}"
        if not (work / args.task / "eval" / f"{eval_name}.predictions.parquet").is_file():
            run([*CLI, "evaluate", "--model", str(model), "--name", eval_name, "--split", args.split, *base],
                REPO_ROOT, args.threads)


def reference_stem(name: str) -> str:
    return {"T*": "teacher-best"}.get(name, name)


def ablate(args: argparse.Namespace, results: Path, config: Path | None, work: Path) -> list[dict]:
    own_student = args.student_keep_every is not None
    link_run(results, work, args.task, own_student)
    names = list(dict.fromkeys([CONTROL, *[v for v in args.variants.split(",") if v]]))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    base = ["--results-dir", str(work)] + (["--config", str(config)] if config else [])
    if own_student:
        base += ["--set", f"models.student.keep_every={args.student_keep_every}", "--set", "models.student.keep_layers=null"]
        build_student(work, args.task, base, args.threads)  # prepare-model takes no --task
    base = ["--task", args.task, *base]
    score_references(work, args, base)
    seed = load_config(config)["seed"]  # the run's seed: seed-0 of every variant starts from it
    seconds: dict[str, list[float]] = {}
    for name in names:
        method, overrides = VARIANTS[name]
        sets = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
        for s in range(args.seeds):
            student = f"recipe/{name}/seed-{s}"
            eval_name = f"{name}@seed-{s}-{args.split}"
            if (work / args.task / "eval" / f"{eval_name}.predictions.parquet").is_file():
                continue
            took = run([*CLI, "distill", "--method", method, "--name", student, *base, *sets,
                        "--set", f"seed={seed + s}"], REPO_ROOT, args.threads)
            took += run([*CLI, "evaluate", "--model", str(work / args.task / "students" / student), "--name",
                         eval_name, "--split", args.split, *base], REPO_ROOT, args.threads)
            seconds.setdefault(name, []).append(took)
            print(f"{name} seed {s}: {took:.0f} s", file=sys.stderr)
    return summarise(args, work, names, seed, seconds)


def summarise(args: argparse.Namespace, work: Path, names: list[str], seed: int,
              seconds: dict[str, list[float]]) -> list[dict]:
    import pandas as pd

    from scd_pipeline.stages.report.evidence import read_predictions

    eval_dir = work / args.task / "eval"
    frames = {name: [read_predictions(eval_dir / f"{name}@seed-{s}-{args.split}.predictions.parquet")
                     for s in range(args.seeds)] for name in names}
    frames |= {name: [read_predictions(eval_dir / f"{reference_stem(name)}@{args.split}.predictions.parquet")]
               for name in REFERENCES}
    first = frames[CONTROL][0]
    order = first["sample_id"].tolist()
    kind = "list" if first["gold"].astype(str).str.startswith("[").any() else "choice"
    metric = score_metric(kind)
    bootstrap = PairedBootstrap(len(order), args.resamples, [seed, 7919])
    evidence = {}
    for name in [*REFERENCES, *names]:
        aligned = [f.set_index("sample_id").loc[order].reset_index() for f in frames[name]]
        evidence[name] = metric_evidence(bootstrap, sample_scores(aligned, kind, [], "none"), metric)
    rows = [{"variant": name, "method": "reference", "change": "the run's" if name == "T*" else "the work folder's",
             f"{metric} (mean of {args.seeds} seeds) [95%]": _interval(evidence[name].interval), "per seed": "—",
             f"Δ vs {CONTROL} [95%]": _interval(difference(bootstrap, evidence[name], evidence[CONTROL]), signed=True),
             "s per run": "—"} for name in REFERENCES]
    for name in names:
        found, delta = evidence[name], difference(bootstrap, evidence[name], evidence[CONTROL])
        method, overrides = VARIANTS[name]
        rows.append({"variant": name, "method": method,
                     "change": ", ".join(f"{k.removeprefix('distill.')}={v}" for k, v in overrides.items()) or "default",
                     f"{metric} (mean of {args.seeds} seeds) [95%]": _interval(found.interval),
                     "per seed": " ".join(f"{v:.3f}" for v in found.per_seed),
                     f"Δ vs {CONTROL} [95%]": "—" if name == CONTROL else _interval(delta, signed=True),
                     "s per run": round(float(pd.Series(seconds.get(name, [float("nan")])).mean()), 1)})
    return rows


def _interval(interval, signed: bool = False) -> str:
    form = "{:+.3f}" if signed else "{:.3f}"
    text = f"{form.format(interval.estimate)} [{form.format(interval.low)}, {form.format(interval.high)}]"
    return text + ("*" if signed and interval.excludes_zero else "")


def main() -> None:
    args = parse_args()
    if args.tiny:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            results, config = build_tiny(root, args.threads)
            rows = ablate(args, results, config, root / "recipe")
    else:
        results = Path(args.results).resolve()
        suffix = "-recipe" + (f"-every-{args.student_keep_every}" if args.student_keep_every else "")
        work = Path(args.workdir).resolve() if args.workdir else results.with_name(results.name + suffix)
        rows = ablate(args, results, Path(args.config).resolve() if args.config else None, work)
    student = f"student: every {args.student_keep_every}-th teacher layer" if args.student_keep_every else "the run's student"
    print(f"Recipe ablations, task {args.task}, {args.split} split, {args.seeds} seeds, {student}; {machine_line()}")
    print("Δ: paired bootstrap over rows and seeds against the CE-only control of the same seeds; "
          "* = resolved (the interval excludes 0). Reference rows are one model each; on the val split "
          "T*'s row is slightly favoured (T* was chosen on the first sft.val_max_samples val rows).\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
