"""SFT: schedule and plan, completion-only loss, dense checkpoints, resume after a kill, LoRA student."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_evaluate import one_torch_thread, tiny_config, write_choice_task  # noqa: F401 (fixture)

from scd_pipeline.engine.batching import frame_batch
from scd_pipeline.engine.checkpoints import best_checkpoint_index
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.scoring import mean_gold_nll, predict_split
from scd_pipeline.engine.sharding import check_units
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama
from scd_pipeline.engine.training import (
    CompletionLM,
    checkpoint_steps,
    cosine_warmup_factor,
    enable_activation_checkpointing,
    per_sample_mean_nll,
    read_resume_progress,
    training_plan,
)
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.math.weighting import step_share
from scd_pipeline.stages import sft as sft_module
from scd_pipeline.stages.sft import run_sft, sft_paths

# 16 training rows, 4 per micro-batch, 2 epochs -> 8 optimizer steps; 4 checkpoints -> steps 2, 4, 6, 8;
# the resume state after every step, so a simulated kill resumes from the step it stopped at.
TEACHER_SETTINGS = {"sft.batch_size": 4, "sft.teacher.epochs": 2, "sft.teacher.n_checkpoints": 4,
                    "sft.teacher.lr": 1e-2, "sft.log_every": 1, "sft.resume_every_minutes": 0,
                    "evaluate.batch_size": 8}


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """One uninterrupted teacher run, the reference for the other tests."""
    results = write_choice_task(tmp_path_factory.mktemp("uninterrupted"))
    config = tiny_config(results, **TEACHER_SETTINGS)
    out = run_sft(config, "teacher")
    return config, out


def test_cosine_warmup_factor_by_hand():
    # 10 steps, 2 warm-up: 1/2, 1, then 0.5 * (1 + cos(pi * (s - 2) / 8))
    factors = [cosine_warmup_factor(s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[6] == pytest.approx(0.5)
    assert factors[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert checkpoint_steps(16, 8) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert checkpoint_steps(10, 4) == [2, 5, 7, 10]
    assert checkpoint_steps(5, 1) == [5]
    with pytest.raises(ConfigError, match="sft.teacher.n_checkpoints: 4 checkpoints"):
        checkpoint_steps(3, 4)


def test_training_plan_covers_each_row_once_per_epoch_and_stops_at_fractional_epochs():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10]
    # 10 rows / 3 per micro-batch -> 4 micro-batches -> 2 steps of 2 micro-batches per epoch
    plan = training_plan(lengths, batch_size=3, micro_per_step=2, epochs=1.5, seed=0)
    assert [step.epoch for step in plan] == [0.5, 1.0, 1.5]
    first_epoch = [row for step in plan[:2] for batch in step.micro_batches for row in batch]
    assert sorted(first_epoch) == list(range(10))
    assert plan == training_plan(lengths, 3, 2, 1.5, seed=0)
    assert plan != training_plan(lengths, 3, 2, 1.5, seed=1)


def test_best_checkpoint_is_the_best_metric_with_ties_to_the_later_step():
    records = [{"index": i + 1, "step": 10 * (i + 1), "val_metric": m}
               for i, m in enumerate([0.5, 0.7, 0.7, None])]
    assert best_checkpoint_index(records) == 3


def test_loss_is_the_weighted_completion_nll_and_accumulation_splits_it_exactly(tmp_path):
    results = write_choice_task(tmp_path, sizes=(4, 1, 1))
    frame = pd.read_parquet(results / "demo" / "data" / "train.parquet")
    frame["weight"] = [1.0, 2.0, 0.5, 1.5]
    tokenizer = byte_level_tokenizer()
    step_weight = float(frame["weight"].sum())

    def step_gradients(micro_batches):
        """What the loop does with one optimizer step's micro-batches under SFT's objective."""
        model = tiny_llama(tokenizer, seed=4).train()
        wrapper, loss = CompletionLM(model), 0.0
        for rows in micro_batches:
            batch = frame_batch(frame, rows, tokenizer.pad_token_id)
            logits = wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask)
            weights = torch.tensor(frame["weight"].to_numpy()[rows], dtype=torch.float32)
            share = step_share(per_sample_mean_nll(logits, batch), weights, step_weight)
            share.backward()
            loss += float(share)
        return loss, model, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, model, whole = step_gradients([[0, 1, 2, 3]])
    split_loss, _, split = step_gradients([[0, 1], [2, 3]])

    # dense reference: full logits, cross-entropy at completion positions only, mean per sample,
    # then weighted by the weight column
    batch = frame_batch(frame, [0, 1, 2, 3], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_sample = []
    for row in range(4):
        positions = batch.predict_mask[row].nonzero().squeeze(1)
        targets = torch.tensor(list(frame["completion_ids"].iat[row]))
        per_sample.append(torch.nn.functional.cross_entropy(logits[row, positions], targets).item())
    expected = sum(w * nll for w, nll in zip(frame["weight"], per_sample, strict=True)) / frame["weight"].sum()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert split_loss == pytest.approx(expected, rel=1e-5)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-5, atol=1e-7)


def test_teacher_run_writes_evenly_spaced_checkpoints_with_their_validation(teacher_run):
    config, out = teacher_run
    record_file = json.loads((out / "checkpoints.json").read_text())
    records = record_file["checkpoints"]

    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert [(r["index"], r["path"], r["step"], r["epoch"]) for r in records] == [
        (1, "ckpt-1", 2, 0.5), (2, "ckpt-2", 4, 1.0), (3, "ckpt-3", 6, 1.5), (4, "ckpt-4", 8, 2.0)]
    assert set(records[0]) == {"index", "path", "step", "epoch", "train_loss", "val_loss", "val_metric", "best"}
    assert record_file["metric"] == "accuracy"
    assert [r["best"] for r in records].count(True) == 1
    assert record_file["best_index"] == best_checkpoint_index(records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns

    # weights only (no optimizer state), loadable, and the recorded validation is reproducible
    files = {p.name for p in (out / "ckpt-2").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pkl", ".pt"))]
    model, tokenizer = load_model(out / "ckpt-2")
    val = pd.read_parquet(out.parent / "data" / "val.parquet")
    predictions = predict_split(model, tokenizer, val, 8, 8)
    assert records[1]["val_loss"] == pytest.approx(mean_gold_nll(predictions), rel=1e-5)
    assert records[1]["val_metric"] == pytest.approx((predictions["prediction"] == predictions["gold"]).mean())

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "event" not in line] == list(range(1, 9))
    assert {"loss", "lr", "tokens_per_s", "epoch"} <= set(log[0])
    # cosine with one warm-up step (ceil(0.1 * 8)): the 8th update runs at 0.5 * (1 + cos(6 pi / 7)) * peak
    assert log[0]["lr"] == pytest.approx(1e-2)
    assert [line for line in log if line.get("step") == 8 and "event" not in line][0]["lr"] == pytest.approx(
        1e-2 * 0.5 * (1 + math.cos(6 * math.pi / 7)))
    assert (out / "sft.config.yaml").is_file()
    assert not sft_paths(config, "teacher").state.exists()  # resume state dropped when done


def test_checkpoints_are_published_in_the_training_precision(teacher_run, tmp_path):
    """Under bf16 autocast the published weights are bf16 (half an fp32 file); fp32 training
    publishes fp32 (the module's teacher run)."""
    results = write_choice_task(tmp_path)
    config = tiny_config(results, **{**TEACHER_SETTINGS, "sft.precision": "bf16", "sft.teacher.epochs": 1,
                                     "sft.teacher.n_checkpoints": 1, "sft.resume_every_minutes": 60})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # one precision per process: the other tests' is fp32
    try:
        out = run_sft(config, "teacher")
    finally:
        AcceleratorState._reset_state(True)
    assert {v.dtype for v in _weights(out / "ckpt-1").values()} == {torch.bfloat16}
    assert {v.dtype for v in _weights(teacher_run[1] / "ckpt-1").values()} == {torch.float32}
    assert load_model(out / "ckpt-1", dtype="float32", device="cpu")[0].dtype == torch.float32  # training reloads fp32


def test_a_student_replicate_trains_with_the_next_seed_into_a_folder_of_its_own(tmp_path):
    """replicates > 1: the SFT student's seed s trains with config seed + s into
    student_sft_seeds/seed-s, beside student_sft (seed 0, the AW anchor), which it leaves alone."""
    results = write_choice_task(tmp_path)
    config = tiny_config(results, **{"sft.student.epochs": 1, "sft.resume_every_minutes": 60, "seed": 3})
    zero = run_sft(config, "student")
    one = run_sft(config, "student", replicate=1)
    assert zero == results / "demo" / "student_sft" and one == results / "demo" / "student_sft_seeds" / "seed-1"
    assert yaml_seed(one) == 4 and yaml_seed(zero) == 3
    first, second = _weights(zero), _weights(one)
    assert max(float((first[k] - second[k]).abs().max()) for k in first) > 1e-4  # another seed, another run
    with pytest.raises(ConfigError, match="only the student has replicates"):
        run_sft(config, "teacher", replicate=1)


def yaml_seed(output) -> int:
    import yaml

    return yaml.safe_load(next(output.glob("*.config.yaml")).read_text())["seed"]


def test_killed_teacher_run_resumes_to_the_same_weights(teacher_run, tmp_path, monkeypatch):
    reference_config, reference = teacher_run
    results = write_choice_task(tmp_path)
    hourly = tiny_config(results, **{**TEACHER_SETTINGS, "sft.resume_every_minutes": 60})
    paths = sft_paths(hourly, "teacher")

    def kill_after_step_5(result):
        if result.step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_sft(hourly, "teacher", after_step=kill_after_step_5)
    assert sorted(p.name for p in paths.output.glob("ckpt-*")) == ["ckpt-1", "ckpt-2"]
    assert not (paths.output / "checkpoints.json").exists()
    # The resume state is saved by the clock only (hourly here), not at checkpoints.
    assert read_resume_progress(paths.state) is None

    config = tiny_config(results, **TEACHER_SETTINGS)  # every step
    with pytest.raises(KeyboardInterrupt):
        run_sft(config, "teacher", after_step=kill_after_step_5)
    assert read_resume_progress(paths.state)["step"] == 5
    shutil.rmtree(paths.output)  # Snakemake deletes the outputs of a failed job

    saved_now = []
    original_save = sft_module._save_checkpoint
    monkeypatch.setattr(sft_module, "_save_checkpoint",
                        lambda ctx, state, target, base: saved_now.append(target.name) or original_save(ctx, state, target, base))
    run_sft(config, "teacher")

    assert saved_now == ["ckpt-3", "ckpt-4"]  # finished checkpoints are not redone
    for k in range(1, 5):
        resumed, uninterrupted = _weights(paths.output / f"ckpt-{k}"), _weights(reference / f"ckpt-{k}")
        assert resumed.keys() == uninterrupted.keys()
        for name, tensor in uninterrupted.items():
            torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    resumed_records = json.loads((paths.output / "checkpoints.json").read_text())["checkpoints"]
    reference_records = json.loads((reference / "checkpoints.json").read_text())["checkpoints"]
    for got, want in zip(resumed_records, reference_records, strict=True):
        assert got == {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v for k, v in want.items()}
    log = [json.loads(line) for line in (paths.output / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "event" not in line] == list(range(1, 9))  # step 5 once
    assert not paths.state.exists()


def test_a_torn_log_tail_is_dropped_and_a_damaged_line_is_named(tmp_path, capsys):
    results = write_choice_task(tmp_path)
    config = tiny_config(results, **TEACHER_SETTINGS)
    paths = sft_paths(config, "teacher")

    def kill_after_step_5(result):
        if result.step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_sft(config, "teacher", after_step=kill_after_step_5)
    log = paths.state / "train_log.jsonl"
    intact = log.read_text()
    shutil.copytree(paths.state, tmp_path / "state-copy")
    # A blank line, a damaged record on file line 3, more records: the run refuses to resume and
    # names the line an editor shows, before it says anything about resuming.
    lines = intact.splitlines()
    log.write_text("\n".join([lines[0], "", "{not json", *lines[1:]]) + "\n")
    capsys.readouterr()
    with pytest.raises(DataError, match=r"train_log\.jsonl: line 3 is not a JSON record .* delete the folder"):
        run_sft(config, "teacher")
    assert "resuming" not in capsys.readouterr().out
    # A last record cut mid-write (power loss): dropped, and the run resumes and finishes.
    shutil.rmtree(paths.state)
    shutil.copytree(tmp_path / "state-copy", paths.state)
    log.write_text(intact[: len(intact) - 12])
    shutil.rmtree(paths.output, ignore_errors=True)
    run_sft(config, "teacher")
    assert "resuming at step 5" in capsys.readouterr().out
    assert json.loads((paths.output / "checkpoints.json").read_text())["best_index"] in range(1, 5)


def test_resume_state_from_other_settings_is_not_used(tmp_path):
    results = write_choice_task(tmp_path)
    config = tiny_config(results, **TEACHER_SETTINGS)

    def kill_after_step_2(result):
        if result.step == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_sft(config, "teacher", after_step=kill_after_step_2)
    changed = tiny_config(results, **{**TEACHER_SETTINGS, "sft.teacher.epochs": 1, "sft.teacher.n_checkpoints": 2})
    out = run_sft(changed, "teacher")
    records = json.loads((out / "checkpoints.json").read_text())["checkpoints"]
    assert [(r["step"], r["epoch"]) for r in records] == [(2, 0.5), (4, 1.0)]
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-1", "ckpt-2"]


def test_cli_student_lora_run_writes_an_adapter_that_evaluate_accepts(tmp_path):
    from typer.testing import CliRunner

    from scd_pipeline.cli import app
    from scd_pipeline.stages.evaluate import evaluate

    results = write_choice_task(tmp_path)
    result = CliRunner().invoke(app, [
        "sft", "--role", "student", "--mode", "lora", "--epochs", "1", "--lr", "0.01", "--batch-size", "4",
        "--task", "demo", "--results-dir", str(results), "--set", "sft.lora.r=4", "--set", "sft.lora.dropout=0.0"])
    assert result.exit_code == 0, result.output

    student = results / "demo" / "student_sft"
    files = {p.name for p in student.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "sft.config.yaml"} <= files
    assert "model.safetensors" not in files  # a LoRA run saves adapters only
    adapter = json.loads((student / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(results / "models" / "student_base")
    log = [json.loads(line) for line in (student / "train_log.jsonl").read_text().splitlines()]
    checkpoint_lines = [line for line in log if line.get("event") == "checkpoint"]
    assert [line["step"] for line in checkpoint_lines] == [4]

    config = tiny_config(results)
    tuned = pd.read_parquet(evaluate(config, student).with_suffix("").with_suffix(".predictions.parquet"))
    base = pd.read_parquet(evaluate(config, results / "models" / "student_base").with_suffix("")
                           .with_suffix(".predictions.parquet"))
    assert tuned["gold_logprob"].mean() > base["gold_logprob"].mean()  # the adapter is applied and helps


# --- memory at scale: FSDP units, gradient checkpointing ---------------------------------------------

def test_the_fsdp_auto_wrap_policy_finds_every_decoder_layer_through_the_training_wrapper():
    """accelerate reads _no_split_modules from the module it prepares, the wrapper: through it the
    policy must pick the 4 decoder layers of the tiny Llama (it picked none before)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = tiny_llama(byte_level_tokenizer())
    wrapper = CompletionLM(model)
    policy = fsdp2_prepare_auto_wrap_policy(
        FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap"), wrapper)
    picked = [m for m in wrapper.modules() if policy(m)]
    assert picked == list(model.model.layers)
    assert wrapper.get_input_embeddings() is model.get_input_embeddings()
    assert wrapper.get_output_embeddings() is model.get_output_embeddings()


def test_a_model_whose_decoder_layers_are_not_fsdp_units_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(byte_level_tokenizer())
    with pytest.raises(ConfigError, match="FSDP made none of the 4 decoder layers .LlamaDecoderLayer. a unit"):
        check_units(model)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'group'}")
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert check_units(model) == 4
    finally:
        dist.destroy_process_group()


def test_gradient_checkpointing_recomputes_each_layer_and_keeps_the_gradients():
    tokenizer = byte_level_tokenizer()
    frame = pd.DataFrame([{"prompt_ids": tokenizer.encode("Q: which?"), "completion_ids": tokenizer.encode("B")}])
    batch = frame_batch(frame, [0], tokenizer.pad_token_id)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_llama(tokenizer, seed=0).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        count, mlp = [0], model.model.layers[0].mlp
        # the layer's MLP runs inside the checkpointed forward: again when the backward recomputes it
        mlp.forward = lambda *args, _run=mlp.forward, _count=count, **kwargs: (
            _count.__setitem__(0, _count[0] + 1), _run(*args, **kwargs))[1]
        wrapper = CompletionLM(model)
        per_sample_mean_nll(wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask), batch).sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
        calls.append(count[0])
    assert calls == [1, 2]  # forward once; with checkpointing once more inside the backward
    torch.testing.assert_close(grads[0], grads[1])
