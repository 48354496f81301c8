"""Distillation: the per-batch loss against dense formulas, AW / PACED weights against the
artifacts, the TD / CD / SCD / TAID schedules, training on real caches of tiny checkpoints, resume,
and the one-line refusals."""

from __future__ import annotations

import json
import math
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch
from test_cache import build_tiny_task, save_model, tiny_checkpoint, tiny_config
from test_evaluate import one_torch_thread  # noqa: F401 (fixture)
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine import logit_cache
from scd_pipeline.engine.batching import collate, completion_logits, frame_batch, read_split
from scd_pipeline.engine.methods import Method, default_name, parse_method
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.scoring import PassRule, pass_rates
from scd_pipeline.engine.tiny import byte_level_tokenizer
from scd_pipeline.engine.training import read_resume_progress
from scd_pipeline.errors import ConfigError, DataError, ModelError
from scd_pipeline.math.losses import SparseTarget
from scd_pipeline.math.schedules import cache_kl, mean_token_kl, student_cache_kl
from scd_pipeline.math.weighting import paced_weight, step_share, weighted_mean
from scd_pipeline.stages import cache_logits as cache
from scd_pipeline.stages.distill import run_distill
from scd_pipeline.stages.distill.inputs import check_cache_width
from scd_pipeline.stages.distill.objective import (
    average_target,
    divergence_for,
    divergence_name_at,
    phase_count,
    sample_losses,
)
from scd_pipeline.stages.estimate_subdomains import estimate_subdomains, probe_sample_ids

LAMBDA = 0.5
# Pinned here so the tests do not follow config.yaml's defaults (sized for real runs). Three phases,
# one per teacher checkpoint (a None override would be ignored by load_config).
DISTILL = {"cache.top_k": 16, "cache.dtype": "fp32", "distill.phases": 3, "distill.epochs_per_phase": 2,
           "distill.batch_size": 5, "distill.grad_accum": 1, "distill.lr": 3e-3, "distill.warmup_ratio": 0.0,
           "distill.log_every": 1, "distill.init": "base", "distill.kd_weight": LAMBDA,
           "distill.objective": "convex", "distill.divergence": "forward_kl", "distill.temperature": 1.0,
           "distill.cd_mode": "sequential", "distill.paced.two_stage": False, "distill.schedule": "per_phase"}


# --------------------------------------------------------------------------- pure parts


def test_method_strings_and_weighting_compose():
    assert parse_method("td") == Method("td", adaptive=False, paced=False)
    assert parse_method("scd_aw") == Method("scd", adaptive=True, paced=False)
    assert parse_method("scd", "aw") == parse_method("scd_aw")
    assert parse_method("td+paced") == Method("td", adaptive=False, paced=True)
    assert parse_method("cd", "paced") == parse_method("cd+paced")
    assert parse_method("taid+paced").name == "taid+paced"
    assert parse_method("cd+aw+paced").name == "cd+aw+paced"
    assert parse_method("scd+aw").name == "scd_aw" and parse_method("scd+aw").label == "SCD+AW"
    assert parse_method("cd+aw+paced").label == "CD+AW+PACED"
    assert default_name("td", "paced") == "td+paced" and default_name("scd_aw") == "scd_aw"
    assert default_name("scd", "aw") == default_name("scd_aw", "aw") == "scd_aw"
    with pytest.raises(ConfigError, match="unknown method 'kd'"):
        parse_method("kd")
    with pytest.raises(ConfigError, match="TAID has no CE/KD mix"):
        parse_method("taid", "aw")
    with pytest.raises(ConfigError, match="contradicts"):
        parse_method("scd_aw", "none")


def tiny_batch() -> tuple:
    """Two samples (2 and 3 completion tokens) over a 5-token vocabulary, k = V teacher."""
    batch = collate([[1, 2], [3]], [[4, 0], [2, 1, 3]], pad_id=0)
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(5, 5, generator=generator)
    teacher_logits = 2.0 * torch.randn(5, 5, generator=generator)
    return batch, student_logits, teacher_logits


