"""The report's sections: each turns ``ReportInputs`` into blocks of the document."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from scd_pipeline.engine.checkpoints import checkpoint_indices
from scd_pipeline.engine.methods import method_label
from scd_pipeline.math.stats import Interval
from scd_pipeline.stages.report.evidence import (
    HELD_OUT_PARTITION,
    HELD_OUT_RULE,
    PARTITIONS,
    REFERENCE_LABELS,
    REFERENCES,
    Resolution,
    score_metric,
)
from scd_pipeline.stages.report.inputs import (
    AW_PLOT,
    METRIC_LABELS,
    RESULTS_PLOT,
    SHARES_PLOT,
    TEACHER_PLOT,
    ModelRow,
    ReportInputs,
    checkpoint_label,
    curriculum_passes,
    curriculum_plot_name,
    quoted,
    schedule_plot_name,
)
from scd_pipeline.stages.report.render import (
    EXPLORATORY_MARK,
    RESOLVED_MARK,
    Block,
    Image,
    Table,
    as_float,
    difference_mark,
    fmt,
    fmt_interval,
)
from scd_pipeline.stages.report.tables import per_tag_frame, tag_sizes

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
        cells = {(r["key"], r["reference"]): (Interval(r["estimate"], r["low"], r["high"]), difference_mark(r))
                 for r in part.to_dict("records")}
        blocks += [("h3", METRIC_LABELS[metric]), ("table", Table(
            ["Model", *[f"Δ vs {REFERENCE_LABELS[r]}" for r in references]],
            [[labels.get(key, key), *[fmt_interval(cells[(key, r)][0], signed=True, mark=cells[(key, r)][1]) if (key, r) in cells
                                      else "—" for r in references]] for key in keys]))]
    return blocks


def seeds_per_method(inputs: ReportInputs) -> int:
    return max((len(r.seed_results) for r in inputs.rows if r.seed_names), default=1)


def conclusion_sentence(inputs: ReportInputs) -> str:
    """What the table can conclude: the confirmatory family's resolved differences (the primary
    metric, each distilled method against the SFT student and TD, Holm-adjusted), how many
    intervals the report shows in all, and, with one seed, that a difference is between two
    trained checkpoints rather than two methods."""
    deltas = inputs.differences
    evidence = inputs.evidence
    if evidence is None or deltas.empty:
        return "The table cannot conclude anything about differences: no per-row predictions to bootstrap."
    labels = {row.eval_name: row.label for row in inputs.rows}
    metric = METRIC_LABELS[inputs.primary]
    family = deltas[deltas["family"] == "confirmatory"]
    explored = deltas[deltas["family"] == "exploratory"]
    seeds = seeds_per_method(inputs)
    alpha = 1.0 - evidence.bootstrap.confidence
    scope = (f"At n = {evidence.n} {inputs.split_label} rows and {seeds} seed{'s' if seeds > 1 else ''} per distilled "
             f"method, ")
    if family.empty:
        text = scope + (f"no difference is confirmatory (the family is {metric} of each distilled method "
                        "against the SFT student and TD, and none was evaluated)")
    else:
        resolved = family[family["resolved"].astype(bool)]
        if resolved.empty:
            text = scope + (f"none of the {len(family)} confirmatory {metric} differences (each distilled method "
                            f"against the SFT student and TD, Holm-adjusted p < {alpha:g}) is resolved: the "
                            "table cannot say that any method is better or worse than these references")
        else:
            called = [f"{labels.get(r['key'], r['key'])} {'above' if r['estimate'] > 0 else 'below'} "
                      f"{REFERENCE_LABELS[r['reference']]} ({r['estimate']:+.3f})"
                      for r in resolved.to_dict("records")]
            text = scope + (f"the table concludes {len(resolved)} of the {len(family)} confirmatory {metric} "
                            f"differences (each distilled method against the SFT student and TD, Holm-adjusted "
                            f"p < {alpha:g}, marked {RESOLVED_MARK}): {', '.join(called)}; it cannot rank the "
                            "other pairs")
    text += (f". The report shows {len(deltas)} difference intervals; the {len(explored)} outside that family are "
             f"exploratory ({EXPLORATORY_MARK} where their own p < {alpha:g}: with nothing different, about "
             f"{alpha * len(explored):.1f} of them would be marked by chance), as are the per-tag and SFS/TFS "
             "tables.")
    if seeds == 1:
        text += (" With one training seed per method a difference compares two trained checkpoints, not "
                 "two methods: the intervals leave out how much another seed would move each student "
                 "(`replicates` > 1 puts it in).")
    return text


def budget_table(inputs: ReportInputs) -> Table:
    """What each distilled student spent (its schedule.json; a replicated method's first seed)."""
    rows = []
    for name, spent in inputs.budgets.items():
        curriculum = inputs.curricula.get(name)
        mode = "—" if curriculum is None else (f"{curriculum.get('budget', 'open')}, ended at "
                                               f"{curriculum.get('ended') or '?'}")
        tokens = spent.get("train_tokens")
        rows.append([method_label(name), fmt(spent.get("total_steps")),
                     f"{tokens:,}" if isinstance(tokens, int) and tokens else "—",
                     str(spent.get("lr_schedule") or "—"), mode])
    return Table(["Student", "Optimizer steps", "Training tokens", "LR schedule", "Curriculum budget"], rows)


def resolution_text(found: Resolution | None) -> str:
    if found is None:
        return "Not computed: fewer than two students have per-row predictions."
    metric = METRIC_LABELS[found.metric]
    per_row = f"per-row {metric}" + (" (mean over seeds)" if found.seeds > 1 else "")
    if found.required_rows is None:
        return (f"Not estimable: the students' {per_row} agree on every test row (variance 0 over "
                f"{found.pairs} student pairs), so these rows say nothing of how many a difference of "
                f"{found.target:.2f} would need.")
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
    part = part[(part["partition"] == partition) & (part["tag"] == tag) & (part["quantity"] == "score")
                & (part["versus"] == "teacher")]
    labels = {row.eval_name: (row.label, row.role) for row in inputs.rows}
    score = METRIC_LABELS[score_metric(inputs.kind)]
    headers = ["Model", f"{score} on SFS", f"{score} on TFS", "Δ vs T*", "= SFS part (advantage)",
               "+ TFS part (deficit)"]
    rows = []
    for key, group in part.groupby("key", sort=False):
        cells = {r["part"]: Interval(r["estimate"], r["low"], r["high"]) for r in group.to_dict("records")}
        label, role = labels.get(key, (key, "other"))
        signed = [fmt_interval(cells[p], signed=True) if role != "teacher" else "—"
                  for p in ("gap", "advantage_sfs", "deficit_tfs")]
        rows.append([label, fmt_interval(cells["score_sfs"]), fmt_interval(cells["score_tfs"]), *signed])
    return Table(headers, rows)


def outcome_tag_table(inputs: ReportInputs, partition: str) -> Table:
    part = inputs.outcomes
    part = part[(part["partition"] == partition) & (part["tag"] != "all") & (part["quantity"] == "score")
                & (part["versus"] == "teacher")]
    labels = {row.eval_name: (row.label, row.role) for row in inputs.rows}
    rows = []
    for (tag, key), group in part.groupby(["tag", "key"], sort=False):
        label, role = labels.get(key, (key, "other"))
        if role == "teacher":
            continue
        cells = {r["part"]: Interval(r["estimate"], r["low"], r["high"]) for r in group.to_dict("records")}
        first = group.iloc[0]
        rows.append([f"{tag} ({first['sfs_rows']} / {first['tfs_rows']})", label,
                     *[fmt_interval(cells[p], signed=True) for p in ("gap", "advantage_sfs", "deficit_tfs")]])
    return Table(["Tag (SFS / TFS rows)", "Model", "Δ vs T*", "= SFS part", "+ TFS part"], rows)


def versus_table(inputs: ReportInputs) -> Table:
    """On the held-out split, each distilled method's SFS and TFS parts minus TD's and minus the
    SFT student's (score), with their intervals; exploratory marks."""
    part = inputs.outcomes
    part = part[(part["partition"] == HELD_OUT_PARTITION) & (part["versus"] != "teacher")]
    labels = {row.eval_name: row.label for row in inputs.rows}
    columns = [(versus, side) for versus in ("td", "sft") for side in ("advantage_sfs", "deficit_tfs")]
    names = {"advantage_sfs": "SFS part", "deficit_tfs": "TFS part"}
    headers = ["Model", *[f"{names[side]} − {REFERENCE_LABELS[versus]}'s" for versus, side in columns]]
    rows = []
    for key, group in part.groupby("key", sort=False):
        cells = {(r["versus"], r["part"]): r for r in group.to_dict("records")}
        row = [labels.get(key, key)]
        for column in columns:
            record = cells.get(column)
            row.append("—" if record is None else
                       fmt_interval(Interval(record["estimate"], record["low"], record["high"]), signed=True)
                       + (EXPLORATORY_MARK if record["resolved"] else ""))
        rows.append(row)
    return Table(headers, rows)


def checkpoint_table(checkpoints: dict, best: int, test_metric: dict[int, Interval],
                     metric_label: str) -> Table:
    metric = checkpoints.get("metric", "metric")
    headers = ["Checkpoint", "Step", "Epoch", "Train loss", "Val loss", f"Val {metric}", f"Test {metric_label}"]
    rows, bold = [], set()
    for i, entry in enumerate(sorted(checkpoints["checkpoints"], key=lambda e: int(e["index"]))):
        index = int(entry["index"])
        if index == best:
            bold.add(i)
        rows.append([f"ckpt-{index}" + (" (T*)" if index == best else ""), fmt(entry.get("step")), fmt(as_float(entry.get("epoch"))),
                     fmt(as_float(entry.get("train_loss"))), fmt(as_float(entry.get("val_loss"))),
                     fmt(as_float(entry.get("val_metric"))),
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
                            f"(stale: re-run `scd-pipeline evaluate --model {quoted(row.model_dir)}`)")
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
    if inputs.heldout is not None:
        held = inputs.heldout
        _, sizes = _evaluated_splits(held.rows)
        blocks += [("h3", "The same models on the held-out split"),
                   ("p", f"{', '.join(map(str, sizes)) or 'No'} rows of the task's pool that no model trained or was "
                         "validated on, drawn with the test split's label shares (`data.heldout_size`); the test "
                         "split above stays the task's official one, for comparison with published numbers. "
                         "Intervals, differences and the confirmatory family as above, on these rows."),
                   ("table", results_table(held)), ("p", conclusion_sentence(held))]
    elif inputs.heldout_note:
        blocks += [("h3", "The same models on the held-out split"), ("p", inputs.heldout_note)]
    if inputs.budgets:
        blocks += [("p", "What each distilled student spent: optimizer steps, training tokens (prompt + "
                         "completion, every process), its LR schedule and, for a curriculum, its budget "
                         "(`ioa.budget`: matched = the plain method's steps) and what ended it. Compare "
                         "methods at equal steps."),
                   ("table", budget_table(inputs))]
    if RESULTS_PLOT in drawn:
        blocks.append(("image", Image(f"plots/{RESULTS_PLOT}", f"{METRIC_LABELS[inputs.primary]} with "
                                      "intervals; T* and the SFT student as reference lines")))
    alpha = 1.0 - (inputs.evidence.bootstrap.confidence if inputs.evidence is not None else 0.95)
    blocks += [("p", "Teacher row: `eval/teacher-ckpt-{k}.json` with k = T*, the checkpoint with the "
                     "best validation metric in `teacher/checkpoints.json`. \"(best)\" (bold, column "
                     f"`best` in summary.csv): the highest test estimate of {METRIC_LABELS[inputs.primary]} "
                     "among the SFT and distilled students, ties broken by the other metrics; it is picked on "
                     "these same rows, so its estimate is biased upward and it is not a resolved ranking "
                     "(the differences below are). NLL, sample counts, interval bounds and the spread over "
                     "seeds are in `summary.csv`."),
               ("h2", "Differences"),
               ("p", "Row minus reference on the same resampled test rows (paired), for every metric: "
                     f"T* (the teacher), the SFT student and TD. {RESOLVED_MARK} = resolved in the "
                     f"confirmatory family ({METRIC_LABELS[inputs.primary]}, each distilled method against "
                     f"the SFT student and TD; Holm-adjusted p < {alpha:g}); {EXPLORATORY_MARK} = an "
                     f"exploratory difference with p < {alpha:g} on its own. p: for accuracy with one seed "
                     "the exact test on the rows where exactly one of the two is right, otherwise the paired "
                     "bootstrap's; between two models with seeds, seed s paired with seed s, the interval is "
                     "the wider of the bootstrap's and Student's t over the seed pairs, and p the larger. An "
                     "interval may exclude 0 with too few such rows to decide. Bounds, p and "
                     "family in `summary.csv` (`delta_{metric}_vs_{reference}`)."),
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
    blocks.append(("p", f"Test rows split by the SFT student against T* (SPEC 4.2), first without and then "
                        f"with each row's own outcomes. Per model: its {score} "
                        "on student-favoured (SFS) and teacher-favoured (TFS) rows, and its difference to "
                        "T*, Δ = R(model) − R(T*) = SFS part + TFS part (each the mean over all rows of the "
                        "per-row difference restricted to one side). The splits by NLL and by correctness "
                        "(SPEC 4.2 as written) are descriptive only, and no part is tested "
                        "against 0: their sides are drawn from T*'s and the SFT student's own outcomes on these "
                        "rows, so the parts lean by construction (by correctness T* is wrong on every SFS row, "
                        "so every model's SFS part is at least 0), and the split favours students whose errors "
                        "resemble the SFT student's. Every part per tag and the same split for the NLL are in "
                        "`sfs_tfs.csv`."))
    held_out = inputs.outcomes[inputs.outcomes["partition"] == HELD_OUT_PARTITION]
    if not held_out.empty:
        first = held_out.iloc[0]
        blocks += [("h3", "By the other rows of each tag (held out)"),
                   ("p", f"Here a row's side is decided by {HELD_OUT_RULE}: its own outcomes never put it "
                         f"there. SFS: {first['sfs_rows']} rows, TFS: {first['tfs_rows']} rows (of "
                         f"{first['sfs_rows'] + first['tfs_rows']}). The paper's claim is a difference between "
                         "methods within a side: SCD shrinks the TFS deficit (its TFS part above TD's) and AW "
                         "keeps the SFS advantage (its SFS part not below the SFT student's). The second table "
                         "gives each distilled method's parts minus TD's and minus the SFT student's (each part "
                         "a mean over all test rows, so the two parts of a row add up to the whole difference). "
                         f"Exploratory: {EXPLORATORY_MARK} marks an interval that excludes 0 on its own, with "
                         "no adjustment for the number of cells. When every row of the test split carries one "
                         "tag, every row is on one side and the parts are the whole differences."),
                   ("table", outcome_table(inputs, HELD_OUT_PARTITION))]
        versus = versus_table(inputs)
        blocks.append(("table", versus) if versus.rows else
                      ("p", "No part differences: they need TD or the SFT student and another distilled method."))
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


PAPER_TAU_GAP = 0.3  # IOA's deficiency threshold in its paper (SPEC 4.6)
DIAGNOSED = {"student_base": "the base student, where the curriculum starts (distill.init: base)",
             "student_sft": "the SFT student, where the curriculum starts (distill.init: sft)"}


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
                         f"gap Δ = (P_T − P_S) / P_T of T* against {DIAGNOSED.get(plan.get('diagnosed'), 'the SFT student')}; deficient when Δ > "
                         f"τ_gap = {thresholds['tau_gap']:g}; severity = {thresholds['gap_weight']:g}·Δ + "
                         f"{1 - thresholds['gap_weight']:g}·dependency. {plan['dependency']}."),
                   ("table", Table(["Module", "Val rows", "P_T", "P_S", "Δ", "Severity", "Deficient"],
                                   [[m["module"], str(m["val_rows"]), fmt(m["teacher"]), fmt(m["student"]),
                                     fmt(m["gap"], True), fmt(m["severity"]), "yes" if m["deficient"] else "no"]
                                    for m in plan["modules"]])),
                   ("p", "Stages (easiest first, ZPD τ_zpd = " + f"{thresholds['tau_zpd']:g}): " + " → ".join(
                       f"{stage['stage']}: {', '.join(u['unit'] for u in stage['units'])}" for stage in plan["stages"])
                    + ". " + ("Every step stays within the ZPD." if all(z["within_zpd"] for z in plan["zpd"])
                              else "Steps beyond the ZPD (no split possible): " + ", ".join(
                                  f"{z['from_stage']}→{z['to_stage']}" for z in plan["zpd"] if not z["within_zpd"])
                              + "."))]
    if plan is not None and plan["thresholds"]["tau_gap"] != PAPER_TAU_GAP:
        blocks.append(("p", f"τ_gap is {plan['thresholds']['tau_gap']:g} in this run, not the paper's "
                            f"{PAPER_TAU_GAP:g}: the IOA rows are of a tuned curriculum."))
    if inputs.curricula:
        blocks.append(("p", "The mastery gates score the live student on the validation split after every pass, "
                            "so a curriculum steers by the validation rows; the results above are on the test "
                            "split, which no gate saw (a curriculum refuses evaluate.split: val)."))
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
                         f"the other modules' remedial reserve and, in every style, for the most severe deficient modules ({', '.join(synthesis.get('targeted', synthesis['deficient'])) or 'none'}"
                         f" of {', '.join(synthesis['deficient']) or 'none'}; `ioa.synthesis.top_share` "
                         f"{synthesis['settings'].get('top_share', 1):g}); {synthesis['kept']} kept"
                         + (" (nothing was synthesised: the curriculum trained on the task's own rows)"
                            if not synthesis["kept"] else "") + f". Checks: {synthesis['checks']}.")]
        if synthesis.get("strategies_skipped"):
            blocks.append(("p", f"The Adapter's strategies were skipped: {synthesis['strategies_skipped']}."))
        if synthesis.get("yield_by_style"):
            blocks.append(("table", Table(["Style", "Curriculum part", "Generated", "Kept", "Kept share"],
                                          [[y["strategy"], y["register"], str(y["generated"]), str(y["kept"]),
                                            fmt(y["kept_rate"])] for y in synthesis["yield_by_style"]])))
        if synthesis["yield"]:
            blocks.append(("table", Table(["Module", "Style", "Generated", "Kept", *reasons],
                                          [[y["module"], y.get("strategy", y["register"]), str(y["generated"]),
                                            str(y["kept"]), *[str(y[r]) for r in reasons]]
                                           for y in synthesis["yield"]])))
        examples = synthesis.get("examples") or []
        if examples:
            blocks.append(("list", [f"{e.get('strategy', e['register'])} ({e['module']}, T* confidence "
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
            "NLL per row: " + ("its tag's mean over the validation rows, which no model trained on "
                               "(`subdomains.estimate: heldout_tag`)" if summary.get("estimate") == "heldout_tag" else
                               "the row's own, under models that trained on it (`subdomains.estimate: in_sample`, "
                               "the paper's)"),
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
