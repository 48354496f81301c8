"""SFS/TFS subdomains: the AW identity, the gap decomposition on a hand-computed table, the probe
set, KL between checkpoint caches against the dense formula, and the estimate-subdomains stage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_cache import VOCAB, build_tiny_task, dense_logprobs, tiny_config
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine import logit_cache
from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.scoring import predict_split
from scd_pipeline.math.stats import decompose_gap
from scd_pipeline.math.weighting import adaptive_weight
from scd_pipeline.stages import cache_logits as cache
from scd_pipeline.stages.estimate_subdomains import (
    carried_by_tag,
    checkpoint_kl_matrix,
    probe_sample_ids,
    subdomain_table,
    summarize_subdomains,
    tag_means,
)


def test_adaptive_weight_is_sigmoid_of_log_ratio_equal_to_a_over_a_plus_b():
    student = torch.tensor([1.0, 3.0, 2.0, 0.2])
    teacher = torch.tensor([3.0, 1.0, 2.0, 0.6])
    weight = adaptive_weight(student, teacher)
    torch.testing.assert_close(weight, torch.tensor([0.25, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(weight, torch.sigmoid(student.log() - teacher.log()))
    torch.testing.assert_close(weight, student / (student + teacher))


# Four samples by hand. Best checkpoint T* = 2. d = student - teacher.
#   s1 x: nll 0.5 vs 1.0 -> SFS, d = -0.5; score S 1, T 0 -> error d = -1
#   s2 x: nll 2.0 vs 1.0 -> TFS, d = +1.0; score S 0, T 1 -> error d = +1
#   s3 y: nll 1.0 vs 1.0 -> TFS (tie), d = 0; both score 1 -> 0
#   s4 y: nll 0.2 vs 0.6 -> SFS, d = -0.4; both score 1 -> 0
SAMPLES = pd.DataFrame({"sample_id": ["s1", "s2", "s3", "s4"], "tag": ["x", "x", "y", "y"]})
STUDENT = pd.DataFrame({"sample_id": ["s4", "s3", "s2", "s1"], "nll_mean": [0.2, 1.0, 2.0, 0.5],
                        "score": [1.0, 1.0, 0.0, 1.0]})  # other row order: aligned by id
BEST = pd.DataFrame({"sample_id": ["s1", "s2", "s3", "s4"], "nll_mean": [1.0, 1.0, 1.0, 0.6],
                     "score": [0.0, 1.0, 1.0, 1.0]})
EARLY = pd.DataFrame({"sample_id": ["s1", "s2", "s3", "s4"], "nll_mean": [4.0, 4.0, 4.0, 4.0],
                      "score": [0.0, 0.0, 0.0, 0.0]})


def test_subdomain_table_by_hand():
    table = subdomain_table(SAMPLES, STUDENT, {1: EARLY, 2: BEST}, best_index=2)
    assert list(table.columns) == ["sample_id", "tag", "student_sft_nll", "student_sft_score",
                                   "nll_ckpt_1", "score_ckpt_1", "nll_ckpt_2", "score_ckpt_2",
                                   "sfs", "aw_ckpt_1", "aw_ckpt_2"]
    assert table["student_sft_nll"].tolist() == [0.5, 2.0, 1.0, 0.2]
    assert table["sfs"].tolist() == [True, False, False, True]
    np.testing.assert_allclose(table["aw_ckpt_2"], [0.5 / 1.5, 2.0 / 3.0, 0.5, 0.25])
    np.testing.assert_allclose(table["aw_ckpt_1"], [0.5 / 4.5, 2.0 / 6.0, 1.0 / 5.0, 0.2 / 4.2])


def test_sfs_tfs_summary_adds_up_to_the_student_teacher_gap():
    summary = summarize_subdomains(subdomain_table(SAMPLES, STUDENT, {1: EARLY, 2: BEST}, 2), 2)
    assert summary["sfs_share"] == 0.5 and summary["checkpoints"] == [1, 2]
    loss = summary["loss"]
    assert loss["sfs_mean_delta"] == pytest.approx(-0.45)     # (-0.5 - 0.4) / 2
    assert loss["tfs_mean_delta"] == pytest.approx(0.5)       # (1.0 + 0) / 2
    assert loss["advantage_sfs"] == pytest.approx(-0.225)     # 0.5 * -0.45
    assert loss["deficit_tfs"] == pytest.approx(0.25)         # 0.5 * 0.5
    assert loss["gap"] == pytest.approx(0.025)                # mean of d = 0.1 / 4
    assert loss["student"] - loss["teacher"] == pytest.approx(loss["gap"])
    assert loss["identity_error"] < 1e-12
    metric = summary["metric"]  # risk = error = 1 - score
    assert (metric["student"], metric["teacher"]) == pytest.approx((0.25, 0.25))
    assert (metric["advantage_sfs"], metric["deficit_tfs"], metric["gap"]) == pytest.approx((-0.25, 0.25, 0.0))
    assert summary["per_tag"]["x"]["loss"]["gap"] == pytest.approx(0.25)   # (-0.5 + 1.0) / 2
    assert summary["per_tag"]["y"]["loss"]["gap"] == pytest.approx(-0.2)   # (0 - 0.4) / 2
    assert summary["per_tag"]["y"]["sfs_share"] == 0.5
    assert summary["adaptive_weight_mean"]["2"] == pytest.approx((1 / 3 + 2 / 3 + 0.5 + 0.25) / 4)


def test_decompose_gap_with_no_student_favoured_samples():
    result = decompose_gap(np.array([2.0, 3.0]), np.array([1.0, 1.0]), np.array([False, False]))
    assert result["sfs_share"] == 0.0 and result["sfs_mean_delta"] is None
    assert (result["advantage_sfs"], result["deficit_tfs"], result["gap"]) == (0.0, 1.5, 1.5)


def test_probe_set_is_seeded_sorted_and_independent_of_row_order():
    ids = [f"demo-{i:03d}" for i in range(50)]
    probe = probe_sample_ids(ids, 8, seed=0)
    assert len(probe) == 8 and probe == sorted(probe) and set(probe) <= set(ids)
    assert probe_sample_ids(list(reversed(ids)), 8, seed=0) == probe
    assert probe_sample_ids(ids, 8, seed=1) != probe
    assert probe_sample_ids(ids[:5], 8, seed=0) == ids[:5]


@pytest.fixture(scope="module")
def estimated(tmp_path_factory):
    """Full-vocabulary fp32 caches of two checkpoints (so KLs are exact), then the CLI stage."""
    root = tmp_path_factory.mktemp("results")
    build_tiny_task(root, n_checkpoints=2, best=2)
    config = tiny_config(root, **{"cache.top_k": VOCAB, "cache.dtype": "fp32"})
    for index in (1, 2):
        cache.cache_logits(config, index)
    result = CliRunner().invoke(app, ["estimate-subdomains", "--results-dir", str(root), "--task", "demo",
                                      "--set", f"cache.top_k={VOCAB}", "--set", "cache.dtype=fp32",
                                      "--probe-size", "6"])
    assert result.exit_code == 0, result.output
    assert "SFS share" in result.output
    return root, config


def test_estimate_subdomains_writes_the_table_and_summary(estimated):
    root, config = estimated
    table = pd.read_parquet(root / "demo" / "subdomains.parquet")
    summary = json.loads((root / "demo" / "subdomains.json").read_text())
    frame = read_split(root / "demo" / "data" / "train.parquet")
    assert table["sample_id"].tolist() == frame["sample_id"].tolist()
    # L_S^SFT and its score are the student's own, by the one scoring pass; L_c from each cache.
    model, tokenizer = load_model(root / "demo" / "student_sft", device="cpu")
    student = predict_split(model, tokenizer, frame, batch_size=5, max_new_tokens=64)
    np.testing.assert_allclose(table["student_sft_nll"], -student["gold_logprob"] / student["gold_tokens"], atol=1e-5)
    np.testing.assert_allclose(table["student_sft_score"], student["score"])
    stored = logit_cache.open_task_cache(config, 1).stats().set_index("sample_id")
    np.testing.assert_allclose(table["nll_ckpt_1"], stored.loc[table["sample_id"], "nll_mean"], atol=1e-6)
    assert (table["sfs"] == (table["student_sft_nll"] < table["nll_ckpt_2"])).all()
    a, b = table["student_sft_nll"], table["nll_ckpt_1"]
    np.testing.assert_allclose(table["aw_ckpt_1"], a / (a + b), rtol=1e-6)
    assert summary["best_index"] == 2 and summary["sfs_share"] == pytest.approx(table["sfs"].mean())
    assert summary["loss"]["gap"] == pytest.approx((table["student_sft_nll"] - table["nll_ckpt_2"]).mean())
    assert summary["loss"]["identity_error"] < 1e-9 and summary["metric"]["identity_error"] < 1e-9
    assert set(summary["per_tag"]) == {"even", "odd"}
    assert summary["probe"]["size"] == 6 and summary["probe"]["sample_ids"] == \
        probe_sample_ids(frame["sample_id"], 6, config["seed"])


def test_kl_between_checkpoints_equals_the_dense_kl_on_the_probe_set(estimated):
    root, config = estimated
    summary = json.loads((root / "demo" / "subdomains.json").read_text())
    probe = summary["probe"]["sample_ids"]
    best, _ = dense_logprobs(root, 2, probe)
    early, _ = dense_logprobs(root, 1, probe)
    dense_kl = (best.exp() * (best - early)).sum(-1).mean()  # mean over all probe tokens
    assert summary["kl_best_to_c"]["1"] == pytest.approx(float(dense_kl), rel=1e-4)
    assert summary["kl_best_to_c"]["2"] == pytest.approx(0.0, abs=1e-7)
    matrix = np.array(summary["kl_matrix"]["values"])
    assert summary["kl_matrix"]["index"] == [1, 2]
    assert matrix[1, 0] == pytest.approx(summary["kl_best_to_c"]["1"])
    reverse = (early.exp() * (early - best)).sum(-1).mean()
    assert matrix[0, 1] == pytest.approx(float(reverse), rel=1e-4)
    caches = {k: logit_cache.open_task_cache(config, k) for k in (1, 2)}
    assert checkpoint_kl_matrix(caches, probe)[2][1] == pytest.approx(summary["kl_best_to_c"]["1"])


def test_estimate_subdomains_refuses_a_stale_cache(estimated, tmp_path):
    import shutil

    root, _ = estimated
    copy = tmp_path / "results"
    shutil.copytree(root, copy, copy_function=shutil.copy2)
    (copy / "demo" / "logits" / "ckpt-1.meta.json").unlink()
    result = CliRunner().invoke(app, ["estimate-subdomains", "--results-dir", str(copy), "--task", "demo",
                                      "--set", f"cache.top_k={VOCAB}"])
    assert result.exit_code == 2 and "ckpt-1.parquet: sidecar" in result.output


def test_a_lora_sft_student_is_accepted(estimated, tmp_path):
    """sft.mode: lora writes an adapter directory (adapter_config.json, no config.json)."""
    import shutil

    from peft import LoraConfig, get_peft_model

    root, _ = estimated
    copy = tmp_path / "results"
    shutil.copytree(root, copy, copy_function=shutil.copy2)
    base = copy / "models" / "student_base"
    shutil.move(copy / "demo" / "student_sft", base)
    model, tokenizer = load_model(base, device="cpu")
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter.peft_config["default"].base_model_name_or_path = str(base)
    adapter.save_pretrained(copy / "demo" / "student_sft")
    tokenizer.save_pretrained(copy / "demo" / "student_sft")
    assert not (copy / "demo" / "student_sft" / "config.json").exists()
    result = CliRunner().invoke(app, ["estimate-subdomains", "--results-dir", str(copy), "--task", "demo",
                                      "--set", f"cache.top_k={VOCAB}", "--set", "cache.dtype=fp32"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(copy / "demo" / "subdomains.parquet")
    original = pd.read_parquet(root / "demo" / "subdomains.parquet")
    # a fresh LoRA adapter (B = 0) is the base model: the same NLLs as the full student it came from
    np.testing.assert_allclose(table["student_sft_nll"], original["student_sft_nll"], atol=1e-5)


def test_held_out_by_tag_and_in_sample_estimates_disagree_where_the_models_memorised():
    """Two training rows of tag m that the SFT student memorised: in sample its NLL (0.1) is below
    T*'s (0.5), so they are student-favoured. On the validation rows of m, which neither model
    trained on, the student's mean NLL is 2.0 and T*'s 1.0: held out by tag they are teacher-
    favoured, and AW = 2 / (2 + 1). Tag z has no validation rows: it takes the all-row means."""
    samples = pd.DataFrame({"sample_id": ["a", "b", "c"], "tag": ["m", "m", "z"]})
    in_sample = subdomain_table(samples, samples.assign(nll_mean=0.1, score=1.0),
                                {2: samples.assign(nll_mean=0.5, score=1.0)}, 2)
    assert in_sample["sfs"].tolist() == [True, True, True]
    val_tags = ["m", "m", "n"]
    student = tag_means(val_tags, pd.DataFrame({"nll_mean": [1.5, 2.5, 4.0], "score": [0.0, 1.0, 0.0]}))
    best = tag_means(val_tags, pd.DataFrame({"nll_mean": [0.5, 1.5, 1.0], "score": [1.0, 1.0, 1.0]}))
    assert student.loc["m"].tolist() == [2.0, 0.5] and best.loc["(all tags)"].tolist() == [1.0, 1.0]
    held = subdomain_table(samples, carried_by_tag(samples, student), {2: carried_by_tag(samples, best)}, 2)
    assert held["sfs"].tolist() == [False, False, False]
    np.testing.assert_allclose(held["aw_ckpt_2"], [2 / 3, 2 / 3, (8 / 3) / (8 / 3 + 1)])
    assert held["student_sft_score"].tolist() == [0.5, 0.5, 1 / 3]


def test_the_stage_estimates_held_out_by_tag_on_the_validation_rows(estimated, tmp_path):
    import shutil

    root, _ = estimated
    copy = tmp_path / "results"
    shutil.copytree(root, copy, copy_function=shutil.copy2)
    train = read_split(copy / "demo" / "data" / "train.parquet")
    val = train.iloc[:8].assign(sample_id=[f"v{i}" for i in range(8)])
    val.to_parquet(copy / "demo" / "data" / "val.parquet", index=False)
    result = CliRunner().invoke(app, ["estimate-subdomains", "--results-dir", str(copy), "--task", "demo",
                                      "--set", f"cache.top_k={VOCAB}", "--set", "cache.dtype=fp32",
                                      "--set", "subdomains.estimate=heldout_tag"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(copy / "demo" / "subdomains.parquet")
    summary = json.loads((copy / "demo" / "subdomains.json").read_text())
    assert summary["estimate"] == "heldout_tag" and summary["heldout"]["rows"] == 8
    for column, model_dir in (("student_sft_nll", copy / "demo" / "student_sft"),
                              ("nll_ckpt_1", copy / "demo" / "teacher" / "ckpt-1")):
        model, tokenizer = load_model(model_dir, device="cpu")
        scored = predict_split(model, tokenizer, val, batch_size=5, max_new_tokens=64)
        nll = (-scored["gold_logprob"] / scored["gold_tokens"]).groupby(scored["tag"]).mean()
        np.testing.assert_allclose(table[column], nll.loc[table["tag"]].to_numpy(), atol=1e-5)
    assert (table["sfs"] == (table["student_sft_nll"] < table["nll_ckpt_2"])).all()
