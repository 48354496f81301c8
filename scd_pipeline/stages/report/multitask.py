"""The paper's Table 1 across tasks: ``scd-pipeline report --tasks a,b`` reads each task's
evaluations and writes one table of every method's main metric per task and on average."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scd_pipeline.engine.config import validate_config
from scd_pipeline.engine.io import atomic_path
from scd_pipeline.engine.methods import method_label
from scd_pipeline.engine.naming import multitask_dir
from scd_pipeline.errors import ConfigError
from scd_pipeline.math.stats import Interval
from scd_pipeline.stages.report.inputs import METRIC_LABELS, ReportInputs, gather_inputs
from scd_pipeline.stages.report.render import (
    Block,
    Table,
    as_float,
    fmt_interval,
    render_html,
    render_markdown,
)
from scd_pipeline.stages.report.tables import ModelRow

PAPER_ORDER = ("td", "taid", "cd", "scd", "scd_aw")  # distilled rows in the paper's Table 1 order


def table1_key(row: ModelRow) -> str | None:
    """The Table 1 row a report row belongs to: teacher, sft or the distilled method string."""
    if row.role in ("teacher", "sft"):
        return row.role
    return row.method if row.role == "distilled" else None


# --- the results table ---------------------------------------------------------------------------


def multitask_frame(per_task: dict[str, ReportInputs]) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per Table 1 row (teacher, SFT student, TD, TAID, CD, SCD, SCD+AW, then any other
    distilled method): each task's main metric with its interval, the average over tasks (its
    interval from the averaged bootstrap draws of the tasks) and the best student per column."""
    found: dict[str, dict[str, tuple[ModelRow, ReportInputs]]] = {}
    for task, inputs in per_task.items():
        for row in inputs.rows:
            key = table1_key(row)
            if key is not None:
                found.setdefault(key, {})[task] = (row, inputs)
    others = [k for k in found if k not in ("teacher", "sft", *PAPER_ORDER)]
    order = [k for k in ("teacher", "sft", *PAPER_ORDER) if k in found] + others
    labels = {"teacher": "Teacher (T*)", "sft": "SFT student"}
    metrics = {task: inputs.primary for task, inputs in per_task.items()}
    records = []
    for key in order:
        record: dict[str, Any] = {"model": labels.get(key, method_label(key)), "key": key,
                                  "role": key if key in ("teacher", "sft") else "distilled"}
        draws = []
        for task in per_task:
            row, inputs = found[key].get(task, (None, None))
            evidence = inputs.evidence.metrics.get(row.eval_name, {}).get(metrics[task]) if (
                row is not None and inputs.evidence is not None) else None
            value = (evidence.estimate if evidence is not None else
                     as_float(row.result["metrics"].get(metrics[task])) if row is not None and row.result else math.nan)
            record.update({task: value, f"{task}_low": evidence.interval.low if evidence else math.nan,
                           f"{task}_high": evidence.interval.high if evidence else math.nan,
                           f"{task}_metric": metrics[task],
                           f"{task}_seeds": (len(row.seed_results) if row.seed_names else 1) if row and row.result else 0})
            draws.append(evidence.draws if evidence is not None else None)
        values = [record[task] for task in per_task]
        record["average"] = float(np.mean(values)) if not any(math.isnan(v) for v in values) else math.nan
        if all(d is not None for d in draws) and len({len(d) for d in draws}) == 1:
            mean_draws = np.mean(np.stack(draws), axis=0)
            tail = (1 - next(iter(per_task.values())).evidence.bootstrap.confidence) / 2
            record["average_low"], record["average_high"] = (float(q) for q in np.quantile(mean_draws, [tail, 1 - tail]))
        else:
            record["average_low"] = record["average_high"] = math.nan
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    for column in [*per_task, "average"]:
        students = frame[frame["role"] != "teacher"][column]
        top = students.max(skipna=True)
        frame[f"{column}_best"] = (frame["role"] != "teacher") & (frame[column] == top) & frame[column].notna()
    return frame, metrics


@dataclass
class MultitaskResult:
    markdown: Path
    html: Path
    summary_csv: Path
    missing: list[str]


def parse_tasks(text: str) -> list[str]:
    """``demo,smdis`` -> ["demo", "smdis"]; a one-line ConfigError for an empty or repeated list."""
    tasks = [part.strip() for part in text.split(",") if part.strip()]
    if not tasks:
        raise ConfigError(f"--tasks {text!r}: name at least one task, e.g. --tasks demo,smdis")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"--tasks {text!r}: a task is named twice")
    return tasks


def build_multitask_report(config: dict, tasks: Sequence[str]) -> MultitaskResult:
    """``report --tasks a,b``: the paper's Table 1 shape across tasks, written to
    ``{results_dir}/tasks-a+b/report.md``, ``report.html`` and ``summary.csv``. Every task is read
    with the same config (``task`` set to it); a task without results shows its rows as not run."""
    tasks = list(tasks)
    validate_config({**config, "tasks": tasks})  # unknown task names: one line naming the key
    per_task = {task: gather_inputs({**config, "task": task}, details=False) for task in tasks}
    frame, metrics = multitask_frame(per_task)
    out = multitask_dir(config["results_dir"], tasks)
    headers = ["Model", *[f"{task} ({METRIC_LABELS[metrics[task]]})" for task in tasks], "Average"]
    rows, bold = [], set()
    for i, record in enumerate(frame.to_dict("records")):
        cells = []
        for j, column in enumerate([*tasks, "average"], start=1):
            cells.append(fmt_interval(Interval(record[column], record[f"{column}_low"], record[f"{column}_high"]))
                         if not math.isnan(record[column]) else "not run")
            if record[f"{column}_best"]:
                bold.add((i, j))
        rows.append([record["model"], *cells])
    gaps = [(task, row.label, row.missing) for task, inputs in per_task.items()
            for row in inputs.rows if row.missing and table1_key(row) is not None]
    listed = {(task, label) for task, label, _ in gaps}
    gaps += [(task, record["model"], "no evaluation of it under that task's results (it is not "
                                      "in that task's distill.methods)")
             for record in frame.to_dict("records") for task in tasks
             if math.isnan(record[task]) and (task, record["model"]) not in listed]
    missing = [f"{task}: {label}: {why}" for task, label, why in gaps]
    replicated = {task: inputs.config.get("replicates", 1) for task, inputs in per_task.items()}
    blocks: list[Block] = [
        ("p", f"Main metric of every task (the metric its T* was chosen by) on its test split, generated "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from `{config['results_dir']}`. "
              f"Each cell is `estimate [low, high]`, a {config['report']['confidence']:.0%} paired-bootstrap "
              "interval over that task's test rows; Average is the mean over the tasks, its interval "
              "from the tasks' resamples averaged (tasks are independent samples). Bold: the best "
              "student (SFT or distilled) of each column. Bounds, metric names and seed counts are in "
              "`summary.csv`; each task's own report has the differences and their resolution."),
        ("table", Table(headers, rows, bold_cells=bold)),
        ("p", "Seeds per distilled method: " + ", ".join(f"{task} {n}" for task, n in replicated.items()) + "."),
        ("h2", "What is missing"), ("list", missing) if missing else ("p", "Nothing: every row has results."),
    ]
    title = f"SCD pipeline: results across tasks ({', '.join(tasks)})"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "html": out / "report.html", "csv": out / "summary.csv"}
    with atomic_path(paths["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(render_html(title, blocks, out), encoding="utf-8")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_markdown(title, blocks), encoding="utf-8")
    return MultitaskResult(paths["md"], paths["html"], paths["csv"], missing)
