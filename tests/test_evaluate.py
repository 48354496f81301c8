"""Evaluation: letter ranking by log-likelihood, list generation and parsing, outputs on disk.

The helpers at the top build a tiny prepared task (docs/ARTIFACTS.md columns) with the byte-level
tokenizer; test_sft.py uses them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from scd_pipeline.engine import scoring as scoring_module
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.naming import default_eval_name
from scd_pipeline.engine.scoring import parse_list_output
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama
from scd_pipeline.errors import DataError, ModelError
from scd_pipeline.math.metrics import exact_f1, partial_f1
from scd_pipeline.stages.evaluate import PREDICTION_COLUMNS, evaluate

LETTERS = ["A", "B", "C", "D"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP threads make each step ~10x slower; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tiny task builders (shared with test_sft.py) -------------------------------------------------

def choice_rows(tokenizer, start: int, count: int, answer_in_prompt: bool = False) -> list[dict]:
    """Rows of a 4-way ordered task; label = i % 4, tag = t{i % 2}.

    ``answer_in_prompt`` ends each prompt with the gold letter (for a model that copies it).
    """
    rows = []
    for i in range(start, start + count):
        label = i % 4
        question = f"Case {i}: severity {label}. A) none B) mild C) moderate D) severe"
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        if answer_in_prompt:
            prompt += f"Answer: {LETTERS[label]}"
        completion = tokenizer.encode(LETTERS[label], add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append({"sample_id": f"demo-{i:05d}", "tag": f"t{i % 2}", "kind": "choice",
                     "question": question, "choices": LETTERS, "answer": LETTERS[label],
                     "label": label, "prompt": prompt,
                     "prompt_ids": tokenizer.encode(prompt, add_special_tokens=False),
                     "completion_ids": completion, "truncated": False, "weight": 1.0})
    return rows


def list_rows(tokenizer, answers: list[list[str]]) -> list[dict]:
    rows = []
    for i, answer in enumerate(answers):
        question = f"List the findings of note {i}."
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        text = json.dumps(answer)
        rows.append({"sample_id": f"nrner-{i:03d}", "tag": "all", "kind": "list", "question": question,
                     "choices": [], "answer": text, "label": -1, "prompt": prompt,
                     "prompt_ids": tokenizer.encode(prompt, add_special_tokens=False),
                     "completion_ids": tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id],
                     "truncated": False, "weight": 1.0})
    return rows


def write_splits(results: Path, splits: dict[str, list[dict]], task: str = "demo") -> Path:
    data = results / task / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        pd.DataFrame(rows).to_parquet(data / f"{name}.parquet", index=False)
    return data


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_choice_task(results: Path, sizes: tuple[int, int, int] = (16, 8, 8)) -> Path:
    """train/val/test splits plus models/{teacher,student}_base (tiny random Llamas)."""
    tokenizer = byte_level_tokenizer()
    n_train, n_val, n_test = sizes
    write_splits(results, {"train": choice_rows(tokenizer, 0, n_train),
                           "val": choice_rows(tokenizer, n_train, n_val),
                           "test": choice_rows(tokenizer, n_train + n_val, n_test)})
    save_model(tiny_llama(tokenizer, seed=0), tokenizer, results / "models" / "teacher_base")
    save_model(tiny_llama(tokenizer, seed=1, num_layers=2), tokenizer, results / "models" / "student_base")
    return results


def tiny_config(results: Path, task: str = "demo", **overrides) -> dict:
    return load_config(None, {"results_dir": str(results), "task": task, **overrides})


# --- reference computations ----------------------------------------------------------------------

def dense_scores(model, frame: pd.DataFrame, letter_ids: dict[str, int]) -> tuple[list[float], list[str]]:
    """Per sample, from a full-vocabulary forward of its own unpadded sequence: the gold completion's
    log-likelihood and the option letter with the highest logit at the last prompt position."""
    gold_logprobs, predictions = [], []
    with torch.no_grad():
        for prompt, completion, choices in zip(frame["prompt_ids"], frame["completion_ids"], frame["choices"],
                                               strict=True):
            sequence = torch.tensor([list(prompt) + list(completion)])
            logprobs = torch.log_softmax(model(input_ids=sequence).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
            gold_logprobs.append(float(logprobs[positions, torch.tensor(list(completion))].sum()))
            scores = [float(logprobs[len(prompt) - 1, letter_ids[c]]) for c in choices]
            predictions.append(choices[scores.index(max(scores))])
    return gold_logprobs, predictions


def copy_last_token_model(tokenizer):
    """A tiny Llama that predicts the token it has just read: attention and MLP outputs are zeroed,
    so the residual stream is the input embedding, and the letters get orthogonal embeddings."""
    model = tiny_llama(tokenizer, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        for axis, letter in enumerate(LETTERS):
            token = tokenizer.encode(letter, add_special_tokens=False)[0]
            embeddings[token] = 0.0
            embeddings[token, axis] = 1.0
    return model


# --- tests ---------------------------------------------------------------------------------------

def test_parse_list_output_reads_json_or_python_lists_and_flags_the_rest():
    assert parse_list_output('["fever", "cough"]') == ["fever", "cough"]
    assert parse_list_output("Entities: ['胸痛', 'fever'] done.") == ["胸痛", "fever"]
    assert parse_list_output("[1, 2.5]") == ["1", "2.5"]
    assert parse_list_output("[]") == []
    assert parse_list_output('["fever", "cough"') is None       # cut off by max_new_tokens
    assert parse_list_output("fever, cough") is None
    assert parse_list_output('[["nested"]]') is None
    assert parse_list_output("[true]") is None


def test_default_eval_name_follows_the_artifact_layout():
    assert default_eval_name("results/demo/teacher/ckpt-3") == "teacher-ckpt-3"
    assert default_eval_name("results/demo/teacher/ckpt-3/") == "teacher-ckpt-3"
    assert default_eval_name("results/demo/student_sft") == "student_sft"
    assert default_eval_name("results/models/teacher_base") == "teacher_base"
    assert default_eval_name("results/demo/students/scd_aw") == "scd_aw"


def test_model_forced_to_the_gold_letters_scores_one(tmp_path):
    tokenizer = byte_level_tokenizer()
    write_splits(tmp_path, {"test": choice_rows(tokenizer, 0, 12, answer_in_prompt=True)})
    model_dir = save_model(copy_last_token_model(tokenizer), tokenizer, tmp_path / "copycat")

    report = json.loads(evaluate(tiny_config(tmp_path), model_dir).read_text())

    assert report["name"] == "copycat" and report["n"] == 12 and report["kappa_weights"] == "linear"
    assert {k: report["metrics"][k] for k in ("accuracy", "kappa", "macro_f1")} == {
        "accuracy": 1.0, "kappa": 1.0, "macro_f1": 1.0}
    assert set(report["per_tag"]) == {"t0", "t1"}
    for tag in report["per_tag"].values():
        assert tag["n"] == 6 and tag["accuracy"] == 1.0 and tag["kappa"] == 1.0


def test_the_held_out_split_is_scored_into_its_own_folder_and_an_empty_one_says_so(tmp_path):
    tokenizer = byte_level_tokenizer()
    rows = choice_rows(tokenizer, 0, 12, answer_in_prompt=True)
    write_splits(tmp_path, {"test": rows[:4], "heldout": rows[4:]})
    model_dir = save_model(copy_last_token_model(tokenizer), tokenizer, tmp_path / "copycat")
    out = evaluate(tiny_config(tmp_path), model_dir, split="heldout")
    assert out == tmp_path / "demo" / "eval" / "heldout" / "copycat.json"
    report = json.loads(out.read_text())
    assert report["split"] == "heldout" and report["n"] == 8 and report["metrics"]["accuracy"] == 1.0
    assert not (tmp_path / "demo" / "eval" / "copycat.json").exists()  # the test split's stays its own
    pd.DataFrame(rows).iloc[:0].to_parquet(tmp_path / "demo" / "data" / "heldout.parquet")  # no rows left for it
    (tmp_path / "demo" / "data" / "manifest.json").write_text("{}")
    empty = json.loads(evaluate(tiny_config(tmp_path), model_dir, split="heldout").read_text())
    assert empty["n"] == 0 and "no rows" in empty["empty"]
    assert len(pd.read_parquet(tmp_path / "demo" / "eval" / "heldout" / "copycat.predictions.parquet")) == 0
    (tmp_path / "demo" / "data" / "heldout.parquet").unlink()
    with pytest.raises(DataError, match="no held-out split .*data.heldout_size"):
        evaluate(tiny_config(tmp_path), model_dir, split="heldout")


def test_choice_scores_equal_a_dense_forward(tmp_path):
    tokenizer = byte_level_tokenizer()
    write_splits(tmp_path, {"test": choice_rows(tokenizer, 0, 10)})
    model = tiny_llama(tokenizer, seed=5)
    model_dir = save_model(model, tokenizer, tmp_path / "models" / "teacher_base")

    out = evaluate(tiny_config(tmp_path, **{"evaluate.batch_size": 4}), model_dir)

    predictions = pd.read_parquet(out.with_name("teacher_base.predictions.parquet"))
    assert list(predictions.columns) == PREDICTION_COLUMNS
    frame = pd.read_parquet(tmp_path / "demo" / "data" / "test.parquet")
    letter_ids = {letter: tokenizer.encode(letter, add_special_tokens=False)[0] for letter in LETTERS}
    gold_logprob, predicted = dense_scores(model.eval(), frame, letter_ids)
    assert predictions["gold_logprob"].tolist() == pytest.approx(gold_logprob, abs=1e-4)
    assert predictions["prediction"].tolist() == predicted
    assert predictions["gold"].tolist() == frame["answer"].tolist()
    assert predictions["score"].tolist() == [float(p == g) for p, g in zip(predicted, frame["answer"], strict=True)]
    assert predictions["gold_tokens"].tolist() == frame["completion_ids"].map(len).tolist()
    report = json.loads(out.read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(
        sum(p == g for p, g in zip(predicted, frame["answer"], strict=True)) / 10)
    # loss: per-sample mean NLL over the completion tokens (letter + end of turn), averaged
    assert report["metrics"]["loss"] == pytest.approx(
        sum(-lp / len(c) for lp, c in zip(gold_logprob, frame["completion_ids"], strict=True)) / 10, abs=1e-5)


def test_lora_adapter_directory_is_evaluated_as_its_merged_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = byte_level_tokenizer()
    write_splits(tmp_path, {"test": choice_rows(tokenizer, 0, 8)})
    base_dir = save_model(tiny_llama(tokenizer, seed=7), tokenizer, tmp_path / "models" / "teacher_base")
    base_model, _ = load_model(base_dir)
    adapted = get_peft_model(base_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    adapted.peft_config["default"].base_model_name_or_path = str(base_dir)
    adapted.save_pretrained(tmp_path / "adapter")  # adapter weights only, no tokenizer
    save_model(adapted.merge_and_unload(), tokenizer, tmp_path / "merged")
    config = tiny_config(tmp_path)

    scores = {}
    for name in ("adapter", "merged"):
        evaluate(config, tmp_path / name)
        scores[name] = pd.read_parquet(tmp_path / "demo" / "eval" / f"{name}.predictions.parquet")
    evaluate(config, base_dir)
    base = pd.read_parquet(tmp_path / "demo" / "eval" / "teacher_base.predictions.parquet")

    assert scores["adapter"]["gold_logprob"].tolist() == pytest.approx(scores["merged"]["gold_logprob"].tolist(), abs=1e-5)
    assert (scores["adapter"]["gold_logprob"] - base["gold_logprob"]).abs().max() > 1e-3


def test_list_task_generates_parses_and_counts_malformed_output_as_empty(tmp_path):
    tokenizer = byte_level_tokenizer()
    answers = [[], ["fever"], ["chest pain", "cough"], ["rash"]]
    write_splits(tmp_path, {"test": list_rows(tokenizer, answers)}, task="nrner")
    model_dir = save_model(tiny_llama(tokenizer, seed=2), tokenizer, tmp_path / "random")
    config = tiny_config(tmp_path, task="nrner", **{"evaluate.max_new_tokens": 6})

    report = json.loads(evaluate(config, model_dir).read_text())

    # A random byte model writes no list: every output is malformed and scored as []; only the
    # document whose gold list is empty counts as right (F1 1), the others 0 -> 1/4.
    assert report["kind"] == "list" and report["malformed_outputs"] == 4
    assert report["metrics"]["exact_f1"] == pytest.approx(0.25)
    assert report["metrics"]["partial_f1"] == pytest.approx(0.25)
    predictions = pd.read_parquet(tmp_path / "nrner" / "eval" / "random.predictions.parquet")
    assert predictions["prediction"].tolist() == ["[]"] * 4
    # score: the one document's exact F1 (only the empty gold list is matched by [])
    assert predictions["score"].tolist() == [float(json.loads(g) == []) for g in predictions["gold"]]


def test_list_task_with_generation_forced_to_gold_scores_one(tmp_path, monkeypatch):
    tokenizer = byte_level_tokenizer()
    answers = [[], ["fever"], ["chest pain", "cough"], ["rash"]]
    rows = list_rows(tokenizer, answers)
    write_splits(tmp_path, {"test": rows}, task="nrner")
    model_dir = save_model(tiny_llama(tokenizer, seed=2), tokenizer, tmp_path / "forced")
    gold_by_prompt = {tuple(r["prompt_ids"]): f"Findings: {r['answer']}" for r in rows}
    monkeypatch.setattr(scoring_module, "generate_texts",
                        lambda model, tok, prompts, *args: [(gold_by_prompt[tuple(p)], True) for p in prompts])

    report = json.loads(evaluate(tiny_config(tmp_path, task="nrner"), model_dir).read_text())

    assert report["malformed_outputs"] == 0
    assert report["metrics"]["exact_f1"] == 1.0 and report["metrics"]["partial_f1"] == 1.0
    predictions = pd.read_parquet(tmp_path / "nrner" / "eval" / "forced.predictions.parquet")
    gold = [json.loads(g) for g in predictions["gold"]]
    assert exact_f1(gold, [json.loads(p) for p in predictions["prediction"]]) == 1.0
    assert partial_f1(gold, [json.loads(p) for p in predictions["prediction"]]) == 1.0


def test_model_with_another_tokenizer_than_the_data_is_refused(tmp_path):
    tokenizer = byte_level_tokenizer()
    data = write_splits(tmp_path, {"test": choice_rows(tokenizer, 0, 4)})
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"vocab_size": 49152, "sha256": "0" * 64}}))
    model_dir = save_model(tiny_llama(tokenizer), tokenizer, tmp_path / "m")
    with pytest.raises(ModelError, match="not the one .*manifest.json was prepared with"):
        evaluate(tiny_config(tmp_path), model_dir)


def test_cli_evaluate_writes_outputs_and_reports_errors_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from scd_pipeline.cli import app

    tokenizer = byte_level_tokenizer()
    write_splits(tmp_path, {"val": choice_rows(tokenizer, 0, 4)})
    model_dir = save_model(tiny_llama(tokenizer), tokenizer, tmp_path / "teacher" / "ckpt-2")
    runner = CliRunner()

    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--task", "demo", "--split", "val",
                                 "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "eval" / "teacher-ckpt-2.json").read_text())
    assert report["split"] == "val" and report["n"] == 4 and "accuracy" in result.output

    # the held-out split: into eval/heldout/; an empty one says so instead of metrics
    pd.DataFrame(choice_rows(tokenizer, 0, 4)).iloc[:0].to_parquet(tmp_path / "demo" / "data" / "heldout.parquet")
    held = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--task", "demo", "--split", "heldout",
                               "--results-dir", str(tmp_path)])
    assert held.exit_code == 0, held.output
    assert "eval/heldout/teacher-ckpt-2.json" in held.output and "the split has no rows" in held.output
    typo = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--split", "tset", "--results-dir", str(tmp_path)])
    assert typo.exit_code == 2 and typo.output.strip() == "error: --split 'tset': expected test, val or heldout"

    missing = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "nope"), "--split", "val",
                                  "--results-dir", str(tmp_path)])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == [f"error: model directory {tmp_path / 'nope'}: not found "
                                                   "(pass a directory written by prepare-model, sft or distill)"]
