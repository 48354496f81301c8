"""The report stage (``scd-pipeline report``): one page comparing the teacher, the SFT student and
every distilled student, with an interval on every number, and the plots that explain the run.

Reads only artifacts under ``results/{task}/`` and writes, beside them, ``report.md`` (plain
Markdown for a terminal), ``report.html`` (self-contained: PNGs embedded as base64, inline CSS),
``summary.csv`` (one row per model, with interval bounds), ``sfs_tfs.csv`` (the SFS/TFS outcome of
every model, long format) and ``plots/*.png`` (matplotlib, Agg canvas). ``report --tasks a,b``
writes the paper's Table 1 across tasks instead (``multitask.py``).

Which evaluation is which row (names as ``naming.default_eval_name`` derives them from a path):

- Teacher (T*): ``eval/teacher-ckpt-{k}.json`` for k = ``best_index`` of ``teacher/checkpoints.json``
  (the checkpoint with the best validation metric), i.e. ``evaluate --model teacher/ckpt-{k}``.
- SFT student: ``eval/student_sft.json``.
- Distilled students: ``eval/{name}.json`` for every method string of config ``distill.methods``
  and every other directory under ``students/`` (``students/td+paced`` -> ``eval/td_paced.json``).
  With ``replicates: N`` > 1 a method's row gathers ``eval/{name}@seed-{s}.json`` for s < N
  (``students/{method}/seed-{s}``); a folder outside the config with ``seed-*`` sub-folders is
  read the same way.
- Any other ``eval/*.json`` (e.g. a base model) is listed as "other" (never "best student");
  evaluations of non-best teacher checkpoints appear on the teacher checkpoint plot instead.

A row whose evaluation is missing stays in the table as "not run", with the command that produces
it; a plot whose input is missing is listed with the reason. The best student is the student row
(SFT or distilled) with the highest primary metric (the metric T* was chosen by, as
``teacher/checkpoints.json`` records it, else ``sft.val_metric``: accuracy for choice tasks, exact
F1 for list tasks), ties broken by the other metrics in table order; rows still tied are all
marked best. Replicated rows show the mean over seeds.

Intervals (:mod:`scd_pipeline.stages.report.evidence`, :mod:`scd_pipeline.math.stats`): a paired bootstrap over the
test rows (``report.resamples`` resamples, seeded by config ``seed`` and the task), the same rows
for every model, so every difference is paired; with replicates the seeds are resampled too.
Every difference is ``row - reference`` (T*, the SFT student, TD); it is marked ``*`` (resolved)
only when its ``report.confidence`` interval excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.io import atomic_dir, atomic_path
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.stages.report.inputs import ReportInputs, gather_inputs
from scd_pipeline.stages.report.plots import plan_plots
from scd_pipeline.stages.report.render import (
    render_html,
    render_markdown,
)
from scd_pipeline.stages.report.sections import report_blocks


@dataclass
class ReportResult:
    markdown: Path
    html: Path
    summary_csv: Path
    plots: list[Path]
    missing_evals: list[str]
    missing_plots: list[str]
    outcome_csv: Path | None = None


def outcome_csv_frame(inputs: ReportInputs) -> pd.DataFrame:
    """sfs_tfs.csv: the outcome table with each model's label (columns of docs/ARTIFACTS.md)."""
    labels = {row.eval_name: row.label for row in inputs.rows}
    frame = inputs.outcomes.copy()
    if frame.empty:
        from scd_pipeline.stages.report.evidence import OUTCOME_COLUMNS

        frame = pd.DataFrame(columns=OUTCOME_COLUMNS)
    frame.insert(0, "model", [labels.get(key, key) for key in frame["key"]])
    return frame.rename(columns={"key": "eval_name"})


def build_report(config: dict) -> ReportResult:
    """The stage: write ``report.md``, ``report.html``, ``summary.csv``, ``sfs_tfs.csv``,
    ``plots/*.png`` and ``report.config.yaml`` under ``results/{task}/``. No artifact is required:
    what is absent is listed in the report as missing."""
    inputs = gather_inputs(config)
    root = inputs.root
    jobs, missing_plots = plan_plots(inputs)
    plots_dir = root / "plots"
    with atomic_dir(plots_dir) as tmp:  # the folder is replaced as a whole: no stale plot survives
        for file_name, draw in jobs:
            draw(tmp / file_name)
    blocks = report_blocks(inputs, {file_name for file_name, _ in jobs}, missing_plots)
    title = f"SCD pipeline report: task {config['task']}"
    paths = {"csv": root / "summary.csv", "outcome": root / "sfs_tfs.csv", "html": root / "report.html",
             "md": root / "report.md"}
    with atomic_path(paths["csv"]) as tmp:
        inputs.frame.to_csv(tmp, index=False)
    with atomic_path(paths["outcome"]) as tmp:
        outcome_csv_frame(inputs).to_csv(tmp, index=False)
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(render_html(title, blocks, root), encoding="utf-8")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_markdown(title, blocks), encoding="utf-8")
    write_effective_config(config, root, "report")
    return ReportResult(paths["md"], paths["html"], paths["csv"], [plots_dir / name for name, _ in jobs],
                        [f"{row.label}: {row.missing}" for row in inputs.rows if row.missing], missing_plots,
                        paths["outcome"])


# --- the paper's Table 1 across tasks -------------------------------------------------------------


def artifacts(config: dict) -> list[Artifact]:
    """What ``report`` writes: the documents, the tables, the plots and the config, as one unit."""
    root = task_dir(config)
    return [Artifact(root / "report.md",
                     tuple(root / part for part in ("report.md", "report.html", "summary.csv",
                                                    "sfs_tfs.csv", "plots", "report.config.yaml")))]
