"""prepare-data: every source, the splits, prompts/completions, truncation, balancing, bad input.

Uses the shared JMED-LLM files (../shared/data/jmed-llm) and the byte-level tokenizer of
scd_pipeline.engine.tiny (one token per UTF-8 byte, ChatML template, end of turn <|im_end|>).
"""

from __future__ import annotations

import ast
import functools
import http.server
import json
import shutil
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine import splits
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.splits import Example
from scd_pipeline.engine.tokenization import load_tokenizer
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.stages import prepare_data as data_stage
from scd_pipeline.stages.prepare_data import (
    balance_rows,
    heldout_rows,
    heldout_size,
    inverse_frequency_weights,
    prepare_data,
    proportional_quotas,
    select_splits,
)
from scd_pipeline.stages.prepare_data import sources as data_sources
from scd_pipeline.stages.prepare_data.sources import load_jmed

END = "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"

# Hand-checked with pandas on the shared files: test questions found in each `all` file
# (smdis's all file is complete; the others are the first 200 rows of their pools).
JMED_EXPECTED = {  # task: (test rows in the all file, all-file rows, kind)
    "crade": (26, 200, "choice"),
    "rrtnm": (64, 200, "choice"),
    "smdis": (100, 15360, "choice"),
    "jmmlu_med": (29, 200, "choice"),
    "nrner": (14, 200, "list"),
}


def make_config(results: Path, task: str = "smdis", **data) -> dict:
    overrides = {"task": task, "results_dir": str(results)}
    overrides.update({f"data.{key}": value for key, value in data.items()})
    return load_config(None, overrides)


def read_splits(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("train", "val", "test")}


def user_text(prompt: str) -> str:
    """The user turn of a rendered ChatML prompt."""
    return prompt.split("<|im_start|>user\n", 1)[1].rsplit(f"{END}\n{GENERATION_PROMPT}", 1)[0]


@pytest.fixture(scope="module")
def smdis_source(jmed_root):
    """smdis loaded once (15,360 pool rows)."""
    return load_jmed("smdis", jmed_root)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# JMED-LLM loaders


@pytest.mark.parametrize("task", sorted(JMED_EXPECTED))
def test_jmed_loader_drops_test_rows_from_the_pool(jmed_root, task):
    in_pool, pool_rows, kind = JMED_EXPECTED[task]
    source = load_jmed(task, jmed_root)
    test_questions = set(pd.read_csv(jmed_root / "test" / f"{task}.csv")["question"])

    assert len(source.test) == 100 and source.kind == kind
    assert source.pool_info == {"pool_file_rows": pool_rows, "test_rows_excluded_from_pool": in_pool,
                                "test_rows_not_in_pool": 100 - in_pool}
    assert len(source.pool) == pool_rows - in_pool
    assert not test_questions & {example.body for example in source.pool}
    assert {example.body for example in source.test} == test_questions
    assert len({e.sample_id for e in source.test + source.pool}) == 100 + len(source.pool)


def test_choice_question_lists_the_rows_own_options(jmed_root):
    source = load_jmed("rrtnm", jmed_root)
    csv = pd.read_csv(jmed_root / "test" / "rrtnm.csv", keep_default_na=False)
    by_tag = {example.tag: (index, example) for index, example in enumerate(source.test)}
    index, m_row = by_tag["M"]  # M rows have two options, T rows five
    assert m_row.choices == ("A", "B") and by_tag["T"][1].choices == tuple("ABCDE")
    expected = (f"{csv.question[index]}\n\nA. {csv.optionA[index]}\nB. {csv.optionB[index]}\n\n"
                "Answer with the letter of the correct option (A or B).")
    assert m_row.question == expected
    assert m_row.answer == csv.answer[index] and m_row.label == "AB".index(csv.answer[index])
    assert m_row.sample_id == f"rrtnm-test-{index:03d}"


def test_nrner_answer_is_a_json_list(jmed_root):
    source = load_jmed("nrner", jmed_root)
    csv = pd.read_csv(jmed_root / "test" / "nrner.csv")
    first = source.test[0]
    assert json.loads(first.answer) == ast.literal_eval(csv.answer[0])
    assert first.kind == "list" and first.choices == () and first.label == -1
    assert first.question.startswith(csv.question[0]) and "JSON list" in first.question


