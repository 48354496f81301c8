"""What the report computes from the evaluations: the results frame, the best student, per-tag
scores, and the paper's Table 1 across tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scd_pipeline.engine.methods import method_label
from scd_pipeline.stages.report.evidence import (
    DIFFERENCE_COLUMNS,
    REFERENCES,
    TaskEvidence,
    differences_frame,
)
from scd_pipeline.stages.report.render import as_float

if TYPE_CHECKING:
    from scd_pipeline.stages.report.inputs import ModelRow, ReportInputs

STUDENT_ROLES = ("sft", "distilled")

PAPER_ORDER = ("td", "taid", "cd", "scd", "scd_aw")  # distilled rows in the paper's Table 1 order


def table1_key(row: ModelRow) -> str | None:
    """The Table 1 row a report row belongs to: teacher, sft or the distilled method string."""
    if row.role in ("teacher", "sft"):
        return row.role
    return row.method if row.role == "distilled" else None


# --- the results table ---------------------------------------------------------------------------


def results_frame(rows: Sequence[ModelRow], metrics: Sequence[str], primary: str,
                  evidence: TaskEvidence | None = None) -> pd.DataFrame:
    """One row per model (the content of summary.csv).

    Columns: ``model, role, eval_name, status`` (ok / not run), ``split, n, seeds``, each metric
    (and ``loss``, the mean gold NLL) with ``{metric}_low`` / ``_high`` (its interval) and, for
    replicated rows, ``_sd`` / ``_min`` / ``_max`` over seeds; ``gap_{metric}`` (row - T*; empty
    for the teacher and rows without results); for each reference r in teacher, sft, td
    ``delta_{metric}_vs_{r}`` with ``_low``, ``_high`` and ``_resolved`` (interval excludes 0);
    and ``best`` (the best student, see the module docstring).
    """
    shown = [*metrics, "loss"]
    records = []
    for row in rows:
        values = row.result["metrics"] if row.result else {}
        record = {"model": row.label, "role": row.role, "eval_name": row.eval_name,
                  "status": "ok" if row.result else "not run",
                  "split": row.result.get("split") if row.result else None,
                  "n": row.result.get("n") if row.result else None,
                  "seeds": len(row.seed_results) if row.seed_names else (1 if row.result else 0)}
        for metric in shown:
            record[metric] = as_float(values.get(metric))
            interval = evidence.interval(row.eval_name, metric) if evidence else None
            if interval is not None:  # the bootstrap's estimate is the mean over seeds as well
                record[metric] = interval.estimate
            record[f"{metric}_low"] = interval.low if interval else math.nan
            record[f"{metric}_high"] = interval.high if interval else math.nan
            per_seed = [as_float(r["metrics"].get(metric)) for r in row.seed_results.values()]
            record[f"{metric}_sd"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
            record[f"{metric}_min"] = min(per_seed) if per_seed else math.nan
            record[f"{metric}_max"] = max(per_seed) if per_seed else math.nan
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame["n"] = frame["n"].astype("Int64")
    teacher = frame[(frame["role"] == "teacher") & (frame["status"] == "ok")]
    for metric in metrics:
        reference = teacher[metric].iloc[0] if len(teacher) else float("nan")
        gap = frame[metric] - reference
        frame[f"gap_{metric}"] = gap.where(frame["role"] != "teacher")
    deltas = differences_frame(evidence, metrics, primary) if evidence else None
    for metric in metrics:
        for reference in REFERENCES:
            prefix = f"delta_{metric}_vs_{reference}"
            picked = (deltas[(deltas["metric"] == metric) & (deltas["reference"] == reference)].set_index("key")
                      if deltas is not None else pd.DataFrame(columns=DIFFERENCE_COLUMNS))
            for column, source in (("", "estimate"), ("_low", "low"), ("_high", "high"), ("_p", "p"),
                                   ("_family", "family"), ("_p_adjusted", "p_adjusted"), ("_resolved", "resolved")):
                frame[prefix + column] = [picked[source].get(key) if key in picked.index else
                                          (None if source in ("resolved", "family") else math.nan)
                                          for key in frame["eval_name"]]
    frame["best"] = best_student_mask(frame, [primary, *[m for m in metrics if m != primary]])
    return frame


def best_student_mask(frame: pd.DataFrame, metric_order: Sequence[str]) -> pd.Series:
    """True for the student row(s) with the lexicographically highest metrics (NaN = lowest)."""
    candidates = frame[frame["role"].isin(STUDENT_ROLES) & (frame["status"] == "ok")]
    if candidates.empty:
        return pd.Series(False, index=frame.index)
    keys = {i: tuple(-math.inf if math.isnan(v) else v for v in candidates.loc[i, list(metric_order)])
            for i in candidates.index}
    top = max(keys.values())
    return pd.Series([keys.get(i) == top for i in frame.index], index=frame.index)


def per_tag_frame(rows: Sequence[ModelRow], metric: str) -> pd.DataFrame:
    """Models (rows with results) x tags: the per-tag ``metric`` from each eval's ``per_tag``."""
    evaluated = [row for row in rows if row.result]
    tags = sorted({tag for row in evaluated for tag in row.result.get("per_tag", {})})
    data = {tag: [as_float(row.result.get("per_tag", {}).get(tag, {}).get(metric)) for row in evaluated]
            for tag in tags}
    return pd.DataFrame(data, index=[row.eval_name for row in evaluated], columns=tags)


def tag_sizes(rows: Sequence[ModelRow]) -> dict[str, int]:
    """Samples per tag, from the first evaluation that lists the tag."""
    sizes: dict[str, int] = {}
    for row in rows:
        for tag, values in (row.result or {}).get("per_tag", {}).items():
            sizes.setdefault(tag, values.get("n"))
    return sizes


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
