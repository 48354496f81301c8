"""The report's plots (matplotlib Figure on an Agg canvas: no global pyplot state), and which
of them a run has the inputs for."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from scd_pipeline.engine.methods import method_label
from scd_pipeline.stages.report.inputs import (
    AW_PLOT,
    METRIC_LABELS,
    RESULTS_PLOT,
    SHARES_PLOT,
    TEACHER_PLOT,
    ReportInputs,
    curriculum_passes,
    curriculum_plot_name,
    is_scd_method,
    quoted,
    schedule_plot_name,
    student_names,
)
from scd_pipeline.stages.report.render import as_float

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
    axis.plot(index, [as_float(e.get("val_metric")) for e in entries], "o-", color="tab:blue",
              label=f"val {checkpoints.get('metric', 'metric')}")
    if test_metric:
        tested = sorted(test_metric)
        axis.plot(tested, [test_metric[k] for k in tested], "s", color="tab:green", label=f"test {metric_label}")
    best_value = as_float(next(e for e in entries if int(e["index"]) == best).get("val_metric"))
    axis.plot([best], [best_value], "*", markersize=18, color="tab:red", label=f"T* = ckpt-{best}")
    axis.set_xlabel("teacher checkpoint (step)")
    axis.set_xticks(index, [f"{k}\n({e.get('step', '?')})" for k, e in zip(index, entries, strict=True)])
    axis.set_ylabel(checkpoints.get("metric", "metric"))
    handles = axis.get_legend_handles_labels()[0]
    losses = [as_float(e.get("val_loss")) for e in entries]
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
                           f"(run `scd-pipeline distill --method {quoted(name)}`)")
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