@pytest.mark.parametrize("task", ["jmmlu_med", "nrner"])
def test_prepare_jmed_writes_splits_without_test_leakage(tmp_path, tiny_tokenizer_dir, jmed_root, task):
    in_pool, pool_rows, _ = JMED_EXPECTED[task]
    config = make_config(tmp_path, task, jmed_root=str(jmed_root), max_length=4096)
    out = prepare_data(config, tiny_tokenizer_dir)

    splits = read_splits(out)
    pool = pool_rows - in_pool
    n_val = round(0.1 * pool)
    assert {name: len(frame) for name, frame in splits.items()} == {
        "train": pool - n_val, "val": n_val, "test": 100}
    test_questions = set(splits["test"].question)
    assert not test_questions & (set(splits["train"].question) | set(splits["val"].question))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pool"]["test_rows_excluded_from_pool"] == in_pool
    assert manifest["test_questions_in_train_val"] == 0
    # the held-out split (data.heldout_size: auto asks 1,000 rows of a JMED-LLM task): training and
    # validation use the whole of this 200-row pool, so it is empty, and the manifest says why
    assert manifest["split_sizes"] == {**{name: len(frame) for name, frame in splits.items()}, "heldout": 0}
    assert manifest["heldout"]["asked"] == 1000 and manifest["heldout"]["note"].startswith("fewer rows than asked")
    assert len(pd.read_parquet(out / "heldout.parquet")) == 0
    assert [s["path"] for s in manifest["sources"]] == [
        str(jmed_root / "test" / f"{task}.csv"), str(jmed_root / "all" / f"{task}_head200.csv")]
    assert (out / "prepare-data.config.yaml").is_file()


# ---------------------------------------------------------------------------------------------
# Prompts, completions, manifest


def test_completion_is_the_answer_then_end_of_turn(tmp_path, tiny_tokenizer_dir, jmed_root, tokenizer):
    config = make_config(tmp_path, jmed_root=str(jmed_root), max_train_samples=40, val_fraction=0.01)
    out = prepare_data(config, tiny_tokenizer_dir)
    frame = read_splits(out)["train"]

    for row in frame.itertuples():
        assert tokenizer.decode(row.completion_ids) == row.answer + END
        assert list(row.prompt_ids) == tokenizer(row.prompt, add_special_tokens=False).input_ids
        # prompt + completion is exactly the chat template's rendering of the whole exchange
        conversation = [{"role": "system", "content": config["data"]["system_prompt"]},
                        {"role": "user", "content": row.question},
                        {"role": "assistant", "content": row.answer}]
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == row.prompt + row.answer + END + "\n"
        assert list(row.choices) == ["A", "B"] and row.label == "AB".index(row.answer)
    assert not frame.truncated.any() and (frame.weight == 1.0).all()
    assert str(frame.label.dtype) == "int32" and str(frame.weight.dtype) == "float32"


