"""``scd-pipeline plan``: the sizing arithmetic by hand, the parameter counts of the public model
shapes (built on the meta device from configs written from their published dimensions: no weights),
and the command on the paper-scale config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2Config
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.sizing import model_shape
from scd_pipeline.math.sizing import (
    Estimate,
    Hardware,
    ModelShape,
    cache_bytes_per_token,
    hours,
    requested,
    training_gpu_memory,
)

REPO = Path(__file__).resolve().parents[1]

# Published shapes; parameter totals as the model cards / safetensors indexes give them.
PUBLIC = {
    "llama-3.1-8b": (LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 8_030_261_248),
    "llama-3.2-1b": (LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True), 1_235_814_400),
    "llama-3.2-3b": (LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True), 3_212_749_824),
    "qwen2.5-7b": (Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False), 7_615_616_512),
    "qwen2.5-1.5b": (Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 1_543_714_304),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    for name, (config, _) in PUBLIC.items():
        config.save_pretrained(root / name)
    return root


def test_memory_time_and_cache_size_by_hand():
    shape = ModelShape(params=1000, layers=2, hidden=4, vocab=10)
    # FSDP over 2: states 16 * 1000 / 2 = 8000, one layer's bf16 copy 2 * 500 = 1000, activations
    # 34 * 4 * 8 tokens * 2 layers = 2176, logits 5 * 4 bytes * 2 completion tokens * 10 = 400
    assert training_gpu_memory(shape, 2, True, 8, 2, False) == 8000 + 1000 + 2176 + 400
    # checkpointing keeps 2 * 4 * 8 per layer (128) plus one layer's 34 * 4 * 8 (1088)
    assert training_gpu_memory(shape, 2, True, 8, 2, True) == 8000 + 1000 + 128 + 1088 + 400
    # DDP: every process holds all states and the whole bf16 copy
    assert training_gpu_memory(shape, 2, False, 8, 2, False) == 16000 + 2000 + 2176 + 400
    hardware = Hardware(gpus=2, peak_tflops=100.0, utilisation=0.5)
    assert hours(2 * 100e12 * 0.5 * 3600, 2, hardware) == pytest.approx(1.0)
    # the Parquet bound (k ids, k fp16 log-probs, tail, offsets) plus the decoded copy (k ids, k log-probs, tail)
    assert cache_bytes_per_token(50, 49_152) == 50 * (2 + 2) + 12 + 50 * (2 + 2) + 4      # uint16 ids
    assert cache_bytes_per_token(128, 128_256) == 128 * (4 + 2) + 12 + 128 * (4 + 2) + 4  # int32 ids


def test_what_a_job_requests_by_hand():
    # host memory 100 GB x 1.25 = 125,000 MB over a 16,000 MB floor; 0.5 h x 60 x 2 + 15 = 75 minutes
    big = Estimate("sft_teacher", 1, 4, 0.0, 0.5, 40.0, 100.0, 0.0)
    assert requested(big, 16_000) == (125_000, 75)
    # 2 GB x 1.25 = 2,500 MB is under the floor; 0.01 h -> ceil(1.2 + 15) = 17 minutes
    small = Estimate("cache_logits", 10, 1, 0.0, 0.01, 3.0, 2.0, 0.0)
    assert requested(small, 8_000) == (8_000, 17)

@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_model_shapes_count_their_published_parameters(shapes, name, tmp_path):
    config = load_config(None, {"results_dir": str(tmp_path), "models.teacher.source": str(shapes / name)})
    shape = model_shape(config, "teacher")
    assert shape.params == pytest.approx(PUBLIC[name][1], rel=0.005)
    assert shape.vocab == PUBLIC[name][0].vocab_size


def test_a_student_pruned_from_the_teacher_counts_its_kept_layers(shapes, tmp_path):
    config = load_config(None, {"results_dir": str(tmp_path), "models.teacher.source": str(shapes / "llama-3.2-1b"),
                                "models.student.source": "teacher_base", "models.student.keep_every": 4})
    teacher, student = model_shape(config, "teacher"), model_shape(config, "student")
    assert (teacher.layers, student.layers) == (16, 4)
    per_layer = (teacher.params - student.params) / 12  # embeddings and head are shared, tied
    assert per_layer == pytest.approx(60_821_504)  # 2048 * (2048 + 512 + 512 + 2048) + 3 * 2048 * 8192 + 2 * 2048


def test_plan_of_the_paper_scale_config(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config names workflow/accelerate/fsdp.yaml from the repository
    sets = ["--set", f"models.teacher.source={shapes / 'qwen2.5-7b'}",
            "--set", f"models.student.source={shapes / 'qwen2.5-1.5b'}"]
    args = ["plan", "--config", str(REPO / "config" / "paper-gpu.yaml"), "--results-dir", str(tmp_path), "--rows", "20000",
            "--prompt-tokens", "600", "--completion-tokens", "175", *sets]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher 7.62 B parameters (28 layers, head 152064 rows); student 1.54 B" in result.output
    plan = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    rules = {rule["rule"]: rule for rule in plan["rules"]}
    assert rules["cache_logits"]["jobs"] == 10 and rules["distill"]["jobs"] == 5
    teacher = rules["sft_teacher"]
    # 6 x 7.62e9 x (20,000 x 775 tokens) x 3 epochs + validation 2 x 7.62e9 x 2,000 x 775 x 10 checkpoints
    flops = 6 * 7_615_616_512 * 20_000 * 775 * 3 + 2 * 7_615_616_512 * 2_000 * 775 * 10
    assert teacher["flops"] == pytest.approx(flops)
    assert teacher["hours"] == pytest.approx(flops / (4 * 989e12 * 0.4) / 3600)
    assert teacher["gpus"] == 4 and 30 < teacher["gpu_memory_gb"] < 45  # FSDP over 4, checkpointing
    # 10 bf16 checkpoints (152 GB) and a resume state swapped (2 x 16 bytes x 7.6 B = 244 GB)
    assert teacher["disk_gb"] == pytest.approx((10 * 2 + 32) * 7_615_616_512 / 1e9)
    # what the rules request: the teacher SFT's host memory (4 processes x 4 bytes x 7.6 B) x 1.25
    assert plan["requests"]["sft_teacher"] == {"mem_mb": math.ceil(4 * 4 * 7_615_616_512 / 1e9 * 1.25 * 1000),
                                               "runtime": math.ceil(teacher["hours"] * 60 * 2 + 15)}
    assert "sft_teacher 152313 MB" in result.output


def test_plan_without_data_or_a_prepared_embedded_model_says_what_to_give(tmp_path):
    result = CliRunner().invoke(app, ["plan", "--results-dir", str(tmp_path), "--set", "data.max_train_samples=null"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "give --rows (or data.max_train_samples), --prompt-tokens and --completion-tokens" in result.output
    result = CliRunner().invoke(app, ["plan", "--results-dir", str(tmp_path), "--prompt-tokens", "60",
                                      "--completion-tokens", "2"])
    assert result.exit_code == 2
    assert "run `scd-pipeline prepare-model --role teacher` first" in result.output
