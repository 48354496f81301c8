"""The report stage (``scd-pipeline report``): one page comparing the teacher, the SFT student and
every distilled student, with an interval on every number, and the plots that explain the run.

Reads only artifacts under ``results/{task}/`` and writes, beside them, ``report.md`` (plain
Markdown for a terminal), ``report.html`` (self-contained: PNGs embedded as base64, inline CSS),
``summary.csv`` (one row per model, with interval bounds), ``sfs_tfs.csv`` (the SFS/TFS outcome of
every model, long format) and ``plots/*.png`` (matplotlib, Agg canvas). ``report --tasks a,b``
writes the paper's Table 1 across tasks instead (:func:`build_multitask_report`).

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

Intervals (:mod:`scd_pipeline.evidence`, :mod:`scd_pipeline.stats`): a paired bootstrap over the
test rows (``report.resamples`` resamples, seeded by config ``seed`` and the task), the same rows
for every model, so every difference is paired; with replicates the seeds are resampled too.
Every difference is ``row - reference`` (T*, the SFT student, TD); it is marked ``*`` (resolved)
only when its ``report.confidence`` interval excludes 0.
"""

from __future__ import annotations

import base64
import html
import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scd_pipeline.checkpoints import checkpoint_indices
from scd_pipeline.config import task_dir, validate_config, write_effective_config
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.evidence import (
    PARTITIONS,
    REFERENCE_LABELS,
    REFERENCES,
    EvaluatedModel,
    Resolution,
    TaskEvidence,
    differences_frame,
    gather_evidence,
    outcome_frame,
    resolution,
    score_metric,
    tag_intervals,
)
from scd_pipeline.io import atomic_dir, atomic_path, read_json
from scd_pipeline.methods import method_label
from scd_pipeline.metrics import CHOICE_METRICS, LIST_METRICS, kappa_weights, primary_metric
from scd_pipeline.naming import (
    REPLICATE_MARK,
    default_eval_name,
    multitask_dir,
    replicate_eval_name,
    replicate_student_name,
)
from scd_pipeline.stats import Interval

METRIC_LABELS = {"accuracy": "Accuracy", "kappa": "Kappa", "macro_f1": "Macro-F1",
                 "exact_f1": "Exact F1", "partial_f1": "Partial F1", "loss": "NLL"}
STUDENT_ROLES = ("sft", "distilled")
RESULTS_PLOT = "results.png"
TEACHER_PLOT = "teacher_checkpoints.png"
SHARES_PLOT = "subdomain_shares.png"
AW_PLOT = "aw_histogram.png"
CURRICULUM_FILE = "curriculum.json"  # written by distill for curriculum methods (ioa, X+ioa)
RESOLVED_MARK = "*"


# --- which models, which files -------------------------------------------------------------------

@dataclass
class ModelRow:
    """One row of the results table: a model, its evaluation (or why there is none).

    A replicated row (``seed_names`` not empty) has one evaluation per seed; ``result`` then holds
    the mean over the seeds that were evaluated (``mean_result``) and ``seed_results`` each one.
    """

    label: str
    role: str  # teacher | sft | distilled | other
    eval_name: str
    result: dict | None = None
    missing: str | None = None  # why ``result`` is None, with the command that fixes it
    model_dir: Path | None = None  # the evaluated model's directory, when the pipeline knows it
    method: str | None = None  # distilled rows: the method string / students/ folder name
    seed_names: dict[int, str] = field(default_factory=dict)  # replicate s -> its eval name
    seed_results: dict[int, dict] = field(default_factory=dict)
    seeds_missing: list[str] = field(default_factory=list)  # "seed-s: command" per absent replicate

    @property
    def eval_names(self) -> list[str]:
        """The evaluations behind the row: one per evaluated seed, or the row's own."""
        return [self.seed_names[s] for s in sorted(self.seed_results)] if self.seed_names else [self.eval_name]

    @property
    def eval_label(self) -> str:
        if not self.eval_name:
            return "—"
        if self.seed_names:
            return f"eval/{self.eval_name}{REPLICATE_MARK}seed-{{{','.join(map(str, sorted(self.seed_names)))}}}.json"
        return f"eval/{self.eval_name}.json"


def teacher_eval_name(best_index: int) -> str:
    """Eval name of T*: what ``evaluate --model teacher/ckpt-{k}`` writes (``teacher-ckpt-{k}``)."""
    return default_eval_name(Path("teacher") / f"ckpt-{best_index}")


def student_eval_name(name: str) -> str:
    """Eval name of a distilled student: what ``evaluate --model students/{name}`` writes."""
    return default_eval_name(Path("students") / name)


def read_eval(path: Path) -> dict:
    """An ``eval/{name}.json`` written by ``evaluate``; a one-line DataError if it is not one."""
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable evaluation result ({exc.__class__.__name__}); "
                        "re-run `scd-pipeline evaluate` for it") from exc
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise DataError(f"{path}: not an evaluation result (no 'metrics' mapping); re-run "
                        "`scd-pipeline evaluate` for it")
    return record


def _quoted(value: str | Path) -> str:
    """A path or name as the user would type it in a shell (quoted only when needed)."""
    return shlex.quote(str(value))


def _attach(row: ModelRow, eval_dir: Path, when_missing: str) -> ModelRow:
    """Fill ``row.result`` from ``eval/{eval_name}.json``, or ``row.missing`` when it is absent."""
    path = eval_dir / f"{row.eval_name}.json"
    if path.is_file():
        row.result = read_eval(path)
    else:
        row.missing = when_missing
    return row


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return float(np.mean(numbers)) if numbers else None


def mean_result(results: Sequence[dict]) -> dict:
    """The evaluation of a replicated row: every metric (overall and per tag) averaged over seeds."""
    first = results[0]
    metrics = {key: _mean([r["metrics"].get(key) for r in results]) for key in first["metrics"]}
    tags = sorted({tag for r in results for tag in r.get("per_tag", {})})
    per_tag = {tag: {key: (first["per_tag"].get(tag, {}).get("n") if key == "n" else
                           _mean([r.get("per_tag", {}).get(tag, {}).get(key) for r in results]))
                     for key in first.get("per_tag", {}).get(tag, {"n": None})} for tag in tags}
    return {**first, "metrics": metrics, "per_tag": per_tag, "seeds": len(results)}


def _attach_replicates(row: ModelRow, eval_dir: Path, model_dirs: dict[int, Path], name: str) -> ModelRow:
    """Fill a replicated row from its seeds' evaluations; absent seeds go to ``seeds_missing``."""
    for seed, eval_name in row.seed_names.items():
        path = eval_dir / f"{eval_name}.json"
        if path.is_file():
            row.seed_results[seed] = read_eval(path)
            continue
        model_dir = model_dirs[seed]
        command = f"`scd-pipeline evaluate --model {_quoted(model_dir)} --name {_quoted(eval_name)}`"
        row.seeds_missing.append(
            f"seed-{seed}: run {command}" if model_dir.is_dir() else
            f"seed-{seed}: run `scd-pipeline distill --method {_quoted(name)} --name "
            f"{_quoted(replicate_student_name(name, seed))} --set seed=SEED+{seed}`, then {command}")
    if row.seed_results:
        row.result = mean_result([row.seed_results[s] for s in sorted(row.seed_results)])
    else:
        row.missing = "no seed evaluated: " + "; ".join(row.seeds_missing)
    return row


def student_names(config: dict, root: Path) -> list[str]:
    """Distilled students: config ``distill.methods`` in order, then other ``students/*`` dirs."""
    names = list(config.get("distill", {}).get("methods", []))
    students_dir = root / "students"
    if students_dir.is_dir():
        names += sorted(p.name for p in students_dir.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.name not in names)
    return names


def replicate_indices(config: dict, root: Path, name: str) -> list[int]:
    """Seeds of a distilled student: range(``replicates``) when the config has more than one;
    else the ``seed-{s}`` sub-folders of ``students/{name}`` when it has no single evaluation
    (a run made with other settings, e.g. read by ``report --tasks``); else none (one model)."""
    count = int(config.get("replicates", 1))
    if count > 1:
        return list(range(count))
    folder = root / "students" / name
    if (root / "eval" / f"{student_eval_name(name)}.json").is_file() or not folder.is_dir():
        return []
    return sorted(int(p.name.removeprefix("seed-")) for p in folder.iterdir()
                  if p.is_dir() and re.fullmatch(r"seed-\d+", p.name))