def test_manifest_records_counts_lengths_and_fingerprints(tmp_path, tiny_tokenizer_dir, jmed_root, tokenizer):
    config = make_config(tmp_path, jmed_root=str(jmed_root), max_train_samples=40, val_fraction=0.01)
    out = prepare_data(config, tiny_tokenizer_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    splits = read_splits(out)

    test = splits["test"]
    assert manifest["label_counts"]["test"] == {"A": 50, "B": 50}  # smdis test is 50/50
    assert manifest["tag_counts"]["test"] == dict(sorted(Counter(test.tag).items()))
    totals = [len(p) + len(c) for p, c in zip(test.prompt_ids, test.completion_ids, strict=True)]
    stats = manifest["token_lengths"]["test"]["total"]
    assert stats["min"] == min(totals) and stats["max"] == max(totals)
    assert stats["mean"] == round(sum(totals) / len(totals), 2)
    assert manifest["token_lengths"]["test"]["completion"] == {
        "min": 2, "mean": 2.0, "median": 2.0, "p95": 2.0, "max": 2}  # letter + <|im_end|>
    assert manifest["tokenizer"]["vocab_size"] == 259 and manifest["tokenizer"]["end_of_turn_token"] == END
    assert manifest["dataset_fingerprint"] == data_stage.dataset_fingerprint(out)
    assert manifest["config"]["data"]["max_train_samples"] == 40


# ---------------------------------------------------------------------------------------------
# Truncation


def test_truncation_cuts_the_question_start_and_keeps_options_and_answer(
        tmp_path, tiny_tokenizer_dir, jmed_root, tokenizer):
    config = make_config(tmp_path, "crade", jmed_root=str(jmed_root), max_length=2048, heldout_size=0)
    out = prepare_data(config, tiny_tokenizer_dir)
    splits = read_splits(out)
    manifest = json.loads((out / "manifest.json").read_text())

    test = splits["test"]
    assert manifest["truncated_rows"] == {name: int(frame.truncated.sum()) for name, frame in splits.items()}
    assert 0 < test.truncated.sum() < len(test)  # crade test rows run ~1,000 to ~4,000 byte tokens
    for row in test.itertuples():
        total = len(row.prompt_ids) + len(row.completion_ids)
        assert total <= 2048
        assert tokenizer.decode(row.completion_ids) == row.answer + END  # the answer is never cut
        options_start = row.question.index("\n\nA. ")
        body, options = row.question[:options_start], row.question[options_start:]
        shown = user_text(row.prompt)
        assert shown.endswith(options) and row.prompt.endswith(GENERATION_PROMPT)
        if row.truncated:
            kept = shown[: -len(options)]
            assert body.endswith(kept) and len(kept) < len(body)
            assert total >= 2048 - 4  # cut at the token level: at most a split character lost
        else:
            assert shown == row.question


def test_prompt_that_cannot_fit_stops_with_one_line_and_writes_nothing(
        tmp_path, tiny_tokenizer_dir, jmed_root):
    # rrtnm's T rows list five long options (~1,200 byte tokens without the report)
    config = make_config(tmp_path / "results", "rrtnm", jmed_root=str(jmed_root), max_length=512)
    with pytest.raises(DataError) as error:
        prepare_data(config, tiny_tokenizer_dir)
    message = str(error.value)
    assert "\n" not in message and "rrtnm" in message and "line " in message
    assert "column 'question'" in message and "data.max_length" in message
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# Splits, balancing, capping (on the smdis pool: 12.5% "A", test 50/50)


def label_counts(rows) -> dict[str, int]:
    return dict(sorted(Counter(row.answer for row in rows).items()))


def smdis_data(**changes) -> dict:
    data = {"val_fraction": 0.1, "balance": "none", "max_train_samples": None}
    data.update(changes)
    return data


def test_val_split_is_stratified_by_label(smdis_source):
    splits = select_splits(smdis_source, smdis_data(), seed=0)
    # pool: 15,260 rows, 1,864 "A"; val: round(0.1 * 15,260) = 1,526 rows, 1,526 * 1,864 / 15,260 = 186.4 "A"
    assert label_counts(splits["val"]) == {"A": 186, "B": 1340}
    assert label_counts(splits["train"]) == {"A": 1678, "B": 12056}
    assert len(splits["test"]) == 100


def test_undersample_keeps_the_rarest_labels_count(smdis_source):
    train = select_splits(smdis_source, smdis_data(balance="undersample"), seed=0)["train"]
    assert label_counts(train) == {"A": 1678, "B": 1678}
    assert len({row.sample_id for row in train}) == len(train)


def test_oversample_repeats_minority_rows_with_distinct_ids(smdis_source):
    train = select_splits(smdis_source, smdis_data(balance="oversample"), seed=0)["train"]
    assert label_counts(train) == {"A": 12056, "B": 12056}
    repeats = [row for row in train if row.repeat]
    assert len(repeats) == 12056 - 1678 and {row.answer for row in repeats} == {"A"}
    assert len({row.sample_id for row in train}) == len(train)
    originals = {row.sample_id: row for row in train if not row.repeat}
    for row in repeats[:50]:
        base, number = row.sample_id.rsplit("#r", 1)
        assert originals[base].question == row.question and int(number) == row.repeat >= 1
    # 10,378 extra rows over 1,678 originals: each repeated 6 times, 310 of them a 7th time
    assert max(row.repeat for row in repeats) == 7
    assert sum(row.repeat == 7 for row in repeats) == 10378 - 6 * 1678


def test_balance_on_a_hand_sized_case():
    rows = [Example(f"s{i}", "t", "choice", "q", "", ("A", "B"), label, "AB".index(label), "x")
            for i, label in enumerate("AAAAB")]
    assert [r.sample_id for r in balance_rows(rows, "oversample", seed=0)] == [
        "s0", "s1", "s2", "s3", "s4", "s4#r1", "s4#r2", "s4#r3"]
    under = balance_rows(rows, "undersample", seed=0)
    assert len(under) == 2 and sorted(r.answer for r in under) == ["A", "B"]
    assert balance_rows(rows, "none", seed=0) == rows


def test_inverse_frequency_weights_have_mean_one():
    # 3 x label 0, 1 x label 1: N / (K * n) = 4 / (2 * 3) and 4 / (2 * 1)
    assert inverse_frequency_weights([0, 0, 0, 1]) == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])


def test_weights_mode_writes_inverse_frequency_weights(tmp_path, tiny_tokenizer_dir, jmed_root):
    config = make_config(tmp_path, jmed_root=str(jmed_root), balance="weights", max_train_samples=50,
                         val_fraction=0.01)
    splits = read_splits(prepare_data(config, tiny_tokenizer_dir))
    train = splits["train"]
    # cap 50 keeps the pool's shares: 50 * 1,678 / 13,734 = 6.1 -> 6 "A", 44 "B"
    assert Counter(train.answer) == {"A": 6, "B": 44}
    expected = {"A": 50 / (2 * 6), "B": 50 / (2 * 44)}
    assert train.weight.tolist() == pytest.approx([expected[a] for a in train.answer], rel=1e-6)
    assert train.weight.mean() == pytest.approx(1.0, rel=1e-6)
    assert (splits["val"].weight == 1.0).all() and (splits["test"].weight == 1.0).all()