def test_batch_loss_equals_the_dense_formula_with_k_equal_to_vocab():
    batch, student_logits, teacher_logits = tiny_batch()
    target = SparseTarget.from_logits(teacher_logits, top_k=5)
    forward_kl = divergence_for({"temperature": 1.0}, "forward_kl")
    terms = sample_losses(student_logits, batch, target, LAMBDA, forward_kl, "convex")

    log_q, log_p = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    token_ce = -log_q.gather(1, batch.target_ids[:, None]).squeeze(1)
    token_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    token_loss = (1 - LAMBDA) * token_ce + LAMBDA * token_kl
    expected = torch.stack([token_loss[:2].mean(), token_loss[2:].mean()])  # per-sample means
    torch.testing.assert_close(terms.loss, expected)
    torch.testing.assert_close(terms.ce, torch.stack([token_ce[:2].mean(), token_ce[2:].mean()]))
    torch.testing.assert_close(weighted_mean(terms.loss, torch.ones(2)), token_loss[:2].mean() / 2 +
                               token_loss[2:].mean() / 2)


def test_additive_objective_per_sample_weights_and_temperature_match_the_dense_formula():
    batch, student_logits, teacher_logits = tiny_batch()
    target = SparseTarget.from_logits(teacher_logits, top_k=5)
    tau, w = 2.0, torch.tensor([0.2, 0.7])
    reverse_kl = divergence_for({"temperature": tau}, "reverse_kl")
    terms = sample_losses(student_logits, batch, target, w, reverse_kl, "additive")

    log_q_tau = torch.log_softmax(student_logits / tau, -1)
    log_p_tau = torch.log_softmax(teacher_logits / tau, -1)
    token_rkl = (log_q_tau.exp() * (log_q_tau - log_p_tau)).sum(-1)
    token_ce = -torch.log_softmax(student_logits, -1).gather(1, batch.target_ids[:, None]).squeeze(1)
    ce = torch.stack([token_ce[:2].mean(), token_ce[2:].mean()])  # CE stays at temperature 1
    kd = torch.stack([token_rkl[:2].mean(), token_rkl[2:].mean()])
    torch.testing.assert_close(terms.loss, ce + w * kd)


def test_micro_batch_shares_add_up_to_the_weighted_mean_of_the_step():
    losses, weights = torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([0.5, 0.0, 1.0, 0.25])
    shares = step_share(losses[:2], weights[:2], float(weights.sum())) + \
        step_share(losses[2:], weights[2:], float(weights.sum()))
    torch.testing.assert_close(shares, weighted_mean(losses, weights))
    # (0.5 * 1 + 0 * 2 + 1 * 4 + 0.25 * 8) / 1.75, by hand
    assert float(shares) == pytest.approx(6.5 / 1.75)
    zero = step_share(losses.requires_grad_(), torch.zeros(4), 0.0)
    assert float(zero) == 0.0 and zero.requires_grad  # no signal, but backward() still works


def test_one_phase_per_teacher_checkpoint_unless_configured():
    assert phase_count({"phases": None}, 8) == 8 and phase_count({"phases": 4}, 8) == 4


def test_two_stage_switches_from_forward_to_reverse_kl_at_half_of_all_steps():
    names = [divergence_name_at("akl", True, step, 6) for step in range(6)]
    assert names == ["forward_kl"] * 3 + ["reverse_kl"] * 3
    assert divergence_name_at("akl", False, 5, 6) == "akl"


def test_cd_average_target_is_the_logit_average_of_the_checkpoints():
    generator = torch.Generator().manual_seed(1)
    logits = [3.0 * torch.randn(4, 7, generator=generator) for _ in range(3)]
    targets = [SparseTarget.from_logits(z, top_k=7) for z in logits]
    averaged = average_target(targets, top_k=7)
    expected = torch.log_softmax(torch.stack([torch.log_softmax(z, -1) for z in logits]).mean(0), -1)
    torch.testing.assert_close(averaged.dense_logprobs(), expected)
    sparse = average_target([SparseTarget.from_logits(z, top_k=3) for z in logits], top_k=3)
    assert sparse.k == 3 and torch.allclose(torch.logaddexp(sparse.logprobs.logsumexp(-1), sparse.tail_logmass),
                                            torch.zeros(4), atol=1e-5)