def model_rows(config: dict, root: Path, best_index: int | None) -> list[ModelRow]:
    """Teacher (T*), SFT student, distilled students, then other evaluations, with their results."""
    eval_dir = root / "eval"
    rows: list[ModelRow] = []
    if best_index is None:
        rows.append(ModelRow("Teacher (T*)", "teacher", "",
                             missing=f"{root / 'teacher' / 'checkpoints.json'} not found, so T* is "
                             "unknown (run `scd-pipeline sft --role teacher`)"))
    else:
        rows.append(_attach(ModelRow(f"Teacher (T* = ckpt-{best_index})", "teacher",
                                     teacher_eval_name(best_index),
                                     model_dir=root / "teacher" / f"ckpt-{best_index}"), eval_dir,
                            f"run `scd-pipeline evaluate --model {_quoted(root / 'teacher' / f'ckpt-{best_index}')}`"))
    rows.append(_attach(ModelRow("SFT student", "sft", "student_sft", model_dir=root / "student_sft"), eval_dir,
                        f"run `scd-pipeline evaluate --model {_quoted(root / 'student_sft')}`"
                        if (root / "student_sft").is_dir() else
                        "run `scd-pipeline sft --role student`, then `scd-pipeline evaluate "
                        f"--model {_quoted(root / 'student_sft')}`"))
    seen = {row.eval_name for row in rows}
    for name in student_names(config, root):
        eval_name = student_eval_name(name)
        if eval_name in seen:
            continue
        seen.add(eval_name)
        model_dir = root / "students" / name
        seeds = replicate_indices(config, root, name)
        if seeds:
            row = ModelRow(method_label(name), "distilled", eval_name, model_dir=None, method=name,
                           seed_names={s: replicate_eval_name(name, s) for s in seeds})
            seen.update(row.seed_names.values())
            rows.append(_attach_replicates(row, eval_dir, {s: root / "students" / replicate_student_name(name, s)
                                                           for s in seeds}, name))
            continue
        command = f"`scd-pipeline evaluate --model {_quoted(model_dir)}`"
        rows.append(_attach(ModelRow(method_label(name), "distilled", eval_name, model_dir=model_dir, method=name),
                            eval_dir, f"run {command}" if model_dir.is_dir() else
                            f"run `scd-pipeline distill --method {_quoted(name)}`, then {command}"))
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("*.json")):
            name = path.stem
            if name in seen or re.fullmatch(r"teacher-ckpt-\d+", name):
                continue
            rows.append(ModelRow(name, "other", name, result=read_eval(path)))
    return rows


def teacher_checkpoint_evals(eval_dir: Path) -> dict[int, dict]:
    """``{k: eval json}`` for every evaluated teacher checkpoint ``eval/teacher-ckpt-{k}.json``."""
    found = {}
    for path in sorted(eval_dir.glob("teacher-ckpt-*.json")) if eval_dir.is_dir() else []:
        match = re.fullmatch(r"teacher-ckpt-(\d+)", path.stem)
        if match:
            found[int(match.group(1))] = read_eval(path)
    return found


def task_kind(config: dict, root: Path, rows: Sequence[ModelRow]) -> str:
    """``choice`` or ``list``: from the evaluations, else the data manifest, else the task name."""
    for row in rows:
        if row.result is not None and row.result.get("kind") in ("choice", "list"):
            return row.result["kind"]
    manifest = root / "data" / "manifest.json"
    if manifest.is_file() and read_json(manifest).get("kind") in ("choice", "list"):
        return read_json(manifest)["kind"]
    if config["task"] == "custom":
        return config["data"]["custom"]["kind"]
    return "list" if config["task"] == "nrner" else "choice"


def metric_names(kind: str) -> tuple[str, ...]:
    return CHOICE_METRICS if kind == "choice" else LIST_METRICS


# --- the results table ---------------------------------------------------------------------------

def _number(value: Any) -> float:
    """A metric as float; None (undefined, written as null by evaluate) becomes NaN."""
    return float("nan") if value is None else float(value)


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
            record[metric] = _number(values.get(metric))
            interval = evidence.interval(row.eval_name, metric) if evidence else None
            if interval is not None:  # the bootstrap's estimate is the mean over seeds as well
                record[metric] = interval.estimate
            record[f"{metric}_low"] = interval.low if interval else math.nan
            record[f"{metric}_high"] = interval.high if interval else math.nan
            per_seed = [_number(r["metrics"].get(metric)) for r in row.seed_results.values()]
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
    deltas = differences_frame(evidence, metrics) if evidence else None
    for metric in metrics:
        for reference in REFERENCES:
            prefix = f"delta_{metric}_vs_{reference}"
            picked = (deltas[(deltas["metric"] == metric) & (deltas["reference"] == reference)].set_index("key")
                      if deltas is not None else pd.DataFrame(columns=["estimate", "low", "high", "resolved"]))
            for column, source in (("", "estimate"), ("_low", "low"), ("_high", "high"), ("_resolved", "resolved")):
                frame[prefix + column] = [picked[source].get(key) if key in picked.index else
                                          (None if source == "resolved" else math.nan)
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
    data = {tag: [_number(row.result.get("per_tag", {}).get(tag, {}).get(metric)) for row in evaluated]
            for tag in tags}
    return pd.DataFrame(data, index=[row.eval_name for row in evaluated], columns=tags)


def tag_sizes(rows: Sequence[ModelRow]) -> dict[str, int]:
    """Samples per tag, from the first evaluation that lists the tag."""
    sizes: dict[str, int] = {}
    for row in rows:
        for tag, values in (row.result or {}).get("per_tag", {}).items():
            sizes.setdefault(tag, values.get("n"))
    return sizes


# --- other artifacts -----------------------------------------------------------------------------

def read_teacher_checkpoints(root: Path) -> dict | None:
    """``teacher/checkpoints.json`` (None if absent; a one-line DataError if unusable)."""
    from scd_pipeline.checkpoints import read_checkpoints

    if not (root / "teacher" / "checkpoints.json").is_file():
        return None
    return read_checkpoints(root / "teacher")


def read_schedule(path: Path) -> list[dict]:
    """Phases of a ``students/{name}/schedule.json`` (written by ``distill.schedule_record``) as
    ``{"phase", "checkpoint", "candidates"}``.

    ``checkpoint`` is a teacher checkpoint index, or ``"average"`` (CD with ``cd_mode: average``).
    ``candidates`` holds, for SCD, one record per checkpoint as ``schedules.scd_choose`` returns it
    (``checkpoint, kl_best_to_c, kl_student_to_c, sum``) and is empty otherwise. The only place
    that knows the file's layout: adjust it here if distill's format changes.
    """
    try:
        phases = read_json(path)["phases"]
        out = [{"phase": int(phase["phase"]), "checkpoint": _checkpoint_id(phase["checkpoint"]),
                "candidates": [{**c, "checkpoint": int(c["checkpoint"])} for c in phase.get("candidates", [])]}
               for phase in phases]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a schedule.json with phases[].phase/checkpoint "
                        f"({exc.__class__.__name__}: {exc}); re-run `scd-pipeline distill`") from exc
    return out


def _checkpoint_id(value: Any) -> int | str:
    return value if value == "average" else int(value)


def checkpoint_label(checkpoint: int | str) -> str:
    """``ckpt-3``, or ``average`` for CD's logit average of all checkpoints."""
    return "average" if checkpoint == "average" else f"ckpt-{checkpoint}"


def chosen_terms(phases: Sequence[dict]) -> pd.DataFrame:
    """Per SCD phase: the chosen checkpoint and its two KL terms and their sum."""
    records = []
    for phase in phases:
        match = [c for c in phase["candidates"] if c["checkpoint"] == phase["checkpoint"]]
        if not match:
            continue
        term = match[0]
        records.append({"phase": phase["phase"], "checkpoint": phase["checkpoint"],
                        "kl_best_to_c": float(term["kl_best_to_c"]),
                        "kl_student_to_c": float(term["kl_student_to_c"]),
                        "sum": float(term["kl_best_to_c"]) + float(term["kl_student_to_c"])})
    return pd.DataFrame.from_records(
        records, columns=["phase", "checkpoint", "kl_best_to_c", "kl_student_to_c", "sum"])


