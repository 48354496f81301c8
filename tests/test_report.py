"""The report stage on a fake results/{task}/ tree (no models): the paper-shaped table with the
best student and the gaps to T* checked by hand, summary.csv, per-tag accuracy, schedules, the
subdomain shares, valid PNGs, a self-contained HTML page, and honest "not run" / missing lists.

Eval jsons are built like ``evaluate.evaluate`` builds them: the predictions frame goes through
``evaluate.summarise`` and ``json_safe``. The test split has four samples, gold A, B, C, D,
tags x, x, y, y (demo task: linear-weighted kappa over the letter order).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.config import load_config
from scd_pipeline.errors import DataError
from scd_pipeline.io import json_safe, write_json
from scd_pipeline.methods import parse_method
from scd_pipeline.report import (
    ReportResult,
    best_student_mask,
    build_report,
    method_label,
    read_schedule,
)
from scd_pipeline.schedules import scd_choose
from scd_pipeline.scoring import summarise
from scd_pipeline.subdomains import subdomain_table, summarize_subdomains

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


def write_eval(root: Path, name: str, predictions: list[str]) -> None:
    """eval/{name}.json in the format ``evaluate.evaluate`` writes (predictions -> summarise)."""
    frame = pd.DataFrame({"sample_id": [f"demo-{i}" for i in range(4)], "tag": TAGS, "gold": GOLD,
                          "prediction": predictions, "gold_logprob": [-0.5, -1.0, -1.5, -2.0],
                          "gold_tokens": [2, 2, 2, 2], "malformed": [False] * 4})
    summary = summarise(frame, "choice", LETTERS, "linear")
    write_json(root / "eval" / f"{name}.json", json_safe({
        "name": name, "model": f"results/demo/{name}", "task": "demo", "split": "test", "kind": "choice",
        "n": len(frame), **summary, "kappa_weights": "linear", "categories": LETTERS,
        "malformed_outputs": 0, "seconds": 0.1, "samples_per_s": 40.0, "device": "cpu", "dtype": "float32"}))


def write_checkpoints(root: Path) -> None:
    """teacher/checkpoints.json as sft writes it: three checkpoints, T* = 2."""
    entries = [{"index": k, "path": f"ckpt-{k}", "step": 10 * k, "epoch": k / 3, "train_loss": 2.0 / k,
                "val_loss": loss, "val_metric": metric, "best": k == 2}
               for k, loss, metric in ((1, 1.5, 0.40), (2, 1.0, 0.80), (3, 1.1, 0.75))]
    write_json(root / "teacher" / "checkpoints.json", {"metric": "accuracy", "best_index": 2,
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
    table = text.split("## Results")[1].split("\n\n")[1].splitlines()
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in table[2:]}
    assert cells["**TD (best)**"] == ["**eval/td.json**", "**0.7500**", "**0.7778**", "**0.6667**",
                                      "**-0.2500**", "**-0.2222**", "**-0.3333**"]
    assert cells["Teacher (T* = ckpt-2)"] == ["eval/teacher-ckpt-2.json", "1.0000", "1.0000", "1.0000",
                                              "—", "—", "—"]
    assert cells["CD"][1:4] == ["not run"] * 3
    assert cells["TAID"][1:4] == ["not run"] * 3
    assert sum("best" in label for label in cells) == 1
    # The "what is missing" list says which command produces each absent evaluation.
    missing = text.split("## What is missing")[1]
    assert f"`scd-pipeline evaluate --model {root / 'students' / 'cd'}`" in missing
    assert "`scd-pipeline distill --method taid`, then" in missing
    assert [line.split(":")[0] for line in result.missing_evals] == ["CD", "TAID"]
    assert result.missing_plots == []


def test_per_tag_accuracy_and_schedule_tables(built):
    _, root, _ = built
    text = (root / "report.md").read_text(encoding="utf-8")
    per_tag = text.split("## Per-tag Accuracy")[1].split("\n\n")[1].splitlines()
    assert per_tag[0].split("|")[2:4] == [" x (n=2) ", " y (n=2) "]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in per_tag[2:]}
    assert rows["SFT student"] == ["0.5000", "0.5000"]   # A A | C C
    assert rows["TD"] == ["1.0000", "0.5000"]            # A B | C C
    assert rows["SCD+AW"] == ["0.5000", "0.5000"]        # A A | A D
    assert "CD" not in rows                              # no evaluation, no per-tag numbers
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
    assert names == ["aw_histogram.png", "schedule_scd.png", "schedule_scd_aw.png",
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
        "plots/teacher_checkpoints.png", "plots/schedule_scd.png", "plots/schedule_scd_aw.png",
        "plots/subdomain_shares.png", "plots/aw_histogram.png"]
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
    assert "5 plots" in outcome.output
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