# --------------------------------------------------------------------------- runs on real caches


def sharpen_checkpoints(root) -> None:
    """Peaked teachers (random tiny models are nearly uniform, so every KL would be ~0):
    checkpoint 2 (T*) = its weights with the final norm x6, checkpoint 1 = the same weights x3 (an
    earlier, less confident T*), checkpoint 3 = its own weights x9. The near-uniform initial student
    is then closer to checkpoint 1 than to T*, so SCD starts away from T*."""
    teacher = root / "demo" / "teacher"
    for index, source, factor in ((1, 2, 3.0), (2, 2, 6.0), (3, 3, 9.0)):
        model, tokenizer = load_model(teacher / f"ckpt-{source}", device="cpu")
        with torch.no_grad():
            model.model.norm.weight.mul_(factor)
        save_model(model, tokenizer, teacher / f"ckpt-{index}")


def build_distill_task(root) -> dict:
    """3 teacher checkpoints (T* = 2), their fp32 k=16 caches, subdomains and a student base."""
    build_tiny_task(root, n_checkpoints=3, best=2)
    sharpen_checkpoints(root)
    tokenizer = byte_level_tokenizer()
    save_model(tiny_checkpoint(tokenizer, seed=7, num_layers=1), tokenizer, root / "models" / "student_base")
    config = tiny_config(root, **DISTILL)
    for index in (1, 2, 3):
        cache.cache_logits(config, index)
    estimate_subdomains(config)
    return config


RUNS = {  # name -> (method, weighting, extra config)
    "cd": ("cd", None, {}),
    "scd": ("scd", None, {}),
    "scd_aw": ("scd_aw", None, {}),
    "taid": ("taid", None, {}),
    "td+paced": ("td", "paced", {}),
    "cd-average": ("cd", None, {"distill.cd_mode": "average", "distill.phases": 1}),
    "td+paced-two-stage": ("td+paced", None, {"distill.paced.two_stage": True, "distill.phases": 1}),
    "cd-whole-run": ("cd", None, {"distill.schedule": "whole_run", "distill.warmup_ratio": 0.2}),
}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """Every method trained on the same tiny task (td through the CLI); per-step records kept."""
    root = tmp_path_factory.mktemp("results")
    config = build_distill_task(root)
    steps: dict[str, list] = {}
    for name, (method, weighting, extra) in RUNS.items():
        steps[name] = []
        run_distill(tiny_config(root, **{**DISTILL, **extra}), method, weighting, name=name if extra else None,
                    after_step=steps[name].append)
    settings = {**DISTILL, "cache.batch_size": 4, "cache.rows_per_group": 5, "subdomains.probe_size": 6}
    sets = [arg for key, value in settings.items()
            for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["distill", "--method", "td", "--results-dir", str(root), "--task", "demo",
                                      *sets])
    assert result.exit_code == 0, result.output
    assert "td, 3 phases from checkpoints [2, 2, 2], 18 steps" in result.output
    return root, config, steps


def students(root):
    return root / "demo" / "students"


def train_frame(root) -> pd.DataFrame:
    return read_split(root / "demo" / "data" / "train.parquet")


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def distillation_loss(root, config, model_dir, checkpoint: int) -> float:
    """Mean over the training split of 0.5 CE + 0.5 forward KL to one checkpoint's cache."""
    frame = train_frame(root)
    model, tokenizer = load_model(model_dir, device="cpu")
    batch = frame_batch(frame, list(range(len(frame))), tokenizer.pad_token_id)
    reader = logit_cache.open_task_cache(config, checkpoint)
    target = reader.targets(frame["sample_id"].tolist(), frame["completion_ids"].map(len).tolist())
    with torch.no_grad():
        logits = completion_logits(model, batch)
    terms = sample_losses(logits, batch, target, LAMBDA, divergence_for(config["distill"], "forward_kl"))
    return float(terms.loss.mean())


