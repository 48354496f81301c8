"""IOA's Identifier and Organizer: ``scd-pipeline ioa-plan`` -> ``ioa/plan.json`` (SPEC 4.6).

From the validation split it scores the teacher T* and the student the curriculum starts from
(``distill.init``: the base student or the SFT student; the one scoring path,
:func:`scoring.predict_split`), groups the rows into knowledge modules (the task's tags, or
strata of T*'s gold NLL for a task with fewer than two tags), and writes:

- per module: P_T, P_S, the gap Δ, dependency strength (0: no student states exist before
  distillation; ``distill`` measures it across the curriculum's passes and records it in
  ``curriculum.json``), severity and whether the module is deficient (Δ > ``ioa.tau_gap``);
- the curriculum: stages easiest first, merged / split under the ZPD rule
  (:func:`curriculum.organize`), each module's easier / harder halves (split at the median T* NLL
  of its training rows) and which stage boundaries keep within the ZPD;
- ``ioa/val_scores.parquet``: every validation row's module, T* NLL and both models' scores
  (the mastery gate's teacher side and row membership).

``synthesize`` writes teacher items for the deficient modules; ``distill --method ioa`` (or any
method ``+ioa``) trains through the stages with mastery gates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.checkpoints import checkpoint_entry, read_checkpoints
from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.curriculum_files import (
    PLAN_FILE,
    VAL_SCORES_FILE,
    ioa_dir,
    validation_rows,
)
from scd_pipeline.engine.io import atomic_path, sha256_file, write_json
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.errors import DataError, ModelError
from scd_pipeline.math.curriculum import (
    EASIER,
    HARDER,
    PlannedModule,
    assign_modules,
    identify,
    organize,
    piece_name,
    row_members,
    zpd_report,
)

DEPENDENCY_NOTE = ("0 for every module at plan time: IOA measures dependency from student states "
                   "(P_S of module j when module i is mastered vs not), and none exist before "
                   "distillation; distill measures it across the curriculum's passes (curriculum.json)")


def _scores(frame: pd.DataFrame, column: str, members: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in frame[column].groupby(members).mean().items()}


def build_plan(train: pd.DataFrame, train_nll: np.ndarray, val: pd.DataFrame, settings: dict) -> tuple[dict, pd.DataFrame]:
    """The plan (see the module doc) from the training rows' T* NLL and the validation rows'
    ``teacher_score``, ``student_score`` and ``teacher_nll`` columns; pure (no models)."""
    assignment = assign_modules(train["tag"].astype(str).tolist(), list(train_nll), bins=settings["strata"])
    edges = assignment.edges
    if assignment.basis == "strata":
        val_modules = assign_modules(["all"] * len(val), val["teacher_nll"].tolist(), edges).modules
    else:
        val_modules = val["tag"].astype(str).tolist()
    val = val.assign(module=val_modules)
    train_modules = pd.Series(assignment.modules, index=train.index)
    teacher = _scores(val, "teacher_score", val["module"])
    student = _scores(val, "student_score", val["module"])
    missing = sorted(set(train_modules) - set(teacher))
    if missing:
        raise DataError(f"validation split: no row of module(s) {missing}; every module needs validation "
                        "rows for its mastery gate (raise data.val_fraction)")
    gaps = identify(teacher, student, settings["tau_gap"], settings["gap_weight"])
    # each module's halves at the median T* NLL of its training rows, scored on their val rows
    split_at = {m: float(np.median(train_nll[(train_modules == m).to_numpy()])) for m in teacher}
    halves: dict[str, tuple[PlannedModule, PlannedModule]] = {}
    for module, median in split_at.items():
        rows = val[val["module"] == module]
        parts = []
        for part, mask in ((EASIER, rows["teacher_nll"] <= median), (HARDER, rows["teacher_nll"] > median)):
            chosen = rows[mask]
            parts.append(PlannedModule(piece_name(module, part),
                                       float(chosen["teacher_score"].mean()) if len(chosen) else 0.0,
                                       float(chosen["student_score"].mean()) if len(chosen) else 0.0,
                                       len(chosen), parent=module, part=part))
        halves[module] = (parts[0], parts[1])
    units = [PlannedModule(m, teacher[m], student[m], int((val["module"] == m).sum())) for m in sorted(teacher)]
    stages = organize(units, settings["tau_zpd"], halves, settings["min_split_rows"])
    split_nll = {m: split_at[m] for stage in stages for unit in stage.modules
                 if unit.parent is not None for m in [unit.parent]}
    plan = {
        "basis": assignment.basis,
        "strata_edges": edges,
        "modules": [{"module": g.module, "train_rows": int((train_modules == g.module).sum()),
                     "val_rows": int((val["module"] == g.module).sum()), "teacher": g.teacher,
                     "student": g.student, "gap": g.gap, "dependency": g.dependency, "severity": g.severity,
                     "deficient": g.deficient} for g in gaps],
        "deficient": [g.module for g in gaps if g.deficient],
        "dependency": DEPENDENCY_NOTE,
        "split_nll": split_nll,
        "stages": [{"stage": i + 1, "mean_student": stage.mean_student, "split_from": stage.split_from,
                    "units": [{"unit": u.name, "module": u.parent or u.name, "part": u.part,
                               "teacher": u.teacher, "student": u.student, "val_rows": u.val_rows}
                              for u in stage.modules]} for i, stage in enumerate(stages)],
        "zpd": zpd_report(stages, settings["tau_zpd"]),
        "thresholds": {key: settings[key] for key in ("tau_gap", "gap_weight", "tau_zpd", "min_split_rows",
                                                       "tau_mastery", "max_remedial", "replay_share")},
    }
    val = val.assign(unit=row_members(plan, val["tag"], val["teacher_nll"]))
    return plan, val


def _val_predictions(model_dir: Path, frame: pd.DataFrame, config: dict, where: str) -> pd.DataFrame:
    from scd_pipeline.engine.models import load_model
    from scd_pipeline.engine.scoring import predict_split

    model, tokenizer = load_model(model_dir)
    return predict_split(model, tokenizer, frame, config["evaluate"]["batch_size"],
                         config["evaluate"]["max_new_tokens"], where=where, progress=True)


def plan_curriculum(config: dict) -> dict:
    """The stage: write ``ioa/plan.json`` and ``ioa/val_scores.parquet``; return the plan."""
    from scd_pipeline.engine.logit_cache import open_task_cache
    from scd_pipeline.engine.models import is_model_dir

    root = task_dir(config)
    checkpoints = read_checkpoints(root / "teacher")
    best = int(checkpoints["best_index"])
    teacher_dir = root / "teacher" / checkpoint_entry(checkpoints, best)["path"]
    # the student diagnosed is the student the curriculum trains: distillation's starting point
    diagnosed = "student_sft" if config["distill"]["init"] == "sft" else "student_base"
    student_dir = root / "student_sft" if diagnosed == "student_sft" else Path(config["results_dir"]) / "models" / "student_base"
    if not is_model_dir(student_dir):
        make = "sft --role student" if diagnosed == "student_sft" else "prepare-model --role student"
        raise ModelError(f"{student_dir}: the student the curriculum starts from (distill.init: "
                         f"{config['distill']['init']}) not found (run `scd-pipeline {make}` first)")
    train_path = root / "data" / f"{config['cache']['split']}.parquet"
    train = read_split(train_path)
    stats = open_task_cache(config, best).stats().set_index("sample_id")
    train_nll = stats.loc[train["sample_id"], "nll_mean"].to_numpy(np.float64)
    val_path, val = validation_rows(config)
    teacher = _val_predictions(teacher_dir, val, config, f"{val_path} (T* = ckpt-{best})")
    student = _val_predictions(student_dir, val, config, f"{val_path} ({diagnosed})")
    scores = pd.DataFrame({"sample_id": val["sample_id"].astype(str), "tag": val["tag"].astype(str),
                           "teacher_score": teacher["score"], "student_score": student["score"],
                           "teacher_nll": -teacher["gold_logprob"] / teacher["gold_tokens"]})
    plan, scores = build_plan(train, train_nll, scores, config["ioa"])
    plan = {"task": config["task"], "best_index": best, "teacher": str(teacher_dir),
            "student": str(student_dir), "diagnosed": diagnosed, "val_rows": len(val),
            "inputs": {"train": sha256_file(train_path), "val": sha256_file(val_path)}, **plan}
    out = ioa_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / VAL_SCORES_FILE) as tmp:
        scores.to_parquet(tmp, index=False)
    write_json(out / PLAN_FILE, plan)
    write_effective_config(config, out, "ioa-plan")
    return {**plan, "paths": [str(out / PLAN_FILE), str(out / VAL_SCORES_FILE)]}


def artifacts(config: dict) -> list[Artifact]:
    """What ``ioa-plan`` writes: the plan, the validation scores and the config."""
    folder = ioa_dir(config)
    return [Artifact(folder / PLAN_FILE, (folder / PLAN_FILE, folder / VAL_SCORES_FILE,
                                          folder / "ioa-plan.config.yaml"))]