def read_subdomains(root: Path) -> tuple[dict | None, pd.DataFrame | None]:
    """``subdomains.json`` and ``subdomains.parquet`` (each None when absent)."""
    summary_path, table_path = root / "subdomains.json", root / "subdomains.parquet"
    summary = read_json(summary_path) if summary_path.is_file() else None
    table = pd.read_parquet(table_path) if table_path.is_file() else None
    return summary, table


def read_ioa(root: Path) -> tuple[dict | None, dict | None]:
    """IOA's ``ioa/plan.json`` and ``ioa/synthesis.json`` (each None when absent)."""
    plan, synthesis = root / "ioa" / "plan.json", root / "ioa" / "synthesis.json"
    return (read_json(plan) if plan.is_file() else None, read_json(synthesis) if synthesis.is_file() else None)


def curriculum_passes(record: dict) -> pd.DataFrame:
    """One row per pass of a ``curriculum.json``: ``pass, stage, kind, units, rows, decision``,
    ``min_ratio`` (the gate's lowest P_S / P_T in the pass's units) and ``ratio:{unit}`` for every
    unit (P_S / P_T after the pass, NaN where P_T is 0)."""
    teacher = record.get("teacher_scores", {})
    rows = []
    for entry in record.get("passes", []):
        scores = entry.get("scores", {})
        row = {"pass": int(entry["pass"]), "stage": int(entry["stage"]), "kind": entry["kind"],
               "units": ", ".join(entry["units"]), "decision": entry.get("decision", "n/a"),
               "rows": "+".join(str(entry["rows"][k]) for k in ("train", "synthetic", "replay")),
               "min_ratio": min(entry.get("ratios", {}).values(), default=math.nan)}
        for unit, p_t in teacher.items():
            row[f"ratio:{unit}"] = scores[unit] / p_t if unit in scores and p_t > 0 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def sfs_shares(summary: dict | None, table: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per tag (and ``all``): samples and SFS share, from the per-sample table, else the summary."""
    if table is not None and {"tag", "sfs"} <= set(table.columns):
        groups = table.groupby("tag", sort=True)["sfs"]
        shares = pd.DataFrame({"samples": groups.size(), "sfs_share": groups.mean()})
        shares.loc["all"] = [len(table), table["sfs"].mean()]
    elif summary is not None and "per_tag" in summary:
        shares = pd.DataFrame({"samples": [v["samples"] for v in summary["per_tag"].values()],
                               "sfs_share": [v["sfs_share"] for v in summary["per_tag"].values()]},
                              index=list(summary["per_tag"]))
        shares.loc["all"] = [summary["samples"], summary["sfs_share"]]
    else:
        return None
    shares["samples"] = shares["samples"].astype(int)
    shares.index.name = "tag"
    return shares


# --- plots (matplotlib Figure on an Agg canvas: no global pyplot state) --------------------------

def _figure(width: float, height: float, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, axes


def plot_teacher_checkpoints(checkpoints: dict, best: int, test_metric: dict[int, float],
                             metric_label: str, path: Path) -> None:
    """Validation metric per teacher checkpoint (T* = ``best`` starred), val loss on a second axis,
    and the test metric of checkpoints that were evaluated."""
    entries = sorted(checkpoints["checkpoints"], key=lambda e: int(e["index"]))
    index = [int(e["index"]) for e in entries]
    figure, (axis,) = _figure(6.4, 3.8)
    axis.plot(index, [_number(e.get("val_metric")) for e in entries], "o-", color="tab:blue",
              label=f"val {checkpoints.get('metric', 'metric')}")
    if test_metric:
        tested = sorted(test_metric)
        axis.plot(tested, [test_metric[k] for k in tested], "s", color="tab:green", label=f"test {metric_label}")
    best_value = _number(next(e for e in entries if int(e["index"]) == best).get("val_metric"))
    axis.plot([best], [best_value], "*", markersize=18, color="tab:red", label=f"T* = ckpt-{best}")
    axis.set_xlabel("teacher checkpoint (step)")
    axis.set_xticks(index, [f"{k}\n({e.get('step', '?')})" for k, e in zip(index, entries, strict=True)])
    axis.set_ylabel(checkpoints.get("metric", "metric"))
    handles = axis.get_legend_handles_labels()[0]
    losses = [_number(e.get("val_loss")) for e in entries]
    if not all(math.isnan(v) for v in losses):
        twin = axis.twinx()
        handles += twin.plot(index, losses, "--", color="0.5", label="val loss")
        twin.set_ylabel("val loss (mean gold NLL)")
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    axis.set_title("Teacher checkpoints: validation metric, T* marked")
    figure.savefig(path, format="png")


def plot_schedule(name: str, phases: Sequence[dict], terms: pd.DataFrame, path: Path) -> None:
    """Chosen checkpoint per phase; below, the two terms KL(T*||c*) and KL(S_k||c*) of the choice."""
    figure, axes = _figure(6.4, 5.2 if len(terms) else 3.0, rows=2 if len(terms) else 1)
    numbers = [p["phase"] for p in phases]
    axes[0].plot(numbers, [p["checkpoint"] for p in phases], "o-", color="tab:purple")
    axes[0].set_xticks(numbers)
    axes[0].set_xlabel("student phase k")
    axes[0].set_ylabel("teacher checkpoint c*")
    chosen = sorted({p["checkpoint"] for p in phases if isinstance(p["checkpoint"], int)})
    if chosen:  # whole checkpoint numbers only, with room around a flat schedule
        axes[0].set_yticks(range(chosen[0], chosen[-1] + 1))
        axes[0].set_ylim(chosen[0] - 0.5, chosen[-1] + 0.5)
    axes[0].set_title(f"{method_label(name)} schedule: checkpoint distilled from in each phase")
    if len(terms):
        axes[1].bar(terms["phase"], terms["kl_best_to_c"], color="tab:orange", label="KL(T* || c*)")
        axes[1].bar(terms["phase"], terms["kl_student_to_c"], bottom=terms["kl_best_to_c"],
                    color="tab:cyan", label="KL(S_k || c*)")
        for phase, checkpoint, total in zip(terms["phase"], terms["checkpoint"], terms["sum"], strict=True):
            axes[1].annotate(f"c*={checkpoint}", (phase, total), ha="center", va="bottom", fontsize=8)
        axes[1].margins(y=0.15)  # room for the c* labels above the bars
        axes[1].set_xticks(numbers)
        axes[1].set_xlabel("student phase k")
        axes[1].set_ylabel("KL (nats / token)")
        axes[1].legend(fontsize=8)
    figure.savefig(path, format="png")


def plot_curriculum(name: str, passes: pd.DataFrame, tau_mastery: float, path: Path) -> None:
    """P_S / P_T of every module after each pass (the mastery gate's measure), stages shaded, the
    gate's threshold dashed; the gate's decision at the stage's lowest ratio: a filled circle for
    advance, a hollow one for advance after the last remedial round, an x for a remedial round."""
    figure, (axis,) = _figure(6.4, 4.0)
    numbers = passes["pass"].to_numpy()
    for position, (stage, group) in enumerate(passes.groupby("stage", sort=True)):
        axis.axvspan(group["pass"].min() - 0.5, group["pass"].max() + 0.5, color="0.93" if position % 2 else "white")
        axis.annotate(f"stage {stage}", (group["pass"].mean(), 1.0), xycoords=("data", "axes fraction"),
                      ha="center", va="bottom", fontsize=7)
    for column in [c for c in passes.columns if c.startswith("ratio:")]:
        axis.plot(numbers, passes[column], "-", linewidth=1.2, label=column.removeprefix("ratio:"))
    for decision, marker, face in (("advance", "o", "black"), ("advance_unmastered", "o", "none"),
                                   ("remedial", "x", "black")):
        chosen = (passes["decision"] == decision).to_numpy()
        if chosen.any():
            axis.plot(numbers[chosen], passes["min_ratio"][chosen], marker, color="black", markerfacecolor=face,
                      linestyle="none", label=f"gate: {decision.replace('_', ' ')}")
    axis.axhline(tau_mastery, linestyle="--", color="tab:red", label=f"τ_mastery = {tau_mastery:g}")
    axis.set_xticks(numbers)
    axis.set_xlabel("curriculum pass")
    axis.set_ylabel("P_S / P_T (validation)")
    axis.legend(fontsize=7, ncols=2)
    axis.set_title(f"{method_label(name)}: mastery per module after each pass", pad=14)
    figure.savefig(path, format="png")


def plot_subdomain_shares(shares: pd.DataFrame, path: Path) -> None:
    """Stacked horizontal bars: SFS and TFS share of each tag (and of all samples)."""
    figure, (axis,) = _figure(6.4, 1.6 + 0.4 * len(shares))
    labels = [f"{tag} (n={n})" for tag, n in zip(shares.index, shares["samples"], strict=True)]
    axis.barh(labels, shares["sfs_share"], color="tab:green", label="student-favoured (SFS)")
    axis.barh(labels, 1 - shares["sfs_share"], left=shares["sfs_share"], color="tab:red",
              label="teacher-favoured (TFS)")
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel("share of samples")
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    axis.set_title("SFS / TFS share per tag")
    figure.savefig(path, format="png")


def plot_aw_histogram(weights: pd.Series, sfs: pd.Series, best_index: int, path: Path) -> None:
    """Histogram of AW against T* per sample, SFS and TFS stacked; 0.5 marks the boundary."""
    figure, (axis,) = _figure(6.4, 3.6)
    bins = [i / 20 for i in range(21)]
    axis.hist([weights[sfs.astype(bool)], weights[~sfs.astype(bool)]], bins=bins, stacked=True,
              color=["tab:green", "tab:red"], label=["SFS", "TFS"])
    axis.axvline(0.5, color="k", linestyle="--", linewidth=1)
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"AW = L_S^SFT / (L_S^SFT + L_ckpt-{best_index})")
    axis.set_ylabel("samples")
    axis.yaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize=8)
    axis.set_title(f"Adaptive weight against T* (aw_ckpt_{best_index}), n={len(weights)}")
    figure.savefig(path, format="png")




def plot_results(points: Sequence[dict], references: Sequence[dict], metric_label: str,
                 confidence: float, path: Path) -> None:
    """Each model's main metric with its interval (horizontal bars; per-seed values as dots when
    replicated); T* and the SFT student as vertical reference lines with their interval shaded.

    ``points``: ``{"label", "interval", "seeds": [values]}``; ``references``: ``{"label",
    "interval", "color"}``.
    """
    figure, (axis,) = _figure(6.4, 1.6 + 0.45 * max(len(points), 1))
    for reference in references:
        interval = reference["interval"]
        axis.axvspan(interval.low, interval.high, color=reference["color"], alpha=0.12, linewidth=0)
        axis.axvline(interval.estimate, color=reference["color"], linestyle="--", linewidth=1.2,
                     label=f"{reference['label']} {interval.estimate:.3f}")
    labels = [point["label"] for point in points]
    for y, point in enumerate(points):
        interval = point["interval"]
        axis.errorbar([interval.estimate], [y], xerr=[[interval.estimate - interval.low],
                                                     [interval.high - interval.estimate]],
                      fmt="o", color="tab:blue", capsize=4)
        if len(point.get("seeds", [])) > 1:
            axis.plot(point["seeds"], [y] * len(point["seeds"]), "x", color="0.35", markersize=5)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_ylim(-0.7, len(labels) - 0.3)
    axis.invert_yaxis()
    axis.set_xlabel(f"test {metric_label} ({confidence:.0%} paired-bootstrap interval)")
    if references:
        figure.legend(loc="outside lower center", ncols=len(references), fontsize=8)
    # Paired differences can be resolved although two single intervals overlap: the Differences
    # table, not this picture, says which are.
    axis.set_title(f"Test {metric_label} per model (x: single seeds); paired differences in the table",
                   fontsize=9)
    figure.savefig(path, format="png")
# --- the document: blocks rendered to Markdown and HTML -------------------------------------------

@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    bold_rows: set[int] = field(default_factory=set)
    bold_cells: set[tuple[int, int]] = field(default_factory=set)  # (row, column) in bold alone


@dataclass
class Image:
    file: str  # relative to the report, e.g. plots/aw_histogram.png
    caption: str


Block = tuple[str, Any]  # ("h2" | "h3" | "p" | "list", text) or ("table", Table) or ("image", Image)


def fmt(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def fmt_interval(interval: Interval | None, signed: bool = False, mark: bool = False) -> str:
    """``0.800 [0.720, 0.870]``; signed ``+0.050 [+0.010, +0.090]*`` with ``mark`` when resolved."""
    if interval is None or math.isnan(interval.estimate):
        return "n/a"
    form = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(interval.low):
        return form.format(interval.estimate)
    text = f"{form.format(interval.estimate)} [{form.format(interval.low)}, {form.format(interval.high)}]"
    return text + (RESOLVED_MARK if mark and interval.excludes_zero else "")


def _markdown_table(table: Table) -> list[str]:
    cells = [[f"**{c}**" if c and (i in table.bold_rows or (i, j) in table.bold_cells) else c
              for j, c in enumerate(row)] for i, row in enumerate(table.rows)]
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]  # a bare | would split the cell
    widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(table.headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    return [line(table.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {title}", ""]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "list":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "table":
            lines += _markdown_table(content) + [""]
        elif kind == "image":
            lines += [f"![{content.caption}]({content.file})", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans (the only Markdown markup in our text) into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(f"<td><b>{_inline_html(c)}</b></td>" if (i, j) in table.bold_cells else
                        f"<td>{_inline_html(c)}</td>" for j, c in enumerate(row))
        body.append(f'<tr class="best">{cells}</tr>' if i in table.bold_rows else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


HTML_STYLE = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #bbb;padding:0.25em 0.6em;
text-align:right}th:first-child,td:first-child{text-align:left}tr.best td{font-weight:bold;
background:#eef6ee}img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3}"""


def render_html(title: str, blocks: Sequence[Block], base: Path) -> str:
    """A self-contained page: images read from ``base / file`` and embedded as base64."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(content)}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in content) + "</ul>")
        elif kind == "table":
            parts.append(_html_table(content))
        elif kind == "image":
            data = base64.b64encode((base / content.file).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(content.caption)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>'
                         f"{html.escape(content.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")




# --- sections ------------------------------------------------------------------------------------

def results_table(inputs: ReportInputs) -> Table:
    """Each model's metrics with their intervals (mean over seeds when replicated); best in bold."""
    frame, metrics = inputs.frame, inputs.metrics
    replicated = any(row.seed_names for row in inputs.rows)
    headers = ["Model", "Eval", *[METRIC_LABELS[m] for m in metrics]]
    if replicated:
        headers.append(f"Seeds: {METRIC_LABELS[inputs.primary]} sd (min–max)")
    rows, bold = [], set()
    for i, (record, row) in enumerate(zip(frame.to_dict("records"), inputs.rows, strict=True)):
        label = record["model"] + (" (best)" if record["best"] else "")
        if record["status"] != "ok":
            rows.append([label, row.eval_label, *["not run"] * len(metrics), *[""] * replicated])
            continue
        cells = [_metric_cell(record, m) for m in metrics]
        if replicated:
            p = inputs.primary
            cells.append(f"{record['seeds']}: {fmt(record[f'{p}_sd'])} ({record[f'{p}_min']:.3f}–"
                         f"{record[f'{p}_max']:.3f})" if row.seed_names else "1 (shared)")
        rows.append([label, row.eval_label, *cells])
        if record["best"]:
            bold.add(i)
    return Table(headers, rows, bold)


def _metric_cell(record: dict, metric: str) -> str:
    value, low, high = record[metric], record[f"{metric}_low"], record[f"{metric}_high"]
    return fmt_interval(Interval(value, low, high)) if not math.isnan(value) else "n/a"


def differences_tables(inputs: ReportInputs) -> list[Block]:
    """Per metric: each model minus T*, minus the SFT student, minus TD (resolved ones marked)."""
    deltas = inputs.differences
    if deltas.empty:
        return [("p", "No differences: fewer than two models have per-row predictions.")]
    labels = {row.eval_name: row.label for row in inputs.rows}
    references = [r for r in REFERENCES if (deltas["reference"] == r).any()]
    blocks: list[Block] = []
    for metric in inputs.metrics:
        part = deltas[deltas["metric"] == metric]
        keys = list(dict.fromkeys(part["key"]))
        cells = {(r["key"], r["reference"]): Interval(r["estimate"], r["low"], r["high"])
                 for r in part.to_dict("records")}
        blocks += [("h3", METRIC_LABELS[metric]), ("table", Table(
            ["Model", *[f"Δ vs {REFERENCE_LABELS[r]}" for r in references]],
            [[labels.get(key, key), *[fmt_interval(cells.get((key, r)), signed=True, mark=True) if (key, r) in cells
                                      else "—" for r in references]] for key in keys]))]
    return blocks


def conclusion_sentence(inputs: ReportInputs) -> str:
    """One sentence: which differences in the primary metric the table can call, and which not."""
    deltas = inputs.differences
    evidence = inputs.evidence
    if evidence is None or deltas.empty:
        return "The table cannot conclude anything about differences: no per-row predictions to bootstrap."
    labels = {row.eval_name: row.label for row in inputs.rows}
    metric = METRIC_LABELS[inputs.primary]
    part = deltas[deltas["metric"] == inputs.primary]
    seeds = max((len(r.seed_results) for r in inputs.rows if r.seed_names), default=1)
    scope = (f"At n = {evidence.n} test rows and {seeds} seed{'s' if seeds > 1 else ''} per distilled "
             f"method, ")
    level = f"{evidence.bootstrap.confidence:.0%}"
    resolved = part[part["resolved"].astype(bool)]
    if resolved.empty:
        return (scope + f"none of the {len(part)} {metric} differences is resolved (every {level} "
                "interval includes 0): the table cannot say that any model is better or worse than "
                "another, only that each difference lies within its interval.")
    called = [f"{labels.get(r['key'], r['key'])} {'above' if r['estimate'] > 0 else 'below'} "
              f"{REFERENCE_LABELS[r['reference']]} ({r['estimate']:+.3f})" for r in resolved.to_dict("records")]
    return (scope + f"the table can conclude only the {len(resolved)} of {len(part)} {metric} differences "
            f"whose {level} interval excludes 0 (marked {RESOLVED_MARK}): {', '.join(called)}; it cannot "
            "rank the other pairs, whose differences are within the sampling noise of this test set.")


def resolution_text(found: Resolution | None) -> str:
    if found is None:
        return "Not computed: fewer than two students have per-row predictions."
    metric = METRIC_LABELS[found.metric]
    per_row = f"per-row {metric}" + (" (mean over seeds)" if found.seeds > 1 else "")
    text = (f"Two students' {per_row} differ with variance {found.row_variance:.4f} (median over "
            f"{found.pairs} student pairs; for accuracy from one seed: the share of rows where exactly one "
            f"of the two is right, minus the squared difference). A difference of {found.target:.2f} in {metric} is "
            f"resolved (its {found.confidence:.0%} interval excludes 0) with probability {found.power:.0%} "
            f"from n ≥ {found.required_rows} test rows; this test set has n = {found.n}.")
    if found.seed_variance is None:
        return text + (" The variance over seeds is unknown with one seed per method (set `replicates` "
                       "≥ 2 to measure it).")
    text += (f" Over {found.seeds} seeds a method's {metric} varies with variance {found.seed_variance:.5f} "
             "(median over the replicated students); ")
    if found.required_seeds is None:
        return text + (f"at n = {found.n} no number of seeds resolves {found.target:.2f}: the test-row "
                       "noise alone is too large, only more test rows help.")
    return text + f"at n = {found.n}, {found.required_seeds} seeds per method would resolve {found.target:.2f}."


def per_tag_table(inputs: ReportInputs) -> Table:
    """Per-tag metric of every evaluated model, with intervals when predictions exist."""
    tags = per_tag_frame(inputs.rows, inputs.tag_metric)
    sizes = tag_sizes(inputs.rows)
    intervals = inputs.tag_evidence[0] if inputs.tag_evidence else {}
    labels = {row.eval_name: row.label for row in inputs.rows}
    headers = ["Model", *[f"{tag} (n={sizes.get(tag, '?')})" for tag in tags.columns]]
    rows = []
    for key, values in zip(tags.index, tags.to_numpy().tolist(), strict=True):
        rows.append([labels.get(key, key), *[fmt_interval(intervals[tag][key]) if key in intervals.get(tag, {})
                                             else fmt(value) for tag, value in zip(tags.columns, values, strict=True)]])
    return Table(headers, rows)


def outcome_table(inputs: ReportInputs, partition: str, tag: str = "all") -> Table:
    """The SFS/TFS outcome of every model on one partition (and tag) of the test rows."""
    part = inputs.outcomes
    part = part[(part["partition"] == partition) & (part["tag"] == tag) & (part["quantity"] == "score")]
    labels = {row.eval_name: (row.label, row.role) for row in inputs.rows}
    score = METRIC_LABELS[score_metric(inputs.kind)]
    headers = ["Model", f"{score} on SFS", f"{score} on TFS", "Δ vs T*", "= SFS part (advantage)",
               "+ TFS part (deficit)"]
    rows = []
    for key, group in part.groupby("key", sort=False):
        cells = {r["part"]: Interval(r["estimate"], r["low"], r["high"]) for r in group.to_dict("records")}
        label, role = labels.get(key, (key, "other"))
        signed = [fmt_interval(cells[p], signed=True, mark=True) if role != "teacher" else "—"
                  for p in ("gap", "advantage_sfs", "deficit_tfs")]
        rows.append([label, fmt_interval(cells["score_sfs"]), fmt_interval(cells["score_tfs"]), *signed])
    return Table(headers, rows)


def outcome_tag_table(inputs: ReportInputs, partition: str) -> Table:
    part = inputs.outcomes
    part = part[(part["partition"] == partition) & (part["tag"] != "all") & (part["quantity"] == "score")]
    labels = {row.eval_name: (row.label, row.role) for row in inputs.rows}
    rows = []
    for (tag, key), group in part.groupby(["tag", "key"], sort=False):
        label, role = labels.get(key, (key, "other"))
        if role == "teacher":
            continue
        cells = {r["part"]: Interval(r["estimate"], r["low"], r["high"]) for r in group.to_dict("records")}
        first = group.iloc[0]
        rows.append([f"{tag} ({first['sfs_rows']} / {first['tfs_rows']})", label,
                     *[fmt_interval(cells[p], signed=True, mark=True) for p in ("gap", "advantage_sfs", "deficit_tfs")]])
    return Table(["Tag (SFS / TFS rows)", "Model", "Δ vs T*", "= SFS part", "+ TFS part"], rows)


def checkpoint_table(checkpoints: dict, best: int, test_metric: dict[int, Interval],
                     metric_label: str) -> Table:
    metric = checkpoints.get("metric", "metric")
    headers = ["Checkpoint", "Step", "Epoch", "Train loss", "Val loss", f"Val {metric}", f"Test {metric_label}"]
    rows, bold = [], set()
    for i, entry in enumerate(sorted(checkpoints["checkpoints"], key=lambda e: int(e["index"]))):
        index = int(entry["index"])
        if index == best:
            bold.add(i)
        rows.append([f"ckpt-{index}" + (" (T*)" if index == best else ""), fmt(entry.get("step")), fmt(_number(entry.get("epoch"))),
                     fmt(_number(entry.get("train_loss"))), fmt(_number(entry.get("val_loss"))),
                     fmt(_number(entry.get("val_metric"))),
                     fmt_interval(test_metric[index]) if index in test_metric else "—"])
    return Table(headers, rows, bold)


def schedule_table(phases: Sequence[dict], terms: pd.DataFrame) -> Table:
    by_phase = {int(r["phase"]): r for r in terms.to_dict("records")}
    rows = []
    for phase in phases:
        term = by_phase.get(phase["phase"])
        values = [fmt(term["kl_best_to_c"]), fmt(term["kl_student_to_c"]), fmt(term["sum"])] if term else ["—"] * 3
        rows.append([str(phase["phase"]), f"ckpt-{phase['checkpoint']}", *values])
    return Table(["Phase", "Checkpoint c*", "KL(T* ‖ c*)", "KL(S_k ‖ c*)", "Sum"], rows)


def _decomposition_line(name: str, part: dict) -> str:
    return (f"{name}: student {fmt(part['student'])}, teacher {fmt(part['teacher'])}, gap S - T* "
            f"{fmt(part['gap'], True)} = SFS {fmt(part['advantage_sfs'], True)} + TFS "
            f"{fmt(part['deficit_tfs'], True)}")


# --- the stage -----------------------------------------------------------------------------------

@dataclass
class ReportInputs:
    """Everything the report shows, read from ``results/{task}/`` (None / empty where absent)."""

    config: dict
    root: Path
    rows: list[ModelRow]
    kind: str
    metrics: tuple[str, ...]
    primary: str
    frame: pd.DataFrame
    checkpoints: dict | None
    best_index: int | None
    teacher_tests: dict[int, Interval]  # test primary metric of evaluated teacher checkpoints
    schedules: dict[str, tuple[list[dict], pd.DataFrame]]  # student -> (phases, chosen_terms)
    subdomain_summary: dict | None
    subdomain_table: pd.DataFrame | None
    shares: pd.DataFrame | None
    evidence: TaskEvidence | None = None
    curricula: dict[str, dict] = field(default_factory=dict)  # student -> curriculum.json (first seed)
    ioa_plan: dict | None = None
    synthesis: dict | None = None
    differences: pd.DataFrame = field(default_factory=pd.DataFrame)
    outcomes: pd.DataFrame = field(default_factory=pd.DataFrame)
    tag_evidence: tuple[dict, dict] | None = None
    resolution: Resolution | None = None

    @property
    def tag_metric(self) -> str:
        return "accuracy" if self.kind == "choice" else self.primary


def is_scd_method(name: str) -> bool:
    return name.partition("+")[0] in ("scd", "scd_aw")


def schedule_plot_name(name: str) -> str:
    return f"schedule_{default_eval_name(name)}.png"


def curriculum_plot_name(name: str) -> str:
    return f"curriculum_{default_eval_name(name)}.png"


def evaluated_models(config: dict, rows: Sequence[ModelRow], checkpoint_evals: dict[int, dict]) -> list[EvaluatedModel]:
    """The rows with results (and the other evaluated teacher checkpoints) as evidence inputs."""
    weights = kappa_weights(config["task"])
    models = [EvaluatedModel(row.eval_name, row.label, row.role, row.eval_names,
                             list(row.result.get("categories") or []), row.result.get("kappa_weights") or weights,
                             row.method) for row in rows if row.result]
    keys = {model.key for model in models}
    for index, result in sorted(checkpoint_evals.items()):
        name = f"teacher-ckpt-{index}"
        if name not in keys:
            models.append(EvaluatedModel(name, f"ckpt-{index}", "checkpoint", [name],
                                         list(result.get("categories") or []), result.get("kappa_weights") or weights))
    return models


def gather_inputs(config: dict, details: bool = True) -> ReportInputs:
    """Read every artifact the report uses; absent ones stay None (malformed ones raise DataError).

    ``details=False`` skips what only the one-task page shows (per-tag intervals, SFS/TFS outcome).
    """
    root = task_dir(config)
    checkpoints = read_teacher_checkpoints(root)
    best_index = int(checkpoints["best_index"]) if checkpoints is not None else None
    rows = model_rows(config, root, best_index)
    kind = task_kind(config, root, rows)
    metrics = metric_names(kind)
    # The main metric is the one T* was chosen by (checkpoints.json), else the config's.
    chosen_by = (checkpoints or {}).get("metric")
    primary = chosen_by if chosen_by in metrics else primary_metric(kind, config.get("sft", {}).get("val_metric", "auto"))
    checkpoint_evals = teacher_checkpoint_evals(root / "eval")
    settings = config["report"]
    evidence = gather_evidence(root / "eval", evaluated_models(config, rows, checkpoint_evals), kind, metrics,
                               config["task"], config["seed"], settings["resamples"], settings["confidence"],
                               reference=rows[0].eval_name or None)
    teacher_tests = {k: Interval(_number(r["metrics"].get(primary)), math.nan, math.nan)
                     for k, r in checkpoint_evals.items()}
    if evidence is not None:
        teacher_tests.update({k: evidence.interval(f"teacher-ckpt-{k}", primary) for k in checkpoint_evals
                              if evidence.interval(f"teacher-ckpt-{k}", primary) is not None})
    schedules, curricula = {}, {}
    for name in student_names(config, root):
        for folder in ([root / "students" / replicate_student_name(name, s) for s in replicate_indices(config, root, name)][:1]
                       or [root / "students" / name]):
            path = folder / "schedule.json"  # a replicated method: its first seed's schedule
            if path.is_file():
                phases = read_schedule(path)
                schedules[name] = (phases, chosen_terms(phases))
            if (folder / CURRICULUM_FILE).is_file():
                curricula[name] = read_json(folder / CURRICULUM_FILE)
    subdomain_summary, subdomain_table = read_subdomains(root)
    ioa_plan, synthesis = read_ioa(root)
    inputs = ReportInputs(
        config=config, root=root, rows=rows, kind=kind, metrics=metrics, primary=primary,
        frame=results_frame(rows, metrics, primary, evidence), checkpoints=checkpoints, best_index=best_index,
        teacher_tests=teacher_tests, schedules=schedules, subdomain_summary=subdomain_summary,
        subdomain_table=subdomain_table, shares=sfs_shares(subdomain_summary, subdomain_table), evidence=evidence,
        curricula=curricula, ioa_plan=ioa_plan, synthesis=synthesis)
    if evidence is not None:
        inputs.differences = differences_frame(evidence, metrics)
        if details:
            inputs.tag_evidence = tag_intervals(evidence, inputs.tag_metric, config["seed"])
            inputs.outcomes = outcome_frame(evidence, config["seed"])
            power_metric = primary if primary in ("accuracy", "exact_f1") else score_metric(kind)
            inputs.resolution = resolution(evidence, power_metric, settings["target_difference"], settings["power"])
    return inputs


def results_plot_data(inputs: ReportInputs) -> tuple[list[dict], list[dict]]:
    """Points (distilled and other rows) and reference lines (T*, SFT student) of the results plot."""
    evidence, metric = inputs.evidence, inputs.primary
    points, references = [], []
    if evidence is None:
        return points, references
    colors = {"teacher": "tab:red", "sft": "tab:green"}
    for row in inputs.rows:
        found = evidence.metrics.get(row.eval_name, {}).get(metric)
        if found is None:
            continue
        if row.role in colors:
            references.append({"label": row.label, "interval": found.interval, "color": colors[row.role]})
        else:
            points.append({"label": row.label, "interval": found.interval, "seeds": list(found.per_seed)})
    return points, references


def plan_plots(inputs: ReportInputs) -> tuple[list[tuple[str, Callable[[Path], None]]], list[str]]:
    """``(file name, draw(path))`` for each plot whose inputs exist, and why each other one is missing."""
    jobs: list[tuple[str, Callable[[Path], None]]] = []
    missing: list[str] = []
    points, references = results_plot_data(inputs)
    if points:
        jobs.append((RESULTS_PLOT, lambda p: plot_results(points, references, METRIC_LABELS[inputs.primary],
                                                          inputs.evidence.bootstrap.confidence, p)))
    else:
        missing.append(f"plots/{RESULTS_PLOT}: no distilled student with per-row predictions "
                       "(eval/*.predictions.parquet; run `scd-pipeline evaluate` on one)")
    if inputs.checkpoints is not None:
        jobs.append((TEACHER_PLOT, lambda p: plot_teacher_checkpoints(
            inputs.checkpoints, inputs.best_index, {k: v.estimate for k, v in inputs.teacher_tests.items()},
            METRIC_LABELS[inputs.primary], p)))
    else:
        missing.append(f"plots/{TEACHER_PLOT}: teacher/checkpoints.json not found "
                       "(run `scd-pipeline sft --role teacher`)")
    for name in student_names(inputs.config, inputs.root):
        schedule = inputs.schedules.get(name)
        if not is_scd_method(name) and (schedule is None or not len(schedule[1])):
            continue  # TD/CD/TAID schedules are shown in the table only
        plot_name = schedule_plot_name(name)
        if schedule is None:
            missing.append(f"plots/{plot_name}: students/{name}/schedule.json not found "
                           f"(run `scd-pipeline distill --method {_quoted(name)}`)")
            continue
        jobs.append((plot_name, lambda p, n=name, s=schedule: plot_schedule(n, s[0], s[1], p)))
        if not len(schedule[1]):
            missing.append(f"plots/{plot_name}: students/{name}/schedule.json records no KL terms; "
                           "the plot shows the chosen checkpoints only")
    for name, record in inputs.curricula.items():
        passes = curriculum_passes(record)
        if len(passes):
            tau = float(record.get("thresholds", {}).get("tau_mastery", math.nan))
            jobs.append((curriculum_plot_name(name), lambda p, n=name, f=passes, t=tau: plot_curriculum(n, f, t, p)))
    if inputs.shares is not None:
        jobs.append((SHARES_PLOT, lambda p: plot_subdomain_shares(inputs.shares, p)))
    else:
        missing.append(f"plots/{SHARES_PLOT}: subdomains.json / subdomains.parquet not found "
                       "(run `scd-pipeline estimate-subdomains`)")
    table = inputs.subdomain_table
    aw_best = (inputs.subdomain_summary or {}).get("best_index", inputs.best_index)
    aw_column = f"aw_ckpt_{aw_best}"
    if table is not None and aw_column in table.columns and "sfs" in table.columns:
        jobs.append((AW_PLOT, lambda p: plot_aw_histogram(table[aw_column], table["sfs"], aw_best, p)))
    elif table is None:
        missing.append(f"plots/{AW_PLOT}: subdomains.parquet not found (run `scd-pipeline estimate-subdomains`)")
    else:
        missing.append(f"plots/{AW_PLOT}: subdomains.parquet has no column {aw_column} or sfs "
                       "(re-run `scd-pipeline estimate-subdomains`)")
    return jobs, missing


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
        from scd_pipeline.evidence import OUTCOME_COLUMNS

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


def report_blocks(inputs: ReportInputs, drawn: set[str], missing_plots: Sequence[str]) -> list[Block]:
    """The report's content, in order, as blocks both renderers understand."""
    rows = inputs.rows
    blocks: list[Block] = [("p", _header_text(inputs))]
    blocks += results_blocks(inputs, drawn)
    blocks += outcome_blocks(inputs)
    blocks += teacher_blocks(inputs, drawn)
    blocks += schedule_blocks(inputs, drawn)
    blocks += curriculum_blocks(inputs, drawn)
    blocks += subdomain_blocks(inputs, drawn)
    missing = [f"{row.label} ({row.eval_label}): not run; {row.missing}" for row in rows if row.missing]
    missing += [f"{row.label}: {line}" for row in rows for line in (row.seeds_missing if row.result else [])]
    skipped = (inputs.evidence.skipped if inputs.evidence else {})
    labels = {row.eval_name: row.label for row in rows}
    missing += [f"{labels.get(key, key)}: no intervals: {why}" for key, why in skipped.items()]
    items = missing + list(missing_plots) + [f"warning: {w}" for w in comparability_warnings(inputs.root, rows)]
    blocks += [("h2", "What is missing"),
               ("list", items) if items else ("p", "Nothing: every row and plot is present.")]
    return blocks


def _evaluated_splits(rows: Sequence[ModelRow]) -> tuple[list[str], list[int]]:
    evaluated = [result for row in rows for result in ([*row.seed_results.values()] or ([row.result] if row.result else []))]
    return (sorted({str(r.get("split")) for r in evaluated}),
            sorted({int(r["n"]) for r in evaluated if r.get("n") is not None}))


def comparability_warnings(root: Path, rows: Sequence[ModelRow]) -> list[str]:
    """Rows evaluated on different splits / sample counts, and evaluations older than their model."""
    warnings = []
    splits, sizes = _evaluated_splits(rows)
    if len(splits) > 1 or len(sizes) > 1:
        warnings.append(f"the rows were evaluated on different splits ({', '.join(splits)}) or sample "
                        f"counts ({', '.join(map(str, sizes))}); their metrics are not directly comparable")
    for row in rows:
        if row.result is None or row.model_dir is None or not row.model_dir.is_dir():
            continue
        weights = [p for p in row.model_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
        eval_file = root / "eval" / f"{row.eval_name}.json"
        if weights and max(p.stat().st_mtime for p in weights) > eval_file.stat().st_mtime:
            warnings.append(f"eval/{row.eval_name}.json is older than the weights in {row.model_dir} "
                            f"(stale: re-run `scd-pipeline evaluate --model {_quoted(row.model_dir)}`)")
    return warnings


def _header_text(inputs: ReportInputs) -> str:
    splits, sizes = _evaluated_splits(inputs.rows)
    settings = inputs.config["report"]
    return (f"Results under `{inputs.root}` ({inputs.kind} task), generated "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Evaluation split: "
            f"{', '.join(splits) or 'none'}; samples: {', '.join(map(str, sizes)) or 'none'}. Every "
            f"figure is `estimate [low, high]`, a {settings['confidence']:.0%} paired-bootstrap interval "
            f"over the test rows ({settings['resamples']} resamples, seed {inputs.config['seed']})"
            + (f"; replicated students show the mean over {inputs.config['replicates']} seeds, and their "
               "intervals resample the seeds too" if inputs.config.get("replicates", 1) > 1 else "") + ".")


def results_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    label = METRIC_LABELS[inputs.tag_metric]
    blocks: list[Block] = [("h2", "Results"), ("table", results_table(inputs)),
                           ("p", conclusion_sentence(inputs))]
    if RESULTS_PLOT in drawn:
        blocks.append(("image", Image(f"plots/{RESULTS_PLOT}", f"{METRIC_LABELS[inputs.primary]} with "
                                      "intervals; T* and the SFT student as reference lines")))
    blocks += [("p", "Teacher row: `eval/teacher-ckpt-{k}.json` with k = T*, the checkpoint with the "
                     "best validation metric in `teacher/checkpoints.json`. Best student (bold, column "
                     f"`best` in summary.csv): highest {METRIC_LABELS[inputs.primary]} among the SFT and "
                     "distilled students, ties broken by the other metrics. NLL, sample counts, interval "
                     "bounds and the spread over seeds are in `summary.csv`."),
               ("h2", "Differences"),
               ("p", "Row minus reference on the same resampled test rows (paired), for every metric: "
                     f"T* (the teacher), the SFT student and TD. {RESOLVED_MARK} = resolved: the interval "
                     "excludes 0. Bounds in `summary.csv` (`delta_{metric}_vs_{reference}`)."),
               *differences_tables(inputs),
               ("h2", "Resolution"), ("p", resolution_text(inputs.resolution)),
               ("h2", f"Per-tag {label}")]
    blocks.append(("table", per_tag_table(inputs)) if len(per_tag_frame(inputs.rows, inputs.tag_metric).columns)
                  else ("p", "No per-tag results (no evaluation has run)."))
    return blocks


def outcome_blocks(inputs: ReportInputs) -> list[Block]:
    blocks: list[Block] = [("h2", "SFS / TFS outcome on the test split")]
    if inputs.outcomes.empty:
        return blocks + [("p", "Not available: the outcome needs the per-row predictions of T* and the "
                               "SFT student (eval/teacher-ckpt-{k}.predictions.parquet, "
                               "eval/student_sft.predictions.parquet).")]
    score = METRIC_LABELS[score_metric(inputs.kind)]
    blocks.append(("p", f"Test rows split by the SFT student against T* (SPEC 4.2). Per model: its {score} "
                        "on student-favoured (SFS) and teacher-favoured (TFS) rows, and its difference to "
                        "T*, Δ = R(model) − R(T*) = SFS part + TFS part (each the mean over all rows of the "
                        "per-row difference restricted to one side). The paper's claim: SCD shrinks the TFS "
                        "deficit (a TFS part nearer 0 than TD's), AW keeps the SFS advantage. Every part "
                        "per tag and the same split for the NLL are in `sfs_tfs.csv`."))
    for partition, rule in PARTITIONS.items():
        part = inputs.outcomes[(inputs.outcomes["partition"] == partition) & (inputs.outcomes["tag"] == "all")]
        if part.empty:
            continue
        first = part.iloc[0]
        blocks += [("h3", f"By {rule}"),
                   ("p", f"SFS: {first['sfs_rows']} rows, TFS: {first['tfs_rows']} rows "
                         f"(of {first['sfs_rows'] + first['tfs_rows']})."),
                   ("table", outcome_table(inputs, partition))]
    primary_partition = "nll" if (inputs.outcomes["partition"] == "nll").any() else "correct"
    blocks += [("h3", f"Per tag, by {PARTITIONS[primary_partition]}"),
               ("table", outcome_tag_table(inputs, primary_partition))]
    return blocks


def teacher_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    blocks: list[Block] = [("h2", "Teacher checkpoints")]
    if inputs.checkpoints is None:
        return blocks + [("p", "Not available: teacher/checkpoints.json not found.")]
    blocks.append(("table", checkpoint_table(inputs.checkpoints, inputs.best_index, inputs.teacher_tests,
                                             METRIC_LABELS[inputs.primary])))
    untested = checkpoint_indices(inputs.checkpoints) != sorted(inputs.teacher_tests)
    if untested:
        blocks.append(("p", "T* is chosen on the validation split; the workflow evaluates only T* on the test split. "
                            f"`scd-pipeline evaluate --model {inputs.root}/teacher/ckpt-K` adds checkpoint K's test column."))
    if TEACHER_PLOT in drawn:
        blocks.append(("image", Image(f"plots/{TEACHER_PLOT}", "Teacher validation metric per checkpoint")))
    return blocks


def schedule_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    blocks: list[Block] = [("h2", "Distillation schedules")]
    if not inputs.schedules:
        return blocks + [("p", "No students/*/schedule.json found.")]
    n_phases = max(len(phases) for phases, _ in inputs.schedules.values())
    blocks.append(("table", Table(
        ["Student", *[f"Phase {k}" for k in range(1, n_phases + 1)]],
        [[method_label(name), *[checkpoint_label(p["checkpoint"]) for p in phases], *[""] * (n_phases - len(phases))]
         for name, (phases, _) in inputs.schedules.items()])))
    for name, (phases, terms) in inputs.schedules.items():
        if not len(terms):
            continue
        blocks += [("h3", f"{method_label(name)}: c* = argmin_c KL(T* ‖ c) + KL(S_k ‖ c)"),
                   ("table", schedule_table(phases, terms))]
        if schedule_plot_name(name) in drawn:
            blocks.append(("image", Image(f"plots/{schedule_plot_name(name)}", f"{method_label(name)} schedule")))
    return blocks


def curriculum_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    """IOA: the plan (modules, gaps, stages), each curriculum student's passes and gates, and the
    synthetic data's yield with three kept items. Nothing when no curriculum ran."""
    plan, synthesis = inputs.ioa_plan, inputs.synthesis
    if plan is None and not inputs.curricula:
        return []
    blocks: list[Block] = [("h2", "IOA curriculum")]
    if plan is not None:
        basis = "the task's tags" if plan["basis"] == "tag" else "T* NLL strata " + ", ".join(
            f"{edge:.3f}" for edge in plan.get("strata_edges") or [])
        thresholds = plan["thresholds"]
        blocks += [("p", f"Knowledge modules: {basis}. Identifier (validation split, {plan['val_rows']} rows): "
                         f"gap Δ = (P_T − P_S) / P_T of T* against the SFT student; deficient when Δ > "
                         f"τ_gap = {thresholds['tau_gap']:g}; severity = {thresholds['gap_weight']:g}·Δ + "
                         f"{1 - thresholds['gap_weight']:g}·dependency. {plan['dependency']}."),
                   ("table", Table(["Module", "Val rows", "P_T", "P_S (SFT)", "Δ", "Severity", "Deficient"],
                                   [[m["module"], str(m["val_rows"]), fmt(m["teacher"]), fmt(m["student"]),
                                     fmt(m["gap"], True), fmt(m["severity"]), "yes" if m["deficient"] else "no"]
                                    for m in plan["modules"]])),
                   ("p", "Stages (easiest first, ZPD τ_zpd = " + f"{thresholds['tau_zpd']:g}): " + " → ".join(
                       f"{stage['stage']}: {', '.join(u['unit'] for u in stage['units'])}" for stage in plan["stages"])
                    + ". " + ("Every step stays within the ZPD." if all(z["within_zpd"] for z in plan["zpd"])
                              else "Steps beyond the ZPD (no split possible): " + ", ".join(
                                  f"{z['from_stage']}→{z['to_stage']}" for z in plan["zpd"] if not z["within_zpd"])
                              + "."))]
    for name, record in inputs.curricula.items():
        passes = curriculum_passes(record)
        tau = record.get("thresholds", {}).get("tau_mastery")
        blocks += [("h3", f"{method_label(name)}: passes and mastery gates (τ_mastery = {tau})"),
                   ("table", Table(["Pass", "Stage", "Kind", "Units", "Rows (train+synthetic+replay)",
                                    "Lowest P_S/P_T", "Decision"],
                                   [[str(r["pass"]), str(r["stage"]), r["kind"], r["units"], r["rows"],
                                     fmt(r["min_ratio"]), r["decision"]] for r in passes.to_dict("records")]))]
        if curriculum_plot_name(name) in drawn:
            blocks.append(("image", Image(f"plots/{curriculum_plot_name(name)}", f"{method_label(name)} curriculum")))
    if synthesis is not None:
        reasons = [r for r in synthesis["rejected"]]
        blocks += [("h3", "Synthetic data (Adapter)"),
                   ("p", f"T* wrote {synthesis['generated']} items from {synthesis['prompts']} few-shot prompts for "
                         f"the deficient modules ({', '.join(synthesis['deficient']) or 'none'}); "
                         f"{synthesis['kept']} kept. Checks: {synthesis['checks']}.")]
        if synthesis["yield"]:
            blocks.append(("table", Table(["Module", "Register", "Generated", "Kept", *reasons],
                                          [[y["module"], y["register"], str(y["generated"]), str(y["kept"]),
                                            *[str(y[r]) for r in reasons]] for y in synthesis["yield"]])))
        examples = synthesis.get("examples") or []
        if examples:
            blocks.append(("list", [f"{e['register']} ({e['module']}, T* confidence "
                                    f"{fmt(e['teacher_confidence'])}): {' '.join(e['question'].split())} → "
                                    f"{e['answer']}" for e in examples]))
    return blocks


def subdomain_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    blocks: list[Block] = [("h2", "Student- and teacher-favoured subdomains (training split)")]
    summary, shares = inputs.subdomain_summary, inputs.shares
    if summary is None and shares is None:
        return blocks + [("p", "Not available: subdomains.json / subdomains.parquet not found.")]
    if summary is not None:
        blocks.append(("list", [
            f"SFS share {fmt(summary['sfs_share'])} of {summary['samples']} samples "
            f"({summary.get('split', '?')} split); rule: {summary.get('rule', 'n/a')}",
            _decomposition_line("Loss (gold NLL)", summary["loss"]),
            _decomposition_line("Error (1 - score)", summary["metric"])]))
    if shares is not None:
        blocks.append(("table", Table(["Tag", "Samples", "SFS share", "TFS share"],
                                      [[str(tag), str(n), fmt(s), fmt(1 - s)] for tag, n, s in
                                       zip(shares.index, shares["samples"], shares["sfs_share"], strict=True)])))
    for file_name, caption in ((SHARES_PLOT, "SFS / TFS share per tag"), (AW_PLOT, "Adaptive weight against T*")):
        if file_name in drawn:
            blocks.append(("image", Image(f"plots/{file_name}", caption)))
    return blocks


# --- the paper's Table 1 across tasks -------------------------------------------------------------

PAPER_ORDER = ("td", "taid", "cd", "scd", "scd_aw")  # distilled rows in the paper's Table 1 order


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


def _table1_key(row: ModelRow) -> str | None:
    """The Table 1 row a report row belongs to: teacher, sft or the distilled method string."""
    if row.role in ("teacher", "sft"):
        return row.role
    return row.method if row.role == "distilled" else None


def multitask_frame(per_task: dict[str, ReportInputs]) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per Table 1 row (teacher, SFT student, TD, TAID, CD, SCD, SCD+AW, then any other
    distilled method): each task's main metric with its interval, the average over tasks (its
    interval from the averaged bootstrap draws of the tasks) and the best student per column."""
    found: dict[str, dict[str, tuple[ModelRow, ReportInputs]]] = {}
    for task, inputs in per_task.items():
        for row in inputs.rows:
            key = _table1_key(row)
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
                     _number(row.result["metrics"].get(metrics[task])) if row is not None and row.result else math.nan)
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
            for row in inputs.rows if row.missing and _table1_key(row) is not None]
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