def test_max_train_samples_caps_after_balancing(smdis_source):
    train = select_splits(smdis_source, smdis_data(balance="undersample", max_train_samples=64), 0)["train"]
    assert label_counts(train) == {"A": 32, "B": 32}
    capped = select_splits(smdis_source, smdis_data(max_train_samples=100), 0)["train"]
    # 100 * 1,678 / 13,734 = 12.2 -> 12 "A"; 87.8 -> 88 "B" (largest remainder)
    assert label_counts(capped) == {"A": 12, "B": 88}
    assert proportional_quotas({"A": 1678, "B": 12056}, 100) == {"A": 12, "B": 88}


def test_the_held_out_split_takes_unused_pool_rows_with_the_tests_label_shares(smdis_source):
    """smdis: the test is 50 "A" / 50 "B", the pool 1,864 "A" / 13,396 "B". With 100 training rows
    the held-out split takes 200 of the other rows, 100 of each label, none shared with train or
    val (by id or question)."""
    splits = select_splits(smdis_source, smdis_data(max_train_samples=100), 0, heldout=200)
    held = splits["heldout"]
    assert label_counts(held) == {"A": 100, "B": 100} == {k: 2 * v for k, v in label_counts(splits["test"]).items()}
    used = splits["train"] + splits["val"]
    assert not {r.sample_id for r in held} & {r.sample_id for r in used}
    assert not {r.question for r in held} & {r.question for r in used}
    assert select_splits(smdis_source, smdis_data(max_train_samples=100), 0, heldout=200)["heldout"] == held  # seeded
    assert "heldout" not in select_splits(smdis_source, smdis_data(max_train_samples=100), 0)


def test_held_out_rows_by_hand():
    rows = [Example(f"s{i}", "t", "choice", f"q{i}", "", ("A", "B", "C"), label, "ABC".index(label), "x")
            for i, label in enumerate("AAAAABBBC")]
    test = [Example(f"t{i}", "t", "choice", f"t{i}", "", ("A", "B", "C"), label, 0, "x") for i, label in enumerate("AABC")]
    # test shares 2:1:1 of 4 rows -> quotas A 2, B 1, C 1; a label short of rows gives what it has
    picked = heldout_rows(rows, test, 4, "choice", seed=0)
    assert Counter(r.answer for r in picked) == {"A": 2, "B": 1, "C": 1}
    assert [r.sample_id for r in picked] == sorted((r.sample_id for r in picked), key=lambda s: int(s[1:]))
    assert Counter(r.answer for r in heldout_rows(rows, test + test[3:] * 4, 8, "choice", seed=0)) == {
        "A": 2, "B": 1, "C": 1}  # C's quota 5 meets one C row
    assert len(heldout_rows(rows, test, 3, "list", seed=0)) == 3 and heldout_rows([], test, 3, "choice", 0) == []


def test_held_out_size_auto_is_for_the_jmed_tasks():
    assert heldout_size(load_config(overrides={"task": "smdis"})) == 1000
    assert heldout_size(load_config(overrides={"task": "demo"})) == 0
    assert heldout_size(load_config(overrides={"task": "demo", "data.heldout_size": 50})) == 50
    assert heldout_size(load_config(overrides={"task": "crade", "data.heldout_size": 0})) == 0


def test_balancing_a_list_task_is_a_config_error(jmed_root):
    with pytest.raises(ConfigError, match="data.balance"):
        select_splits(load_jmed("nrner", jmed_root), smdis_data(balance="undersample"), 0)


def test_same_config_gives_the_same_bytes(tmp_path, tiny_tokenizer_dir, jmed_root, smdis_source):
    outs = []
    for name in ("a", "b"):
        config = make_config(tmp_path / name, jmed_root=str(jmed_root), max_train_samples=60,
                             val_fraction=0.01, balance="oversample")
        outs.append(prepare_data(config, tiny_tokenizer_dir))
    for split in ("train", "val", "test"):
        assert (outs[0] / f"{split}.parquet").read_bytes() == (outs[1] / f"{split}.parquet").read_bytes()
    assert data_stage.dataset_fingerprint(outs[0]) == data_stage.dataset_fingerprint(outs[1])
    # the seed, not chance, decides the rows
    data = smdis_data(max_train_samples=60, val_fraction=0.01, balance="oversample")
    ids = {seed: [row.sample_id for row in select_splits(smdis_source, data, seed)["train"]]
           for seed in (0, 1)}
    assert ids[0] == pd.read_parquet(outs[0] / "train.parquet").sample_id.tolist()
    assert ids[0] != ids[1]


# ---------------------------------------------------------------------------------------------
# Demo, PubMedQA, custom


SHARES = {"single_cue": 0.4, "agreeing_cues": 0.3, "temporal": 0.15, "conflicting": 0.15}