@pytest.mark.parametrize("name", ["td", *RUNS])
def test_every_method_lowers_the_distillation_loss_and_writes_its_outputs(distilled, name):
    root, config, _ = distilled
    out = students(root) / name
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl", "schedule.json",
            "distill.config.yaml"} <= {p.name for p in out.iterdir()}
    schedule = json.loads((out / "schedule.json").read_text())
    last = schedule["phases"][-1]["checkpoint"]
    final_teacher = 2 if last == "average" else last
    before = distillation_loss(root, config, root / "models" / "student_base", final_teacher)
    after = distillation_loss(root, config, out, final_teacher)
    assert after < before - 0.1, (before, after)
    log = read_log(out / "train_log.jsonl")
    assert [line["step"] for line in log] == list(range(1, schedule["total_steps"] + 1))
    assert {"phase", "epoch", "step", "loss", "ce", "kd", "sample_weight", "lr", "checkpoint", "divergence",
            "t"} <= set(log[0])
    assert ("kd_weight" in log[0]) == (name != "taid")  # TAID has no CE/KD mix
    assert not (root / "demo" / ".state" / f"distill-{name}").exists()  # resume state dropped


def test_td_taid_use_the_best_checkpoint_and_cd_goes_through_the_checkpoints_in_order(distilled):
    root, _, _ = distilled
    phases = {name: json.loads((students(root) / name / "schedule.json").read_text())["phases"]
              for name in ("td", "taid", "cd", "cd-average")}
    assert [p["checkpoint"] for p in phases["td"]] == [2, 2, 2]
    assert [p["checkpoint"] for p in phases["taid"]] == [2, 2, 2]
    assert [p["checkpoint"] for p in phases["cd"]] == [1, 2, 3]
    assert [(p["first_step"], p["last_step"]) for p in phases["cd"]] == [(1, 6), (7, 12), (13, 18)]
    assert [p["checkpoint"] for p in phases["cd-average"]] == ["average"]
    log = read_log(students(root) / "cd" / "train_log.jsonl")
    assert [line["checkpoint"] for line in log] == [1] * 6 + [2] * 6 + [3] * 6
    # The LR schedule restarts: warm-up 0, so every phase's first step runs at the peak rate.
    assert [line["lr"] for line in log if line["step"] in (1, 7, 13)] == [DISTILL["distill.lr"]] * 3
    assert log[5]["lr"] < DISTILL["distill.lr"] / 2


def test_a_whole_run_schedule_warms_up_once_and_decays_over_all_phases(distilled):
    root, _, _ = distilled
    log = read_log(students(root) / "cd-whole-run" / "train_log.jsonl")
    assert [line["checkpoint"] for line in log] == [1] * 6 + [2] * 6 + [3] * 6  # still three phases
    assert json.loads((students(root) / "cd-whole-run" / "schedule.json").read_text())["lr_schedule"] == "whole_run"
    # 18 steps, warm-up ceil(0.2 * 18) = 4: (s + 1) / 4 for s < 4, then 0.5 (1 + cos(pi (s - 4) / 14)).
    expected = [(s + 1) / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 14)) for s in range(18)]
    assert [line["lr"] for line in log] == pytest.approx([DISTILL["distill.lr"] * f for f in expected])


