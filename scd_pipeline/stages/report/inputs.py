"""What the report reads: which evaluations are which row, and the other artifacts of a run
(checkpoints, schedules, subdomains, the IOA plan and curriculum), gathered into ``ReportInputs``."""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scd_pipeline.engine.config import task_dir
from scd_pipeline.engine.io import read_json
from scd_pipeline.engine.methods import method_label
from scd_pipeline.engine.naming import (
    HELDOUT_SPLIT,
    default_eval_name,
    eval_subdir,
    replicate_eval_name,
    replicate_student_name,
    sft_student_dir,
    sft_student_eval_name,
)
from scd_pipeline.errors import DataError
from scd_pipeline.math.metrics import CHOICE_METRICS, LIST_METRICS, kappa_weights, primary_metric
from scd_pipeline.math.stats import Interval
from scd_pipeline.stages.report.evidence import (
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
from scd_pipeline.stages.report.render import as_float
from scd_pipeline.stages.report.tables import ModelRow, results_frame

METRIC_LABELS = {"accuracy": "Accuracy", "kappa": "Kappa", "macro_f1": "Macro-F1",
                 "exact_f1": "Exact F1", "partial_f1": "Partial F1", "loss": "NLL"}
RESULTS_PLOT = "results.png"
TEACHER_PLOT = "teacher_checkpoints.png"
SHARES_PLOT = "subdomain_shares.png"
AW_PLOT = "aw_histogram.png"
CURRICULUM_FILE = "curriculum.json"  # written by distill for curriculum methods (ioa, X+ioa)


# --- which models, which files -------------------------------------------------------------------

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


def quoted(value: str | Path) -> str:
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


def _attach_replicates(row: ModelRow, eval_dir: Path, model_dirs: dict[int, Path],
                       train_command: Callable[[int], str]) -> ModelRow:
    """Fill a replicated row from its seeds' evaluations; absent seeds go to ``seeds_missing``
    with the commands that make them (``train_command(seed)`` when the model is not there)."""
    for seed, eval_name in row.seed_names.items():
        path = eval_dir / f"{eval_name}.json"
        if path.is_file():
            row.seed_results[seed] = read_eval(path)
            continue
        model_dir = model_dirs[seed]
        command = f"`scd-pipeline evaluate --model {quoted(model_dir)} --name {quoted(eval_name)}`"
        row.seeds_missing.append(
            f"seed-{seed}: run {command}" if model_dir.is_dir() else
            f"seed-{seed}: run {train_command(seed)}, then {command}")
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


def model_rows(config: dict, root: Path, best_index: int | None, eval_dir: Path | None = None) -> list[ModelRow]:
    """Teacher (T*), SFT student, distilled students, then other evaluations, with their results
    (from ``eval_dir``: the task's ``eval/`` unless given, e.g. ``eval/heldout/``)."""
    eval_dir = eval_dir or root / "eval"
    rows: list[ModelRow] = []
    if best_index is None:
        rows.append(ModelRow("Teacher (T*)", "teacher", "",
                             missing=f"{root / 'teacher' / 'checkpoints.json'} not found, so T* is "
                             "unknown (run `scd-pipeline sft --role teacher`)"))
    else:
        rows.append(_attach(ModelRow(f"Teacher (T* = ckpt-{best_index})", "teacher",
                                     teacher_eval_name(best_index),
                                     model_dir=root / "teacher" / f"ckpt-{best_index}"), eval_dir,
                            f"run `scd-pipeline evaluate --model {quoted(root / 'teacher' / f'ckpt-{best_index}')}`"))
    count = int(config.get("replicates", 1))
    if count > 1:  # the SFT student has the methods' seeds too (seed 0: student_sft, the AW anchor)
        row = ModelRow("SFT student", "sft", "student_sft", seed_names={s: sft_student_eval_name(s)
                                                                         for s in range(count)})
        rows.append(_attach_replicates(row, eval_dir, {s: root / sft_student_dir(s) for s in range(count)},
                                       lambda s: "`scd-pipeline sft --role student"
                                                 + (f" --replicate {s}`" if s else "`")))
    else:
        rows.append(_attach(ModelRow("SFT student", "sft", "student_sft", model_dir=root / "student_sft"), eval_dir,
                            f"run `scd-pipeline evaluate --model {quoted(root / 'student_sft')}`"
                            if (root / "student_sft").is_dir() else
                            "run `scd-pipeline sft --role student`, then `scd-pipeline evaluate "
                            f"--model {quoted(root / 'student_sft')}`"))
    seen = {row.eval_name for row in rows} | {n for row in rows for n in row.seed_names.values()}
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
            rows.append(_attach_replicates(
                row, eval_dir, {s: root / "students" / replicate_student_name(name, s) for s in seeds},
                lambda s, name=name: f"`scd-pipeline distill --method {quoted(name)} --name "
                                     f"{quoted(replicate_student_name(name, s))} --set seed=SEED+{s}`"))
            continue
        command = f"`scd-pipeline evaluate --model {quoted(model_dir)}`"
        rows.append(_attach(ModelRow(method_label(name), "distilled", eval_name, model_dir=model_dir, method=name),
                            eval_dir, f"run {command}" if model_dir.is_dir() else
                            f"run `scd-pipeline distill --method {quoted(name)}`, then {command}"))
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


# --- other artifacts -----------------------------------------------------------------------------

def read_teacher_checkpoints(root: Path) -> dict | None:
    """``teacher/checkpoints.json`` (None if absent; a one-line DataError if unusable)."""
    from scd_pipeline.engine.checkpoints import read_checkpoints

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
               "rows": "+".join(str(entry["rows"][k]) for k in ("train", "synthetic", "replay"))
               + (f" ({entry['rows']['remedial']} remedial items, {entry['rows']['repeated']} of them seen before)"
                  if "remedial" in entry["rows"] else ""),
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
    budgets: dict[str, dict] = field(default_factory=dict)  # student -> what it spent (schedule.json, first seed)
    ioa_plan: dict | None = None
    synthesis: dict | None = None
    differences: pd.DataFrame = field(default_factory=pd.DataFrame)
    outcomes: pd.DataFrame = field(default_factory=pd.DataFrame)
    tag_evidence: tuple[dict, dict] | None = None
    resolution: Resolution | None = None
    split_label: str = "test"  # what the rows are called in sentences: test | held-out
    heldout: ReportInputs | None = None  # the same models on the held-out split (eval/heldout/)
    heldout_note: str | None = None  # why there is no held-out table though the task asks for one

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
    teacher_tests = {k: Interval(as_float(r["metrics"].get(primary)), math.nan, math.nan)
                     for k, r in checkpoint_evals.items()}
    if evidence is not None:
        teacher_tests.update({k: evidence.interval(f"teacher-ckpt-{k}", primary) for k in checkpoint_evals
                              if evidence.interval(f"teacher-ckpt-{k}", primary) is not None})
    schedules, curricula, budgets = {}, {}, {}
    for name in student_names(config, root):
        for folder in ([root / "students" / replicate_student_name(name, s) for s in replicate_indices(config, root, name)][:1]
                       or [root / "students" / name]):
            path = folder / "schedule.json"  # a replicated method: its first seed's schedule
            if path.is_file():
                phases = read_schedule(path)
                schedules[name] = (phases, chosen_terms(phases))
                record = read_json(path)
                budgets[name] = {key: record.get(key) for key in ("total_steps", "train_tokens", "budget_steps",
                                                                  "lr_schedule")}
            if (folder / CURRICULUM_FILE).is_file():
                curricula[name] = read_json(folder / CURRICULUM_FILE)
    subdomain_summary, subdomain_table = read_subdomains(root)
    ioa_plan, synthesis = read_ioa(root)
    differences = differences_frame(evidence, metrics, primary) if evidence is not None else None
    inputs = ReportInputs(
        config=config, root=root, rows=rows, kind=kind, metrics=metrics, primary=primary,
        frame=results_frame(rows, metrics, primary, evidence, differences), checkpoints=checkpoints,
        best_index=best_index,
        teacher_tests=teacher_tests, schedules=schedules, subdomain_summary=subdomain_summary,
        subdomain_table=subdomain_table, shares=sfs_shares(subdomain_summary, subdomain_table), evidence=evidence,
        curricula=curricula, budgets=budgets, ioa_plan=ioa_plan, synthesis=synthesis)
    heldout_dir = root / eval_subdir(HELDOUT_SPLIT)
    manifest = root / "data" / "manifest.json"
    held_size = (read_json(manifest).get("heldout") or {}).get("rows") if manifest.is_file() else None
    if held_size == 0:
        inputs.heldout_note = ("The held-out split is empty: training and validation use every row of the "
                               "task's pool (data/manifest.json), so there is nothing to evaluate beside the test split.")
    elif heldout_dir.is_dir() and any(heldout_dir.glob("*.json")):
        held_rows = [replace(row, folder=eval_subdir(HELDOUT_SPLIT))
                     for row in model_rows(config, root, best_index, heldout_dir)]
        held_evidence = gather_evidence(heldout_dir, evaluated_models(config, held_rows, {}), kind, metrics,
                                        config["task"], config["seed"], settings["resamples"], settings["confidence"],
                                        reference=held_rows[0].eval_name or None)
        held_differences = (differences_frame(held_evidence, metrics, primary) if held_evidence is not None
                            else pd.DataFrame())
        inputs.heldout = replace(inputs, rows=held_rows, evidence=held_evidence, differences=held_differences,
                                 frame=results_frame(held_rows, metrics, primary, held_evidence,
                                                     held_differences if held_evidence is not None else None),
                                 teacher_tests={}, split_label="held-out")
    if evidence is not None:
        inputs.differences = differences
        if details:
            inputs.tag_evidence = tag_intervals(evidence, inputs.tag_metric, config["seed"])
            inputs.outcomes = outcome_frame(evidence, config["seed"])
            power_metric = primary if primary in ("accuracy", "exact_f1") else score_metric(kind)
            inputs.resolution = resolution(evidence, power_metric, settings["target_difference"], settings["power"])
    return inputs
