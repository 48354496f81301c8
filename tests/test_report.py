"""The report stage on a fake results/{task}/ tree (no models): the paper-shaped table with the
best student, intervals, paired differences and the conclusion checked by hand, summary.csv,
sfs_tfs.csv (the SFS/TFS outcome on the test split), per-tag accuracy, schedules, the subdomain
shares, valid PNGs, a self-contained HTML page, honest "not run" / missing lists, replicated
students, and the paper's Table 1 across two tasks.

Eval jsons are built like ``evaluate.evaluate`` builds them: the predictions frame goes through
``evaluate.summarise`` and ``json_safe``, and is written as ``{name}.predictions.parquet`` with the
per-row ``score``. The test split has four samples, gold A, B, C, D, tags x, x, y, y (demo task:
linear-weighted kappa over the letter order).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.io import json_safe, write_json
from scd_pipeline.engine.methods import method_label, parse_method
from scd_pipeline.engine.scoring import summarise
from scd_pipeline.errors import DataError
from scd_pipeline.math.schedules import scd_choose
from scd_pipeline.stages.estimate_subdomains import subdomain_table, summarize_subdomains
from scd_pipeline.stages.report import ReportResult, build_report
from scd_pipeline.stages.report.inputs import read_schedule
from scd_pipeline.stages.report.tables import best_student_mask

LETTERS = ["A", "B", "C", "D"]
GOLD = ["A", "B", "C", "D"]
TAGS = ["x", "x", "y", "y"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Predictions per eval name, with metrics worked out by hand (linear kappa, K = 4, W = |i-j|/3):
#   teacher-ckpt-2 all right: accuracy 1, kappa 1, macro-F1 1.
#   td  A B C C: accuracy 3/4; kappa 1 - (1/12) / (3/8) = 7/9; macro-F1 (1 + 1 + 2/3 + 0)/4 = 2/3.
#   scd A B C A: accuracy 3/4; kappa 1 - (1/4) / (5/12) = 2/5 -> loses the accuracy tie to td.
#   student_sft A A C C: accuracy 1/2.   td+paced (found in students/): A B A A, accuracy 1/2.
#   student_base (an "other" evaluation): A A A A, accuracy 1/4.
PREDICTIONS = {
    "teacher-ckpt-2": ["A", "B", "C", "D"],
    "teacher-ckpt-3": ["A", "B", "C", "C"],
    "student_sft": ["A", "A", "C", "C"],
    "td": ["A", "B", "C", "C"],
    "scd": ["A", "B", "C", "A"],
    "scd_aw": ["A", "A", "A", "D"],
    "td_paced": ["A", "B", "A", "A"],
    "student_base": ["A", "A", "A", "A"],
}


# Gold log-likelihoods (two completion tokens per row): per-row mean NLL = -logprob / 2.
#   T* (teacher-ckpt-2): NLL 1.0, 0.25, 0.25, 0.25; SFT student: 0.5, 0.5, 0.1, 1.0.
#   By NLL the SFT student is ahead (SFS) on rows 0 and 2; T* on rows 1 and 3 (TFS).
LOGPROBS = {"teacher-ckpt-2": [-2.0, -0.5, -0.5, -0.5], "student_sft": [-1.0, -1.0, -0.2, -2.0]}
DEFAULT_LOGPROBS = [-0.5, -1.0, -1.5, -2.0]


def write_eval(root: Path, name: str, predictions: list[str], task: str = "demo",
               gold: list[str] = GOLD, weights: str = "linear", folder: str = "eval", split: str = "test") -> None:
    """eval/{name}.json and .predictions.parquet as ``evaluate.evaluate`` writes them."""
    frame = pd.DataFrame({"sample_id": [f"{task}-{i}" for i in range(len(gold))], "tag": (TAGS * 4)[: len(gold)],
                          "gold": gold, "prediction": predictions,
                          "gold_logprob": (LOGPROBS.get(name, DEFAULT_LOGPROBS) * 4)[: len(gold)],
                          "gold_tokens": [2] * len(gold),
                          "score": [float(g == p) for g, p in zip(gold, predictions, strict=True)],
                          "malformed": [False] * len(gold)})
    summary = summarise(frame, "choice", LETTERS, weights)
    (root / folder).mkdir(parents=True, exist_ok=True)
    frame.drop(columns="malformed").to_parquet(root / folder / f"{name}.predictions.parquet")
    write_json(root / folder / f"{name}.json", json_safe({
        "name": name, "model": f"results/{task}/{name}", "task": task, "split": split, "kind": "choice",
        "n": len(frame), **summary, "kappa_weights": weights, "categories": LETTERS,
        "malformed_outputs": 0, "seconds": 0.1, "samples_per_s": 40.0, "device": "cpu", "dtype": "float32"}))


def write_checkpoints(root: Path, metric_name: str = "accuracy") -> None:
    """teacher/checkpoints.json as sft writes it: three checkpoints, T* = 2."""
    entries = [{"index": k, "path": f"ckpt-{k}", "step": 10 * k, "epoch": k / 3, "train_loss": 2.0 / k,
                "val_loss": loss, "val_metric": metric, "best": k == 2}
               for k, loss, metric in ((1, 1.5, 0.40), (2, 1.0, 0.80), (3, 1.1, 0.75))]
    write_json(root / "teacher" / "checkpoints.json", {"metric": metric_name, "best_index": 2,
                                                       "checkpoints": entries})


# SCD probe KLs by hand. KL(T* || c) for c = 1, 2, 3; KL(S_k || c) per phase.
KL_BEST = {1: 0.9, 2: 0.0, 3: 0.2}
KL_STUDENT = [{1: 0.1, 2: 1.5, 3: 1.2},   # phase 1: sums 1.0, 1.5, 1.4 -> ckpt-1
              {1: 0.8, 2: 0.6, 3: 0.3},   # phase 2: sums 1.7, 0.6, 0.5 -> ckpt-3
              {1: 1.0, 2: 0.1, 3: 0.4}]   # phase 3: sums 1.9, 0.1, 0.6 -> ckpt-2


def write_schedule(config: dict, root: Path, name: str, checkpoint_of_phase: list | None = None) -> None:
    """students/{name}/schedule.json in the format of docs/ARTIFACTS.md; SCD phases
    (``checkpoint_of_phase`` None) choose the argmin of KL_BEST + KL_STUDENT."""
    method = parse_method(name)
    phases = []
    for number, student_terms in enumerate(KL_STUDENT, start=1):
        record = {"phase": number, "first_step": 10 * number - 9, "last_step": 10 * number, "epochs": 1}
        if checkpoint_of_phase is None:
            chosen, candidates = scd_choose(KL_BEST, student_terms)
            record.update({"checkpoint": chosen, "candidates": candidates})
        else:
            record["checkpoint"] = checkpoint_of_phase[number - 1]
        phases.append(record)
    schedule = {"method": method.name, "name": name, "schedule": method.schedule,
                "adaptive_weight": method.adaptive, "paced": method.paced, "cd_mode": None, "best_index": 2,
                "checkpoints": [1, 2, 3], "n_phases": 3, "epochs_per_phase": 1, "total_steps": 30,
                "phases": phases}
    if method.schedule == "scd":
        schedule.update({"probe": {"size": 2, "sample_ids": ["s1", "s2"]},
                         "kl_best_to_c": {str(k): v for k, v in KL_BEST.items()}})
    write_json(root / "students" / name / "schedule.json", schedule)

def write_subdomains(root: Path) -> None:
    """Five training samples; SFT student vs T* = ckpt-2 by mean NLL: SFS = s1, s4, s5."""
    samples = pd.DataFrame({"sample_id": ["s1", "s2", "s3", "s4", "s5"], "tag": ["x", "x", "x", "y", "y"]})
    student = samples.assign(nll_mean=[0.5, 2.0, 2.0, 0.2, 0.3], score=[1.0, 0.0, 0.0, 1.0, 1.0])
    best = samples.assign(nll_mean=[1.0, 1.0, 1.0, 0.6, 0.6], score=[0.0, 1.0, 1.0, 1.0, 1.0])
    early = samples.assign(nll_mean=[3.0] * 5, score=[0.0] * 5)
    table = subdomain_table(samples, student, {1: early, 2: best}, best_index=2)
    table.to_parquet(root / "subdomains.parquet", index=False)
    write_json(root / "subdomains.json", {"task": "demo", "split": "train", **summarize_subdomains(table, 2)})


def make_full_tree(tmp_path: Path) -> tuple[dict, Path]:
    """Everything present except the CD and TAID evaluations (CD trained, TAID not)."""
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "task": "demo"})
    root = tmp_path / "results" / "demo"
    for name, predictions in PREDICTIONS.items():
        write_eval(root, name, predictions)
    write_checkpoints(root)
    for student in ("td", "cd", "scd", "scd_aw", "td+paced"):
        (root / "students" / student).mkdir(parents=True)
    write_schedule(config, root, "scd")
    write_schedule(config, root, "scd_aw")
    write_schedule(config, root, "td", [2, 2, 2])
    write_schedule(config, root, "cd", ["average"] * 3)  # cd_mode average: no single checkpoint
    write_subdomains(root)
    return config, root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[dict, Path, ReportResult]:
    """The full tree with its report built once (plots take a second or two to draw)."""
    config, root = make_full_tree(tmp_path_factory.mktemp("report"))
    return config, root, build_report(config)


def test_summary_csv_has_one_row_per_model_with_hand_computed_metrics_gaps_and_best(built):
    _, root, _ = built
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name", drop=False)
    assert summary["model"].tolist() == ["Teacher (T* = ckpt-2)", "SFT student", "TD", "CD", "TAID",
                                         "SCD", "SCD+AW", "TD+PACED", "student_base"]
    assert summary["role"].tolist() == ["teacher", "sft", *["distilled"] * 6, "other"]
    assert summary.loc["teacher-ckpt-2", "accuracy"] == 1.0
    assert summary.loc["td", "accuracy"] == pytest.approx(0.75)
    assert summary.loc["td", "kappa"] == pytest.approx(7 / 9)
    assert summary.loc["td", "macro_f1"] == pytest.approx(2 / 3)
    assert summary.loc["scd", "kappa"] == pytest.approx(2 / 5)
    assert summary.loc["student_sft", "accuracy"] == pytest.approx(0.5)
    # Gap = student - teacher (T*), per metric.
    assert summary.loc["td", "gap_accuracy"] == pytest.approx(-0.25)
    assert summary.loc["td", "gap_kappa"] == pytest.approx(7 / 9 - 1)
    assert summary.loc["td", "gap_macro_f1"] == pytest.approx(2 / 3 - 1)
    assert summary.loc["student_sft", "gap_accuracy"] == pytest.approx(-0.5)
    assert math.isnan(summary.loc["teacher-ckpt-2", "gap_accuracy"])
    # TD and SCD tie on accuracy (0.75); TD's kappa 7/9 beats SCD's 2/5. Only students compete.
    assert summary.loc[summary["best"], "eval_name"].tolist() == ["td"]
    # Missing evaluations stay as rows.
    assert summary.loc[["cd", "taid"], "status"].tolist() == ["not run", "not run"]
    assert summary.loc[["cd", "taid"], "accuracy"].isna().all()
    assert summary.loc["td_paced", "status"] == "ok"


def test_markdown_table_marks_best_student_and_lists_not_run_rows(built):
    _, root, result = built
    text = (root / "report.md").read_text(encoding="utf-8")
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name")
    table = text.split("## Results")[1].split("\n\n")[1].splitlines()
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in table[2:]}
    # TD right on 3 of 4 rows: the resampled accuracy is Binomial(4, 3/4) / 4, whose 2.5% and
    # 97.5% quantiles are 1/4 (P(X <= 0) = 0.004 < 0.025 <= P(X <= 1) = 0.051) and 1.
    interval = lambda m: f"{summary.loc['td', m]:.3f} [{summary.loc['td', m + '_low']:.3f}, {summary.loc['td', m + '_high']:.3f}]"  # noqa: E731
    assert cells["**TD (best)**"] == ["**eval/td.json**", "**0.750 [0.250, 1.000]**",
                                      f"**{interval('kappa')}**", f"**{interval('macro_f1')}**"]
    assert cells["Teacher (T* = ckpt-2)"] == ["eval/teacher-ckpt-2.json", *["1.000 [1.000, 1.000]"] * 3]
    assert cells["CD"][1:4] == ["not run"] * 3
    assert cells["TAID"][1:4] == ["not run"] * 3
    assert sum("best" in label for label in cells) == 1
    # The "what is missing" list says which command produces each absent evaluation.
    missing = text.split("## What is missing")[1]
    assert f"`scd-pipeline evaluate --model {root / 'students' / 'cd'}`" in missing
    assert "`scd-pipeline distill --method taid`, then" in missing
    assert [line.split(":")[0] for line in result.missing_evals] == ["CD", "TAID"]
    assert result.missing_plots == []


def test_intervals_paired_differences_and_the_conclusion(built):
    """Per-row accuracy differences (row - reference) on the four test rows:
    student_base - T* = (0, -1, -1, -1): only a resample of row 0 alone (p = 1/256 < 2.5%) reaches 0,
    so the interval excludes 0, but three discordant rows, all one way, have exact p = 2 / 2^3 =
    0.25: not resolved. TD - T* = (0, 0, 0, -1): 0 when row 3 is not drawn (p = 0.32), exact p 1: not
    resolved. SCD - TD = 0 on every row: [0, 0], not resolved."""
    _, root, _ = built
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name")
    assert (summary.loc["td", "accuracy_low"], summary.loc["td", "accuracy_high"]) == (0.25, 1.0)
    assert summary.loc["student_base", "delta_accuracy_vs_teacher"] == pytest.approx(-0.75)
    assert summary.loc["student_base", "delta_accuracy_vs_teacher_high"] == pytest.approx(-0.25)
    assert summary.loc["student_base", "delta_accuracy_vs_teacher_p"] == pytest.approx(0.25)
    assert summary.loc["student_base", "delta_accuracy_vs_teacher_family"] == "exploratory"
    assert bool(summary.loc["student_base", "delta_accuracy_vs_teacher_resolved"]) is False
    assert summary.loc["td", "delta_accuracy_vs_teacher"] == pytest.approx(-0.25)
    assert summary.loc["td", "delta_accuracy_vs_teacher_high"] == 0.0
    assert bool(summary.loc["td", "delta_accuracy_vs_teacher_resolved"]) is False
    assert summary.loc["td", "delta_accuracy_vs_sft"] == pytest.approx(0.25)   # (0, +1, 0, 0)
    assert summary.loc["td", "delta_accuracy_vs_sft_p"] == pytest.approx(1.0)  # one discordant row
    assert summary.loc["td", "delta_accuracy_vs_sft_family"] == "confirmatory"
    assert summary.loc["td", "delta_kappa_vs_sft_family"] == "exploratory"
    assert (summary.loc["scd", "delta_accuracy_vs_td"], summary.loc["scd", "delta_accuracy_vs_td_low"],
            summary.loc["scd", "delta_accuracy_vs_td_high"]) == (0.0, 0.0, 0.0)
    assert math.isnan(summary.loc["td", "delta_accuracy_vs_td"])               # not against itself
    assert math.isnan(summary.loc["student_base", "delta_accuracy_vs_td"])     # TD only for distilled
    text = (root / "report.md").read_text(encoding="utf-8")
    accuracy = text.split("## Differences")[1].split("### Kappa")[0]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in accuracy.splitlines() if r.startswith("| ")}
    assert rows["student_base"][0] == "-0.750 [-1.000, -0.250]"  # excludes 0, too few rows to decide
    assert rows["TD"][0].startswith("-0.250 [") and not rows["TD"][0].endswith("*")
    assert rows["SCD"] == [rows["SCD"][0], rows["SCD"][1], "+0.000 [+0.000, +0.000]"]
    # 14 accuracy comparisons: SFT vs T*; TD vs T*, SFT; SCD, SCD+AW, TD+PACED vs T*, SFT, TD;
    # student_base vs T*, SFT. The confirmatory 7: TD vs SFT; SCD, SCD+AW, TD+PACED vs SFT and TD.
    # 42 intervals in all (three metrics), 35 exploratory.
    conclusion = ("At n = 4 test rows and 1 seed per distilled method, none of the 7 confirmatory Accuracy "
                  "differences (each distilled method against the SFT student and TD, Holm-adjusted p < 0.05) "
                  "is resolved: the table cannot say that any method is better or worse than these references. "
                  "The report shows 42 difference intervals; the 35 outside that family are exploratory "
                  "(° where their own p < 0.05: with nothing different, about 1.8 of them would be marked by "
                  "chance), as are the per-tag and SFS/TFS tables. With one training seed per method a "
                  "difference compares two trained checkpoints, not two methods")
    assert conclusion in text
    assert html.escape(conclusion, quote=False) in (root / "report.html").read_text(encoding="utf-8")
    resolution = text.split("## Resolution")[1].split("##")[0]
    assert "from n ≥" in resolution and "this test set has n = 4" in resolution
    assert "unknown with one seed per method" in resolution


def test_sfs_tfs_outcome_of_every_model_on_the_test_split(built):
    """By NLL, SFS = rows 0 and 2 (SFT student 0.5 < T* 1.0; 0.1 < 0.25), TFS = rows 1 and 3.
    TD - T* in score = (0, 0, 0, -1): SFS part (0 + 0) / 4 = 0, TFS part (0 - 1) / 4 = -0.25;
    TD scores 1 on SFS, 0.5 on TFS. SCD+AW - T* = (0, -1, -1, 0): SFS part -1/4, TFS part -1/4.
    In NLL, TD (0.25, 0.5, 0.75, 1.0) - T* (1.0, 0.25, 0.25, 0.25) = (-0.75, 0.25, 0.5, 0.75):
    SFS part (-0.75 + 0.5) / 4 = -0.0625, TFS part (0.25 + 0.75) / 4 = 0.25."""
    _, root, _ = built
    everything = pd.read_csv(root / "sfs_tfs.csv")
    outcome = everything[everything["versus"] == "teacher"]
    point = outcome.set_index(["eval_name", "partition", "tag", "quantity", "part"])["estimate"]
    assert point["td", "nll", "all", "score", "advantage_sfs"] == pytest.approx(0.0)
    assert point["td", "nll", "all", "score", "deficit_tfs"] == pytest.approx(-0.25)
    assert point["td", "nll", "all", "score", "gap"] == pytest.approx(-0.25)
    assert point["td", "nll", "all", "score", "score_sfs"] == pytest.approx(1.0)
    assert point["td", "nll", "all", "score", "score_tfs"] == pytest.approx(0.5)
    assert point["scd_aw", "nll", "all", "score", "advantage_sfs"] == pytest.approx(-0.25)
    assert point["scd_aw", "nll", "all", "score", "deficit_tfs"] == pytest.approx(-0.25)
    assert point["td", "nll", "all", "nll", "advantage_sfs"] == pytest.approx(-0.0625)
    assert point["td", "nll", "all", "nll", "deficit_tfs"] == pytest.approx(0.25)
    # Per tag x (rows 0 = SFS, 1 = TFS): SCD+AW's d = (0, -1) over 2 rows -> 0 + -0.5.
    assert point["scd_aw", "nll", "x", "score", "deficit_tfs"] == pytest.approx(-0.5)
    assert point["scd_aw", "nll", "x", "score", "advantage_sfs"] == pytest.approx(0.0)
    # The identity holds for every model, partition, tag and quantity.
    wide = outcome.pivot_table(index=["eval_name", "partition", "tag", "quantity"], columns="part",
                               values="estimate")
    assert np.allclose(wide["advantage_sfs"] + wide["deficit_tfs"], wide["gap"])
    sizes = outcome.drop_duplicates(["partition", "tag"]).set_index(["partition", "tag"])
    assert sizes.loc[("nll", "all"), ["sfs_rows", "tfs_rows"]].tolist() == [2, 2]
    assert sizes.loc[("correct", "all"), ["sfs_rows", "tfs_rows"]].tolist() == [0, 4]  # T* never wrong
    assert set(outcome["model"]) >= {"TD", "SCD+AW", "SFT student", "Teacher (T* = ckpt-2)"}
    assert "ckpt-3" not in set(outcome["model"])  # non-best checkpoints are not report rows
    text = (root / "report.md").read_text(encoding="utf-8")
    section = text.split("## SFS / TFS outcome on the test split")[1].split("## Teacher checkpoints")[0]
    assert "### By per-sample NLL: SFT student < T*" in section and "SFS: 2 rows, TFS: 2 rows" in section
    by_nll = section.split("### By per-sample NLL")[1]
    td = next(r for r in by_nll.splitlines() if r.startswith("| TD "))
    assert [c.strip() for c in td.split("|")[2:4]] == ["1.000 [1.000, 1.000]", "0.500 [0.000, 1.000]"]
    # Held out: T* is right on every row and the SFT student on one row of each tag, so the other
    # row of a row's tag never favours the student: every row is TFS, and SCD+AW's TFS part minus
    # TD's is its whole difference to TD, 0.5 - 0.75.
    assert sizes.loc[("tag", "all"), ["sfs_rows", "tfs_rows"]].tolist() == [0, 4]
    versus = everything[everything["versus"] != "teacher"].set_index(["eval_name", "versus", "part"])["estimate"]
    assert versus["scd_aw", "td", "deficit_tfs"] == pytest.approx(-0.25)
    assert versus["scd_aw", "td", "advantage_sfs"] == pytest.approx(0.0)
    assert versus["td", "sft", "deficit_tfs"] == pytest.approx(0.75 - 0.5)
    assert ("td", "td", "gap") not in versus.index  # TD is not compared with itself
    held_out = section.split("### By the other rows of each tag (held out)")[1].split("### By per-sample NLL")[0]
    assert "TFS part − TD's" in held_out and "SFS: 0 rows, TFS: 4 rows" in held_out


def test_per_tag_accuracy_and_schedule_tables(built):
    _, root, _ = built
    text = (root / "report.md").read_text(encoding="utf-8")
    per_tag = text.split("## Per-tag Accuracy")[1].split("\n\n")[1].splitlines()
    assert [c.strip() for c in per_tag[0].split("|")[2:4]] == ["x (n=2)", "y (n=2)"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in per_tag[2:]}
    # Two rows per tag, one right: the resampled mean is 0, 1/2 or 1 -> interval [0, 1].
    assert rows["SFT student"] == ["0.500 [0.000, 1.000]"] * 2   # A A | C C
    assert rows["TD"] == ["1.000 [1.000, 1.000]", "0.500 [0.000, 1.000]"]  # A B | C C
    assert rows["SCD+AW"] == ["0.500 [0.000, 1.000]"] * 2        # A A | A D
    assert "CD" not in rows                                      # no evaluation, no per-tag numbers
    # SCD: chosen checkpoint per phase = argmin of the sums above, with both terms shown.
    scd = text.split("### SCD: c*")[1].split("\n\n")[1].splitlines()
    phases = [[c.strip() for c in r.split("|")[1:-1]] for r in scd[2:]]
    assert phases == [["1", "ckpt-1", "0.9000", "0.1000", "1.0000"],
                      ["2", "ckpt-3", "0.2000", "0.3000", "0.5000"],
                      ["3", "ckpt-2", "0.0000", "0.1000", "0.1000"]]
    overview = text.split("## Distillation schedules")[1].split("\n\n")[1].splitlines()
    assert [[c.strip() for c in r.split("|")[1:-1]] for r in overview[2:]] == [
        ["TD", "ckpt-2", "ckpt-2", "ckpt-2"], ["CD", "average", "average", "average"],
        ["SCD", "ckpt-1", "ckpt-3", "ckpt-2"], ["SCD+AW", "ckpt-1", "ckpt-3", "ckpt-2"]]


def test_subdomain_shares_per_tag(built):
    _, root, _ = built
    text = (root / "report.md").read_text(encoding="utf-8")
    section = text.split("## Student- and teacher-favoured subdomains")[1]
    table = [line for line in section.splitlines() if line.startswith("| ")][1:]
    shares = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table}
    assert shares == {"x": ["3", "0.3333", "0.6667"], "y": ["2", "1.0000", "0.0000"],
                      "all": ["5", "0.6000", "0.4000"]}
    assert "SFS share 0.6000 of 5 samples" in section


def test_every_plot_is_a_valid_png_and_embedded_in_self_contained_html(built):
    import matplotlib.image

    _, root, result = built
    names = sorted(p.name for p in (root / "plots").iterdir())
    assert names == ["aw_histogram.png", "results.png", "schedule_scd.png", "schedule_scd_aw.png",
                     "subdomain_shares.png", "teacher_checkpoints.png"]
    assert sorted(p.name for p in result.plots) == names
    for path in result.plots:
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 400
    markdown = (root / "report.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"\]\((plots/[^)]+)\)", markdown)) == [f"plots/{n}" for n in names]
    page = (root / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len(names)
    assert not re.search(r"<(script|link)\b|src=\"http|href=\"http", page)
    assert '<tr class="best"><td>TD (best)</td>' in page
    assert (root / "report.config.yaml").is_file()


def test_missing_artifacts_are_listed_and_stale_plots_removed(tmp_path):
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "task": "demo"})
    root = tmp_path / "results" / "demo"
    write_eval(root, "student_sft", PREDICTIONS["student_sft"])
    (root / "plots").mkdir(parents=True)
    (root / "plots" / "aw_histogram.png").write_bytes(PNG_MAGIC)  # left by an earlier run
    result = build_report(config)
    assert list((root / "plots").iterdir()) == []
    assert [line.split(":")[0] for line in result.missing_plots] == [
        "plots/results.png", "plots/teacher_checkpoints.png", "plots/schedule_scd.png",
        "plots/schedule_scd_aw.png", "plots/subdomain_shares.png", "plots/aw_histogram.png"]
    summary = pd.read_csv(root / "summary.csv")
    assert summary["status"].tolist() == ["not run", "ok", *["not run"] * 5]
    # No teacher: no gap, but the only evaluated student is still the best one.
    assert summary["gap_accuracy"].isna().all()
    assert summary["best"].tolist() == [False, True, *[False] * 5]
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "checkpoints.json not found, so T* is unknown" in text
    assert "plots/subdomain_shares.png: subdomains.json / subdomains.parquet not found" in text


def test_evaluation_older_than_its_model_is_flagged_stale(tmp_path):
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "task": "demo"})
    root = tmp_path / "results" / "demo"
    write_eval(root, "student_sft", PREDICTIONS["student_sft"])
    weights = root / "student_sft" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"retrained after the evaluation")
    evaluated_at = (root / "eval" / "student_sft.json").stat().st_mtime
    os.utime(weights, (evaluated_at + 60, evaluated_at + 60))
    build_report(config)
    missing = (root / "report.md").read_text(encoding="utf-8").split("## What is missing")[1]
    assert "warning: eval/student_sft.json is older than the weights in" in missing
    os.utime(weights, (evaluated_at - 60, evaluated_at - 60))
    build_report(config)
    assert "older than" not in (root / "report.md").read_text(encoding="utf-8")


def test_malformed_eval_json_is_a_one_line_error_naming_the_file(tmp_path):
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "task": "demo"})
    bad = tmp_path / "results" / "demo" / "eval" / "student_sft.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"name": "student_sft"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"student_sft\.json: not an evaluation result") as caught:
        build_report(config)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "results" / "demo" / "report.md").exists()


def test_schedule_reader_and_method_labels(tmp_path):
    write_json(tmp_path / "schedule.json", {"phases": [{"phase": 1, "checkpoint": 3}]})
    assert read_schedule(tmp_path / "schedule.json") == [{"phase": 1, "checkpoint": 3, "candidates": []}]
    write_json(tmp_path / "bad.json", {"phases": [{"phase": 1}]})
    with pytest.raises(DataError, match=r"bad\.json: not a schedule\.json with phases\[\]\.phase/checkpoint"):
        read_schedule(tmp_path / "bad.json")
    assert [method_label(m) for m in ("td", "scd_aw", "td+paced", "scd+aw")] == [
        "TD", "SCD+AW", "TD+PACED", "SCD+AW"]


def test_report_command(tmp_path):
    config, root = make_full_tree(tmp_path)
    outcome = CliRunner().invoke(app, ["report", "--task", "demo", "--results-dir", config["results_dir"]])
    assert outcome.exit_code == 0, outcome.output
    assert f"wrote {root / 'report.md'}" in outcome.output
    assert "6 plots" in outcome.output
    assert "not run: CD: run `scd-pipeline evaluate" in outcome.output
    assert (root / "summary.csv").is_file() and (root / "report.html").is_file()


def test_list_task_reports_exact_and_partial_f1(tmp_path):
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "task": "nrner"})
    root = tmp_path / "results" / "nrner"
    gold = [json.dumps(["fever", "cough"]), json.dumps(["rash"])]
    for name, predicted in (("student_sft", [["fever"], ["rash"]]), ("td", [["fever", "cough"], []]),
                            ("scd", [["high fever", "cough"], ["rash"]])):
        frame = pd.DataFrame({"sample_id": ["n0", "n1"], "tag": ["all", "all"], "gold": gold,
                              "prediction": [json.dumps(p) for p in predicted], "gold_logprob": [-1.0, -1.0],
                              "gold_tokens": [4, 4], "malformed": [False, False]})
        write_json(root / "eval" / f"{name}.json", json_safe({
            "name": name, "task": "nrner", "split": "test", "kind": "list", "n": 2,
            **summarise(frame, "list", [], "none")}))
    build_report(config)
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name")
    # Per document F1, averaged. sft: 2/3 and 1 -> 5/6. td: 1 and 0 -> 1/2.
    # scd exact: {high fever, cough} vs {fever, cough}: P = R = 1/2 -> 1/2, then 1 -> 3/4;
    # scd partial: "fever" is inside "high fever" -> 1, then 1 -> 1.
    assert summary["exact_f1"].dropna().to_dict() == pytest.approx({"student_sft": 5 / 6, "td": 0.5, "scd": 0.75})
    assert summary.loc["scd", "partial_f1"] == pytest.approx(1.0)
    assert summary.loc[summary["best"]].index.tolist() == ["student_sft"]  # ranked by exact F1
    assert "accuracy" not in summary.columns
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "| Exact F1 " in text and "## Per-tag Exact F1" in text


def test_best_student_ignores_teacher_and_other_rows_and_keeps_exact_ties():
    frame = pd.DataFrame({"role": ["teacher", "sft", "distilled", "distilled", "other"],
                          "status": ["ok", "ok", "ok", "ok", "ok"],
                          "accuracy": [0.9, 0.5, 0.7, 0.7, 0.8], "kappa": [0.9, 0.4, 0.6, 0.6, 0.8]})
    assert best_student_mask(frame, ["accuracy", "kappa"]).tolist() == [False, False, True, True, False]
    frame.loc[3, "kappa"] = float("nan")  # an undefined metric ranks lowest
    assert best_student_mask(frame, ["accuracy", "kappa"]).tolist() == [False, False, True, False, False]


# --- replicates --------------------------------------------------------------------------------

def test_replicated_students_show_mean_spread_and_missing_seeds(tmp_path):
    """replicates: 2. TD seed 0 right on 3 of 4 rows, seed 1 on 4: mean 0.875, sd over seeds
    sqrt(2 * 0.125^2 / 1) = 0.1768. SCD+AW has seed 0 only: its row uses that seed and the
    missing seed is listed with the command that makes it. The SFT student has two seeds too
    (student_sft, student_sft@seed-1: 2 and 3 of 4 right, mean 0.625)."""
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "task": "demo",
                                    "replicates": 2, "distill.methods": ["td", "scd_aw"]})
    root = tmp_path / "results" / "demo"
    write_checkpoints(root)
    for name, predictions in (("teacher-ckpt-2", GOLD), ("student_sft", ["A", "A", "C", "C"]),
                              ("student_sft@seed-1", ["A", "B", "C", "C"]),
                              ("td@seed-0", ["A", "B", "C", "C"]), ("td@seed-1", GOLD),
                              ("scd_aw@seed-0", ["A", "A", "A", "D"])):
        write_eval(root, name, predictions)
    result = build_report(config)
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name")
    assert summary.loc["td", ["accuracy", "accuracy_min", "accuracy_max", "seeds"]].tolist() == [0.875, 0.75, 1.0, 2]
    assert summary.loc["td", "accuracy_sd"] == pytest.approx(math.sqrt(2 * 0.125 ** 2))
    assert summary.loc["scd_aw", ["accuracy", "seeds"]].tolist() == [0.5, 1]
    assert summary.loc["student_sft", ["accuracy", "seeds"]].tolist() == [0.625, 2]
    # The interval resamples rows and seeds: a resample drawing seed 0 twice can fall to 0.25.
    assert summary.loc["td", "accuracy_low"] < 0.75 < 1.0 == summary.loc["td", "accuracy_high"]
    text = (root / "report.md").read_text(encoding="utf-8")
    table = text.split("## Results")[1].split("\n\n")[1].splitlines()
    assert "Seeds: Accuracy sd (min–max)" in table[0]
    td = next(r for r in table if r.startswith("| **TD (best)**"))
    assert "**eval/td@seed-{0,1}.json**" in td and "**2: 0.1768 (0.750–1.000)**" in td
    assert "Over 2 seeds a method's Accuracy varies with variance 0.03125" in text  # 2 * 0.125^2
    assert "SCD+AW: seed-1: run `scd-pipeline distill --method scd_aw --name scd_aw/seed-1" in text
    assert result.missing_evals == []
    assert "results.png" in {p.name for p in result.plots}
    for suffix in (".json", ".predictions.parquet"):
        (root / "eval" / f"student_sft@seed-1{suffix}").unlink()
    build_report(config)
    text = (root / "report.md").read_text(encoding="utf-8")
    assert ("SFT student: seed-1: run `scd-pipeline sft --role student --replicate 1`, then `scd-pipeline "
            "evaluate --model results/demo/student_sft_seeds/seed-1 --name student_sft@seed-1`") in text.replace(
                str(tmp_path) + "/", "")
    # Read with replicates: 1 (e.g. by report --tasks with another task's config), the seed
    # folders on disk still make TD a replicated row.
    for seed in (0, 1):
        (root / "students" / "td" / f"seed-{seed}").mkdir(parents=True)
    build_report({**config, "replicates": 1})
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name")
    assert summary.loc["td", ["accuracy", "seeds"]].tolist() == [0.875, 2]


# --- the paper's Table 1 across tasks ----------------------------------------------------------

def test_multitask_table_in_the_paper_shape(tmp_path):
    """Each task's column is the metric its T* was chosen by: demo accuracy, smdis macro-F1.
    demo: T* 1.0, SFT 0.5, TD 0.75, SCD+AW 0.5 (TAID not run). smdis (gold A B A B), macro-F1 =
    mean over A and B of 2TP / (2TP + FP + FN): T* (A B A A) (4/5 + 2/3) / 2 = 11/15; SFT (A A A A)
    (2/3 + 0) / 2 = 1/3; TD (A B B A) (1/2 + 1/2) / 2 = 1/2; TAID (B A A A) (2/5 + 0) / 2 = 1/5;
    SCD+AW 1. Averages: T* 13/15, SFT 5/12, TD 5/8, SCD+AW 3/4; TAID has no demo result, so no
    average. Best student per column: TD (demo), SCD+AW (smdis and the average); the teacher
    never competes."""
    config = load_config(overrides={"results_dir": str(tmp_path / "results"),
                                    "distill.methods": ["td", "taid", "scd_aw"]})
    demo, smdis = tmp_path / "results" / "demo", tmp_path / "results" / "smdis"
    write_checkpoints(demo)
    write_checkpoints(smdis, "macro_f1")
    for name, predictions in (("teacher-ckpt-2", GOLD), ("student_sft", ["A", "A", "C", "C"]),
                              ("td", ["A", "B", "C", "C"]), ("scd_aw", ["A", "A", "A", "D"])):
        write_eval(demo, name, predictions)
    binary = ["A", "B", "A", "B"]
    for name, predictions in (("teacher-ckpt-2", ["A", "B", "A", "A"]), ("student_sft", ["A", "A", "A", "A"]),
                              ("td", ["A", "B", "B", "A"]), ("taid", ["B", "A", "A", "A"]),
                              ("scd_aw", binary)):
        write_eval(smdis, name, predictions, task="smdis", gold=binary, weights="none")
    outcome = CliRunner().invoke(app, ["report", "--tasks", "demo,smdis", "--set",
                                       f"results_dir={config['results_dir']}", "--set",
                                       "distill.methods=[td, taid, scd_aw]"])
    assert outcome.exit_code == 0, outcome.output
    out = tmp_path / "results" / "tasks-demo+smdis"
    assert f"wrote {out / 'report.md'}" in outcome.output
    assert "not run: demo: TAID" in outcome.output
    table = pd.read_csv(out / "summary.csv").set_index("model")
    assert table.index.tolist() == ["Teacher (T*)", "SFT student", "TD", "TAID", "SCD+AW"]
    assert table["demo"].tolist()[:3] == [1.0, 0.5, 0.75] and math.isnan(table.loc["TAID", "demo"])
    assert table["smdis"].tolist() == pytest.approx([11 / 15, 1 / 3, 1 / 2, 1 / 5, 1.0])
    assert table.loc[["Teacher (T*)", "SFT student", "TD", "SCD+AW"], "average"].tolist() == pytest.approx(
        [13 / 15, 5 / 12, 5 / 8, 3 / 4])
    assert math.isnan(table.loc["TAID", "average"])
    assert table.index[table["demo_best"]].tolist() == ["TD"]
    assert table.index[table["smdis_best"]].tolist() == ["SCD+AW"]
    assert table.index[table["average_best"]].tolist() == ["SCD+AW"]
    assert (table["smdis_low"] <= table["smdis"]).all() and (table["smdis"] <= table["smdis_high"]).all()
    assert table.loc["TD", "average_low"] <= 0.625 <= table.loc["TD", "average_high"]
    assert (table["demo_metric"].unique().tolist(), table["smdis_metric"].unique().tolist()) == (
        ["accuracy"], ["macro_f1"])
    text = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| Model"))
    assert [c.strip() for c in header.split("|")[1:-1]] == ["Model", "demo (Accuracy)", "smdis (Macro-F1)", "Average"]
    scd_aw = next(line for line in text.splitlines() if line.startswith("| SCD+AW"))
    assert [c.strip().startswith("**") for c in scd_aw.split("|")[2:-1]] == [False, True, True]
    taid = next(line for line in text.splitlines() if line.startswith("| TAID"))
    assert [c.strip() for c in taid.split("|")[2:-1]][0::2] == ["not run", "not run"]
    assert '<td><b>' in (out / "report.html").read_text(encoding="utf-8")
    # A method evaluated for one task only (not in the config's methods): its other cell says
    # "not run" and the missing list says so too, not "nothing is missing".
    (demo / "students" / "ioa").mkdir(parents=True)
    write_eval(demo, "ioa", GOLD)
    again = CliRunner().invoke(app, ["report", "--tasks", "demo,smdis", "--set",
                                     f"results_dir={config['results_dir']}", "--set",
                                     "distill.methods=[td, taid, scd_aw]"])
    assert again.exit_code == 0, again.output
    missing = (out / "report.md").read_text(encoding="utf-8").split("## What is missing")[1]
    assert "smdis: IOA: no evaluation" in missing and "demo: IOA" not in missing
    assert missing.count("demo: TAID") == 1


def test_report_tasks_option_refuses_an_empty_list_in_one_line(tmp_path):
    outcome = CliRunner().invoke(app, ["report", "--tasks", " , ", "--results-dir", str(tmp_path)])
    assert outcome.exit_code == 2
    assert outcome.output.strip() == "error: --tasks ' , ': name at least one task, e.g. --tasks demo,smdis"
    outcome = CliRunner().invoke(app, ["report", "--tasks", "demo,smids", "--results-dir", str(tmp_path)])
    assert outcome.exit_code == 2
    assert outcome.output.startswith("error: config key tasks.1: 'smids' is not one of [")


def test_evaluation_without_predictions_keeps_its_numbers_and_says_why_it_has_no_interval(tmp_path):
    config = load_config(overrides={"results_dir": str(tmp_path / "results"), "distill.methods": ["td"]})
    root = tmp_path / "results" / "demo"
    write_checkpoints(root)
    for name, predictions in (("teacher-ckpt-2", GOLD), ("student_sft", ["A", "A", "C", "C"]),
                              ("td", ["A", "B", "C", "C"])):
        write_eval(root, name, predictions)
    (root / "eval" / "td.predictions.parquet").unlink()  # evaluated before predictions were kept
    build_report(config)
    summary = pd.read_csv(root / "summary.csv").set_index("eval_name")
    assert summary.loc["td", "accuracy"] == 0.75 and math.isnan(summary.loc["td", "accuracy_low"])
    assert summary.loc["student_sft", "accuracy_low"] == 0.0  # the others still have intervals
    missing = (root / "report.md").read_text(encoding="utf-8").split("## What is missing")[1]
    assert f"TD: no intervals: {root / 'eval' / 'td.predictions.parquet'} not found" in missing


def test_teacher_checkpoint_table_shows_the_test_column_of_evaluated_checkpoints_only(built):
    # The workflow evaluates T* alone on the test split; the tree has ckpt-2 (T*) and ckpt-3
    # evaluated, ckpt-1 not: a dash, and one sentence on how to add it (not a "not run" failure).
    _, root, _ = built
    text = (root / "report.md").read_text(encoding="utf-8")
    section = text.split("## Teacher checkpoints")[1].split("\n## ")[0]
    rows = {r.split("|")[1].strip().strip("*"): [c.strip().strip("*") for c in r.split("|")[2:-1]]
            for r in section.splitlines() if r.startswith("| ") and "ckpt-" in r}
    # ckpt-3 right on 3 of 4 rows: P(resampled mean <= 1/4) = 4 (1/4)^3 (3/4) + (1/4)^4 = 0.051 >= 0.025,
    # P(mean = 0) = 0.004 < 0.025, so the 2.5% percentile is 0.25.
    assert [rows[k][-1] for k in ("ckpt-1", "ckpt-2 (T*)", "ckpt-3")] == [
        "—", "1.000 [1.000, 1.000]", "0.750 [0.250, 1.000]"]
    assert "the workflow evaluates only T* on the test split" in section
    assert "not run" not in section


def test_the_held_out_split_gets_its_own_table_beside_the_test_one(tmp_path):
    """eval/heldout/ (prepare-data's extra held-out split): the same models, their own intervals and
    confirmatory sentence, below the test table, which keeps its numbers."""
    config, root = make_full_tree(tmp_path)
    before = build_report(config).markdown.read_text()
    gold = GOLD * 2  # 8 held-out rows
    held = {"teacher-ckpt-2": gold, "student_sft": ["A", "A", "C", "C"] * 2,
            "td": ["A", "B", "C", "D", "A", "B", "C", "C"], "scd": ["B"] * 8}
    for name, predictions in held.items():
        write_eval(root, name, predictions, gold=gold, folder="eval/heldout", split="heldout")
    text = build_report(config).markdown.read_text()
    main = text.split("### The same models on the held-out split")[0]

    def first_table(markdown: str) -> list[str]:
        lines = markdown.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
        return lines[start:end]

    # the test split's table keeps its numbers
    assert first_table(main.split("## Results")[1]) == first_table(before.split("## Results")[1])
    section = text.split("### The same models on the held-out split")[1].split("\n## ")[0]
    assert "8 rows of the task's pool that no model trained or was validated on" in section
    rows = {line.split("|")[1].strip(" *").removesuffix(" (best)"): line for line in first_table(section)}
    # by hand: TD misses one row of 8, the SFT student four, SCD ("B" everywhere) hits the two B rows
    assert "**0.875 [" in rows["TD"] and "| 0.500 [" in rows["SFT student"] and "| 0.250 [" in rows["SCD"]
    assert "not run" in rows["CD"] and "eval/heldout/td.json" in rows["TD"]
    assert "At n = 8 held-out rows" in section