def test_scd_chooses_the_argmin_of_its_recorded_terms_which_match_the_schedule_functions(distilled):
    root, config, _ = distilled
    schedule = json.loads((students(root) / "scd" / "schedule.json").read_text())
    frame = train_frame(root)
    probe = probe_sample_ids(frame["sample_id"], config["subdomains"]["probe_size"], config["seed"])
    assert schedule["probe"]["sample_ids"] == probe
    assert schedule["probe"]["sample_ids"] == json.loads((root / "demo" / "subdomains.json").read_text())[
        "probe"]["sample_ids"]
    for phase in schedule["phases"]:
        sums = {c["checkpoint"]: c["kl_best_to_c"] + c["kl_student_to_c"] for c in phase["candidates"]}
        best_sum = min(sums.values())
        assert phase["checkpoint"] == max(k for k, v in sums.items() if v == best_sum)
    assert schedule["phases"][0]["checkpoint"] == 1 != schedule["best_index"]  # not simply TD
    trained_on = [line["checkpoint"] for line in read_log(students(root) / "scd" / "train_log.jsonl")]
    assert trained_on == [phase["checkpoint"] for phase in schedule["phases"] for _ in range(6)]
    # Recompute phase 1 independently: S_1 is the initial student.
    readers = {k: logit_cache.open_task_cache(config, k) for k in (1, 2, 3)}
    targets = {k: r.targets(probe) for k, r in readers.items()}
    model, tokenizer = load_model(root / "models" / "student_base", device="cpu")
    rows = [int(np.flatnonzero(frame["sample_id"] == s)[0]) for s in probe]
    with torch.no_grad():
        logits = completion_logits(model, frame_batch(frame, rows, tokenizer.pad_token_id))
    for candidate in schedule["phases"][0]["candidates"]:
        c = candidate["checkpoint"]
        assert candidate["kl_best_to_c"] == pytest.approx(mean_token_kl([cache_kl(targets[2], targets[c])]),
                                                          rel=1e-5, abs=1e-9)
        assert candidate["kl_student_to_c"] == pytest.approx(
            mean_token_kl([student_cache_kl(logits, targets[c])]), rel=1e-4)
    assert schedule["phases"][0]["candidates"][1]["kl_best_to_c"] == 0.0
    # The student moves between phases, so KL(S_k || c) is re-measured.
    first, second = (schedule["phases"][j]["candidates"][0]["kl_student_to_c"] for j in (0, 1))
    assert first != second


def test_adaptive_weights_applied_in_each_step_come_from_the_artifacts(distilled):
    root, config, steps = distilled
    frame = train_frame(root)
    student_sft = pd.read_parquet(root / "demo" / "subdomains.parquet").set_index("sample_id")["student_sft_nll"]
    cache_nll = {k: pd.read_parquet(root / "demo" / "logits" / f"ckpt-{k}.parquet").set_index("sample_id")["nll_mean"]
                 for k in (1, 2, 3)}
    log = {line["step"]: line for line in read_log(students(root) / "scd_aw" / "train_log.jsonl")}
    for info in steps["scd_aw"]:
        ids = frame["sample_id"].to_numpy()[info.rows]
        ls = student_sft.loc[ids].to_numpy()
        lc = cache_nll[info.phase_record["checkpoint"]].loc[ids].to_numpy()
        np.testing.assert_allclose(info.row_terms["kd_weight"].numpy(), ls / (ls + lc), rtol=1e-5)
        assert log[info.step]["kd_weight"] == pytest.approx(float(info.row_terms["kd_weight"].mean()), rel=1e-5)
    assert len({round(float(w), 6) for info in steps["scd_aw"] for w in info.row_terms["kd_weight"]}) > 3


def test_paced_weights_are_p_times_one_minus_p_re_estimated_each_epoch(distilled):
    root, _, steps = distilled
    frame = train_frame(root)
    model, tokenizer = load_model(root / "models" / "student_base", device="cpu")
    first_epoch = [info for info in steps["td+paced"] if info.phase == 1 and info.epoch == 0]
    rows = [r for info in first_epoch for r in info.rows]
    assert sorted(rows) == list(range(len(frame)))
    with torch.no_grad():
        logprobs = torch.log_softmax(completion_logits(model, frame_batch(frame, rows, tokenizer.pad_token_id)), -1)
    expected = []
    offset = 0
    for row in rows:  # independent: dense log-softmax, sample by sample
        gold = frame["completion_ids"].iat[row]
        token_logprobs = logprobs[offset + np.arange(len(gold)), torch.tensor(gold)]
        offset += len(gold)
        if frame["kind"].iat[row] == "choice":  # the exact pass rate: p(gold letter)
            p = float(token_logprobs[0].exp())
        else:  # K sampled lists scored by F1, as scoring.pass_rates does with the run's seed
            rule = PassRule(samples=8, seed=0)
            p = float(pass_rates(model, tokenizer, frame.iloc[[row]].reset_index(drop=True), 4, rule)[0])
        expected.append(p * (1 - p))
    applied = torch.cat([info.sample_weights for info in first_epoch])
    np.testing.assert_allclose(applied.numpy(), expected, rtol=1e-4)
    assert float(paced_weight(torch.tensor([0.5]))) == 0.25
    second_epoch = {r: float(w) for info in steps["td+paced"] if info.phase == 1 and info.epoch == 1
                    for r, w in zip(info.rows, info.sample_weights, strict=True)}
    assert any(abs(second_epoch[r] - e) > 1e-6 for r, e in zip(rows, expected, strict=True))