def test_demo_takes_the_last_rows_as_test(tmp_path, tiny_tokenizer_dir, monkeypatch):
    def generate_demo(n_examples, seed, tag_shares):
        return [{"sample_id": f"demo-{i:05d}", "tag": "t", "question": f"case {i}: {'x' * 30}\nA. no\nB. yes\nAnswer.",
                 "choices": ["A", "B"], "answer": "AB"[i % 2], "label": i % 2} for i in range(n_examples)]

    monkeypatch.setitem(sys.modules, "scd_pipeline.stages.prepare_data.demo", types.SimpleNamespace(generate_demo=generate_demo))
    config = make_config(tmp_path, "demo", demo={"n_examples": 30, "test_size": 10, "seed": 1,
                                                 "tag_shares": SHARES}, max_length=50, system_prompt="")
    splits = read_splits(prepare_data(config, tiny_tokenizer_dir))
    assert splits["test"].sample_id.tolist() == [f"demo-{i:05d}" for i in range(20, 30)]
    assert len(splits["val"]) == 2 and len(splits["train"]) == 18
    # 50 tokens cannot hold the whole case: its text is cut from the start, the options kept
    row = splits["train"].iloc[0]
    options = "\nA. no\nB. yes\nAnswer."
    shown = user_text(row.prompt)
    assert row.truncated and shown.endswith(options)
    kept = shown[: -len(options)]
    assert row.question == f"case 0: {'x' * 30}{options}"
    assert f"case 0: {'x' * 30}".endswith(kept) and 0 < len(kept) < 30


def test_demo_with_the_real_generator(tmp_path, tiny_tokenizer_dir):
    demo = pytest.importorskip("scd_pipeline.stages.prepare_data.demo")
    config = make_config(tmp_path, "demo", demo={"n_examples": 60, "test_size": 20, "seed": 7,
                                                 "tag_shares": SHARES})
    splits = read_splits(prepare_data(config, tiny_tokenizer_dir))
    generated = demo.generate_demo(60, 7, SHARES)
    assert splits["test"].sample_id.tolist() == [row["sample_id"] for row in generated[40:]]
    assert splits["test"].question.tolist() == [row["question"] for row in generated[40:]]
    assert {name: len(frame) for name, frame in splits.items()} == {"train": 36, "val": 4, "test": 20}