def test_two_stage_paced_trains_with_forward_then_reverse_kl(distilled):
    root, _, _ = distilled
    log = read_log(students(root) / "td+paced-two-stage" / "train_log.jsonl")
    assert [line["divergence"] for line in log] == ["forward_kl"] * 3 + ["reverse_kl"] * 3
    assert [line["divergence"] for line in read_log(students(root) / "td" / "train_log.jsonl")] == \
        ["forward_kl"] * 18


def test_taid_t_rises_to_its_end_and_its_state_is_saved_with_the_student(distilled):
    root, _, steps = distilled
    ts = [line["t"] for line in read_log(students(root) / "taid" / "train_log.jsonl")]
    assert ts == sorted(ts) and ts[0] > 0.4 and ts[-1] == 1.0
    state = json.loads((students(root) / "taid" / "taid_state.json").read_text())
    assert state["t"] == 1.0 and state["step"] == 18 and state["total_steps"] == 18


def test_a_killed_taid_run_resumes_to_the_same_student_and_taid_state(distilled, tmp_path):
    root, _, steps = distilled

    def kill_after_step_8(info):
        if info.step == 8:
            raise KeyboardInterrupt

    # The resume state follows the clock only: the end of phase 1 (step 6) saves nothing within an hour.
    hourly = tiny_config(root, **{**DISTILL, "distill.resume_every_minutes": 60})
    with pytest.raises(KeyboardInterrupt):
        run_distill(hourly, "taid", name="taid-resumed", after_step=kill_after_step_8)
    assert read_resume_progress(root / "demo" / ".state" / "distill-taid-resumed") is None

    config = tiny_config(root, **{**DISTILL, "distill.resume_every_minutes": 0})  # every step
    with pytest.raises(KeyboardInterrupt):
        run_distill(config, "taid", name="taid-resumed", after_step=kill_after_step_8)
    assert read_resume_progress(root / "demo" / ".state" / "distill-taid-resumed")["step"] == 8
    assert not (students(root) / "taid-resumed").exists()
    resumed_steps = []
    run_distill(config, "taid", name="taid-resumed", after_step=resumed_steps.append)
    assert [info.step for info in resumed_steps] == list(range(9, 19))
    assert [info.loss for info in resumed_steps] == [info.loss for info in steps["taid"][8:]]
    from safetensors.torch import load_file

    reference = load_file(students(root) / "taid" / "model.safetensors")
    resumed = load_file(students(root) / "taid-resumed" / "model.safetensors")
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value)
    assert json.loads((students(root) / "taid-resumed" / "taid_state.json").read_text()) == \
        json.loads((students(root) / "taid" / "taid_state.json").read_text())
    strip = [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in
             read_log(students(root) / "taid-resumed" / "train_log.jsonl")]
    assert strip == [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in
                     read_log(students(root) / "taid" / "train_log.jsonl")]


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def task_copy(distilled, tmp_path):
    root, _, _ = distilled
    copy = tmp_path / "results"
    shutil.copytree(root, copy, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("students"))
    return copy


def test_a_missing_cache_is_a_one_line_error_naming_the_command(task_copy):
    (task_copy / "demo" / "logits" / "ckpt-3.parquet").unlink()
    result = CliRunner().invoke(app, ["distill", "--method", "cd", "--results-dir", str(task_copy),
                                      "--task", "demo", "--phases", "3"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0  # refused before any model is loaded
    assert result.output.startswith("error: ") and "ckpt-3.parquet: teacher-logit cache not found" in result.output
    assert "scd-pipeline cache-logits --checkpoint 3" in result.output
    assert not (task_copy / "demo" / "students").exists()


def test_missing_subdomains_student_and_checkpoint_name_their_commands(task_copy):
    config = tiny_config(task_copy, **DISTILL)
    (task_copy / "demo" / "subdomains.parquet").unlink()
    with pytest.raises(DataError, match="scd-pipeline estimate-subdomains"):
        run_distill(config, "scd_aw")
    with pytest.raises(ConfigError, match="cd_mode average has no single checkpoint"):
        run_distill(tiny_config(task_copy, **{**DISTILL, "distill.cd_mode": "average"}), "cd+aw")
    shutil.rmtree(task_copy / "demo" / "teacher" / "ckpt-2")
    with pytest.raises(DataError, match="ckpt-2: teacher checkpoint not found"):
        run_distill(config, "td")
    shutil.rmtree(task_copy / "models" / "student_base")
    with pytest.raises(ModelError, match="prepare-model --role student"):
        run_distill(config, "td")


def test_init_sft_starts_from_the_sft_student(distilled):
    root, _, _ = distilled
    config = tiny_config(root, **{**DISTILL, "distill.init": "sft", "distill.lr": 1e-12, "distill.phases": 1,
                                  "distill.epochs_per_phase": 0.5})
    out = run_distill(config, "td", name="td-from-sft")
    from safetensors.torch import load_file

    start, end = (load_file(path / "model.safetensors") for path in (root / "demo" / "student_sft", out))
    assert set(start) == set(end)
    for key, value in start.items():
        torch.testing.assert_close(end[key], value)


def pad_head(model_dir, rows: int) -> None:
    """Give a saved model an LM head (and tied embedding) of ``rows`` rows, its tokenizer unchanged,
    as Qwen2.5 pads its heads past the tokenizer (7B: 152,064 rows, 1.5B: 151,936, 151,665 ids)."""
    model, tokenizer = load_model(model_dir, device="cpu")
    model.resize_token_embeddings(rows)
    save_model(model, tokenizer, model_dir)


def test_teacher_and_student_heads_wider_than_their_tokenizer_distil_on_its_ids(distilled, tmp_path):
    """Teacher heads of 264 rows, a student head of 261, one tokenizer of 259 ids: the caches score
    the tokenizer's 259 ids, the student is trained and probed on the same 259, and a cache of
    another width (written from a padded head by an earlier version) is refused in one line."""
    root = tmp_path / "results"
    shutil.copytree(distilled[0], root, copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns("students", "logits", ".state"))
    for index in (1, 2, 3):
        pad_head(root / "demo" / "teacher" / f"ckpt-{index}", 264)
    pad_head(root / "models" / "student_base", 261)
    config = tiny_config(root, **{**DISTILL, "distill.phases": 2, "distill.epochs_per_phase": 0.5})
    for index in (1, 2, 3):
        meta = cache.cache_logits(config, index)
        assert meta["vocab_size"] == 259
    estimate_subdomains(config)
    out = run_distill(config, "scd")  # the probe (KL to every checkpoint) and the loss, both widths
    assert (out / "model.safetensors").is_file()
    assert len(json.loads((out / "schedule.json").read_text())["phases"]) == 2

    written_by_a_wider_head = types.SimpleNamespace(vocab_size=264, path=root / "demo" / "logits" / "ckpt-2.parquet",
                                                    meta={"checkpoint": {"index": 2}})
    with pytest.raises(DataError, match="ckpt-2.parquet: scores 264 ids but the tokenizer has 259; re-run "
                                        "`scd-pipeline cache-logits --checkpoint 2`"):
        check_cache_width(written_by_a_wider_head, 259)