def write_pubmedqa(folder: Path, decisions: dict[str, str], truth: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = {pmid: {"QUESTION": f"Does drug {pmid} work?", "CONTEXTS": [f"Study {pmid}.", "Results."],
                      "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": [], "YEAR": "2010",
                      "reasoning_required_pred": "yes", "reasoning_free_pred": "yes",
                      "final_decision": decision, "LONG_ANSWER": "..."}
               for pmid, decision in decisions.items()}
    (folder / "ori_pqal.json").write_text(json.dumps(entries), encoding="utf-8")
    (folder / "test_ground_truth.json").write_text(json.dumps(truth), encoding="utf-8")
    return folder


def test_pubmedqa_test_pmids_come_from_the_ground_truth(tmp_path, tiny_tokenizer_dir):
    decisions = {"101": "yes", "102": "no", "103": "maybe", "104": "yes", "105": "no", "106": "yes"}
    folder = write_pubmedqa(tmp_path / "pqa", decisions, {"105": "no", "106": "maybe"})
    config = make_config(tmp_path / "results", "pubmedqa", pubmedqa_dir=str(folder), val_fraction=0.25)
    splits = read_splits(prepare_data(config, tiny_tokenizer_dir))

    test = splits["test"]
    assert test.sample_id.tolist() == ["pubmedqa-105", "pubmedqa-106"]
    assert test.answer.tolist() == ["B", "C"]  # yes=A, no=B, maybe=C; 106 from the ground truth
    assert len(splits["train"]) == 3 and len(splits["val"]) == 1
    assert test.question[0] == ("Context:\nStudy 105.\nResults.\nQuestion: Does drug 105 work?\n\n"
                                "A. yes\nB. no\nC. maybe\n\n"
                                "Answer with the letter of the correct option (A, B or C).")


def write_custom(folder: Path, fmt: str, rows: list[dict], name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{fmt}"
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def custom_rows(prefix: str, n: int) -> list[dict]:
    return [{"uid": f"{prefix}{i}", "text": f"Is {prefix}{i} even?", "yes": "even", "no": "odd",
             "gold": "A" if i % 2 == 0 else "B", "group": "parity"} for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_custom_choice_files(tmp_path, tiny_tokenizer_dir, fmt):
    train = write_custom(tmp_path / "in", fmt, custom_rows("tr", 20), "train")
    test = write_custom(tmp_path / "in", fmt, custom_rows("te", 4), "test")
    custom = {"kind": "choice", "train": str(train), "val": None, "test": str(test),
              "fields": {"id": "uid", "question": "text", "answer": "gold", "tag": "group",
                         "options": ["yes", "no"]}}
    config = make_config(tmp_path / "results", "custom", custom=custom, val_fraction=0.2)
    splits = read_splits(prepare_data(config, tiny_tokenizer_dir))

    assert {name: len(frame) for name, frame in splits.items()} == {"train": 16, "val": 4, "test": 4}
    test_frame = splits["test"]
    assert test_frame.sample_id.tolist() == ["custom-te0", "custom-te1", "custom-te2", "custom-te3"]
    assert test_frame.answer.tolist() == ["A", "B", "A", "B"] and set(test_frame.tag) == {"parity"}
    assert test_frame.question[1] == ("Is te1 even?\n\nA. even\nB. odd\n\n"
                                      "Answer with the letter of the correct option (A or B).")


def test_custom_list_task_with_explicit_val(tmp_path, tiny_tokenizer_dir, tokenizer):
    rows = [{"text": f"Note {i}: fever and cough.", "items": ["fever", "cough"][: i % 3]} for i in range(6)]
    paths = {split: write_custom(tmp_path / "in", "jsonl", rows, split) for split in ("train", "val", "test")}
    custom = {"kind": "list", **{split: str(path) for split, path in paths.items()},
              "fields": {"id": None, "question": "text", "answer": "items", "tag": None, "options": []}}
    out = prepare_data(make_config(tmp_path / "results", "custom", custom=custom), tiny_tokenizer_dir)
    splits = read_splits(out)
    assert {name: len(frame) for name, frame in splits.items()} == {"train": 6, "val": 6, "test": 6}
    row = splits["val"].iloc[1]
    assert row.sample_id == "custom-val-00001" and row.tag == "all" and row.label == -1
    assert row.answer == '["fever"]' and tokenizer.decode(row.completion_ids) == '["fever"]' + END


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming file, row and column; nothing written

HEADER = "tag,question,optionA,optionB,answer\n"


def smdis_csv(questions: list[str], answers: str) -> str:
    return HEADER + "".join(f'fever,"{q}",yes,no,{a}\n' for q, a in zip(questions, answers, strict=True))


def write_jmed(root: Path, task: str, test_text: str | bytes, pool_text: str | bytes) -> Path:
    for folder, text in (("test", test_text), ("all", pool_text)):
        path = root / folder / f"{task}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


GOOD_TEST = smdis_csv(["q1", "q2", "q3"], "ABA")
GOOD_POOL = smdis_csv([f"q{i}" for i in range(1, 13)], "ABABABABABAB")
NRNER_HEADER = "tag,question,answer\n"

BAD_INPUTS = {
    # case: (task, test file, pool file, failing file, expected fragments); "line N" is the line
    # an editor shows (the header is line 1), for data rows and parser errors alike
    "missing column": ("smdis", GOOD_TEST.replace(",answer\n", ",gold\n", 1), GOOD_POOL, "test",
                       ["header row", "column 'answer'", "missing"]),
    "unknown letter": ("smdis", smdis_csv(["q1", "q2", "q3"], "ABF"), GOOD_POOL, "test",
                       ["line 4,", "column 'answer'", "'F'", "A, B"]),
    "empty answer": ("smdis", GOOD_TEST, GOOD_POOL.replace(",no,B\n", ",no,\n", 1), "all",
                     ["line 3,", "column 'answer'", "''"]),
    "empty file": ("smdis", GOOD_TEST, "", "all", ["empty file"]),
    "header only": ("smdis", HEADER, GOOD_POOL, "test", ["no data rows"]),
    "duplicate question": ("smdis", GOOD_TEST, smdis_csv(["q1", "q2", "q9", "q2"], "ABAB"), "all",
                           ["line 5,", "column 'question'", "duplicate", "line 3)"]),
    "bad encoding": ("smdis", GOOD_TEST, HEADER.encode() + 'fever,"熱がある",yes,no,A\n'.encode("cp932"),
                     "all", ["line 2", "not UTF-8"]),
    "not a csv": ("smdis", GOOD_TEST, GOOD_POOL + 'fever,"q99",yes,no,A,extra,extra\n', "all",
                  ["line 14", "not a valid CSV"]),
    "option gap": ("smdis", GOOD_TEST.replace('"q2",yes,no', '"q2",,no', 1), GOOD_POOL, "test",
                   ["line 3,", "column 'optionA'", "empty option"]),
    "unparsable list": ("nrner", NRNER_HEADER + "d,\"n1\",\"['fever', 'cough'\"\n",
                        NRNER_HEADER + "d,\"n2\",\"['fever']\"\n", "test",
                        ["line 2,", "column 'answer'", "not a list of strings"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_row_column_and_writes_nothing(tmp_path, tiny_tokenizer_dir, case):
    task, test_text, pool_text, failing, fragments = BAD_INPUTS[case]
    root = write_jmed(tmp_path / "jmed", task, test_text, pool_text)
    config = make_config(tmp_path / "results", task, jmed_root=str(root))
    with pytest.raises(DataError) as error:
        prepare_data(config, tiny_tokenizer_dir)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(root / failing / f"{task}.csv"))
    for fragment in fragments:
        assert fragment in message
    assert not (tmp_path / "results").exists()


def test_csv_lines_count_quoted_line_breaks_and_blank_lines(tmp_path, tiny_tokenizer_dir):
    # Row 2's question spans two lines and a blank line follows: the bad answer is on line 6.
    test = HEADER + 'fever,"q1",yes,no,A\nfever,"q2\nsecond line",yes,no,B\n\nfever,"q3",yes,no,F\n'
    root = write_jmed(tmp_path / "jmed", "smdis", test, GOOD_POOL)
    with pytest.raises(DataError, match=r"smdis\.csv: line 6, column 'answer': answer 'F'"):
        prepare_data(make_config(tmp_path / "results", jmed_root=str(root)), tiny_tokenizer_dir)


@pytest.mark.parametrize("value, fragment", [
    (42, "a number (42) where text is expected"),
    (True, "true/false (True) where text is expected"),
    (["q"], "a list where text is expected"),
    (None, "missing text"),
    ("  ", "empty text"),
])
def test_a_question_that_is_not_text_says_what_it_is(tmp_path, tiny_tokenizer_dir, value, fragment):
    rows = custom_rows("a", 4)
    rows[1]["text"] = value
    train = write_custom(tmp_path / "in", "jsonl", rows, "train")
    test = write_custom(tmp_path / "in", "jsonl", custom_rows("b", 2), "test")
    custom = {"kind": "choice", "train": str(train), "val": None, "test": str(test),
              "fields": {"id": "uid", "question": "text", "answer": "gold", "tag": None,
                         "options": ["yes", "no"]}}
    with pytest.raises(DataError) as error:
        prepare_data(make_config(tmp_path / "results", "custom", custom=custom), tiny_tokenizer_dir)
    assert str(error.value) == f"{train}: line 2, column 'text': {fragment}" + (
        "; write it as a string (in JSON, in quotes)" if "where text" in fragment else "")


def overlapping_custom(folder: Path) -> dict:
    """Custom files whose test question b1 is also in the training file (on line 3)."""
    rows = custom_rows("a", 6)
    rows[2]["text"] = "Is b1 even?"
    train = write_custom(folder, "jsonl", rows, "train")
    test = write_custom(folder, "jsonl", custom_rows("b", 3), "test")
    return {"kind": "choice", "train": str(train), "val": None, "test": str(test),
            "fields": {"id": "uid", "question": "text", "answer": "gold", "tag": None,
                       "options": ["yes", "no"]}}


def test_test_questions_in_the_training_data_are_a_warning_by_default(tmp_path, tiny_tokenizer_dir, capsys):
    custom = overlapping_custom(tmp_path / "in")
    out = prepare_data(make_config(tmp_path / "results", "custom", custom=custom, val_fraction=0.2),
                       tiny_tokenizer_dir)
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [f"warning: 1 train/val row repeats a test question (first: {custom['train']}: "
                       f"line 3 = {custom['test']}: line 2); test scores will be optimistic "
                       "(data.allow_test_overlap: false refuses this)"]
    assert json.loads((out / "manifest.json").read_text())["test_questions_in_train_val"] == 1


def test_test_questions_in_the_training_data_are_refused_when_not_allowed(tmp_path, tiny_tokenizer_dir):
    custom = overlapping_custom(tmp_path / "in")
    config = make_config(tmp_path / "results", "custom", custom=custom, val_fraction=0.2,
                         allow_test_overlap=False)
    with pytest.raises(DataError, match=r"^1 train/val row repeats a test question \(first: .*train\.jsonl: "
                       r"line 3 = .*test\.jsonl: line 2\); remove them .* data\.allow_test_overlap: true"):
        prepare_data(config, tiny_tokenizer_dir)
    assert not (tmp_path / "results").exists()


def test_bad_pubmedqa_decision_names_the_pmid(tmp_path, tiny_tokenizer_dir):
    folder = write_pubmedqa(tmp_path / "pqa", {"1": "yes", "2": "perhaps", "3": "no"}, {"3": "no"})
    config = make_config(tmp_path / "results", "pubmedqa", pubmedqa_dir=str(folder))
    with pytest.raises(DataError, match=r"ori_pqal\.json: row 2 \(PMID 2\), column 'final_decision': 'perhaps'"):
        prepare_data(config, tiny_tokenizer_dir)
    assert not (tmp_path / "results").exists()


def test_duplicate_custom_ids_are_refused(tmp_path, tiny_tokenizer_dir):
    rows = custom_rows("a", 3)
    rows[2]["uid"] = "a0"
    train = write_custom(tmp_path / "in", "jsonl", rows, "train")
    test = write_custom(tmp_path / "in", "jsonl", custom_rows("b", 2), "test")
    custom = {"kind": "choice", "train": str(train), "val": None, "test": str(test),
              "fields": {"id": "uid", "question": "text", "answer": "gold", "tag": None,
                         "options": ["yes", "no"]}}
    with pytest.raises(DataError, match=r"train\.jsonl: line 3, column 'uid': duplicate id"):
        prepare_data(make_config(tmp_path / "results", "custom", custom=custom), tiny_tokenizer_dir)


def test_cli_prints_one_error_line_and_exits_2(tmp_path, tiny_tokenizer_dir):
    root = write_jmed(tmp_path / "jmed", "smdis", GOOD_TEST, GOOD_POOL + 'fever,"q99",yes,no,A,x,y\n')
    result = CliRunner().invoke(app, ["prepare-data", "--task", "smdis", "--jmed-root", str(root),
                                      "--tokenizer", str(tiny_tokenizer_dir),
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "smdis.csv: line 14" in lines[0]
    written = [str(p.relative_to(tmp_path / "results")) for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert written == [".locks/smdis/data.lock"]  # the stage's lock (scd_pipeline.engine.locking), no data


def test_cli_writes_the_data_directory(tmp_path, tiny_tokenizer_dir, jmed_root):
    result = CliRunner().invoke(app, ["prepare-data", "--task", "smdis", "--jmed-root", str(jmed_root),
                                      "--tokenizer", str(tiny_tokenizer_dir), "--max-train-samples", "20",
                                      "--set", "data.val_fraction=0.01",
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "smdis" / "data"
    assert sorted(p.name for p in out.iterdir()) == [
        "heldout.parquet", "manifest.json", "prepare-data.config.yaml", "test.parquet", "train.parquet", "val.parquet"]
    assert len(pd.read_parquet(out / "train.parquet")) == 20
    held = pd.read_parquet(out / "heldout.parquet")  # smdis: 1,000 rows as 50/50 as its official test
    assert len(held) == 1000 and Counter(held["answer"]) == {"A": 500, "B": 500}
    assert json.loads((out / "manifest.json").read_text())["split_sizes"]["heldout"] == 1000


# ---------------------------------------------------------------------------------------------
# Download from the upstream layout (a local HTTP server on 127.0.0.1)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def upstream(tmp_path, jmed_root, monkeypatch):
    """A copy of the shared smdis files in the upstream layout, served over loopback HTTP."""
    served = tmp_path / "upstream"
    (served / "datasets" / "all").mkdir(parents=True)
    shutil.copy(jmed_root / "test" / "smdis.csv", served / "datasets" / "smdis.csv")
    shutil.copy(jmed_root / "all" / "smdis.csv", served / "datasets" / "all" / "SMDIS.csv")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(data_sources, "JMED_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    yield served
    server.shutdown()
    server.server_close()


def test_download_fetches_verifies_and_prepares(tmp_path, tiny_tokenizer_dir, jmed_root, upstream):
    root = tmp_path / "jmed"
    config = make_config(tmp_path / "results", jmed_root=str(root), jmed_download=True,
                         max_train_samples=20, val_fraction=0.01)
    out = prepare_data(config, tiny_tokenizer_dir)
    for relative in ("test/smdis.csv", "all/smdis.csv"):
        assert (root / relative).read_bytes() == (jmed_root / relative).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][1]["sha256"] == data_sources.JMED_KNOWN_SHA256["datasets/all/SMDIS.csv"]


def test_download_with_a_wrong_checksum_writes_nothing(tmp_path, tiny_tokenizer_dir, upstream):
    (upstream / "datasets" / "smdis.csv").write_text(GOOD_TEST, encoding="utf-8")  # tampered
    root = tmp_path / "jmed"
    config = make_config(tmp_path / "results", jmed_root=str(root), jmed_download=True)
    with pytest.raises(DataError, match=r"datasets/smdis\.csv: sha256 .* does not match"):
        prepare_data(config, tiny_tokenizer_dir)
    assert not root.exists() and not (tmp_path / "results").exists()


def test_download_offline_is_one_line(tmp_path, tiny_tokenizer_dir, monkeypatch):
    with socket_closed_port() as port:
        monkeypatch.setattr(data_sources, "JMED_BASE_URL", f"http://127.0.0.1:{port}")
        config = make_config(tmp_path / "results", jmed_root=str(tmp_path / "jmed"), jmed_download=True)
        with pytest.raises(DataError, match="cannot download .*data.jmed_download: false") as error:
            prepare_data(config, tiny_tokenizer_dir)
    assert "\n" not in str(error.value)


class socket_closed_port:
    """A loopback port with nothing listening (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Tokenizers without a chat template or without a system role


def test_plain_prompt_without_chat_template(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.chat_template = None
    render = splits.make_prompt_renderer(tokenizer, "Be brief.")
    assert render("Q?") == "Be brief.\n\nQ?\nAnswer: "
    assert splits.end_of_turn_id(tokenizer) == tokenizer.eos_token_id


def test_system_prompt_is_folded_when_the_template_rejects_it(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    render = splits.make_prompt_renderer(tokenizer, "Be brief.")
    assert render("Q?") == "<|im_start|>user\nBe brief.\n\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert splits.end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(END)
