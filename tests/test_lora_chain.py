"""The whole chain with ``sft.mode: lora`` on tiny models: LoRA teacher checkpoints are cached,
the LoRA SFT student anchors the subdomains and starts distillation, every model is evaluated."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from typer.testing import CliRunner

from scd_pipeline.cli import app

TINY = {
    "task": "demo", "results_dir": "results",
    "data": {"demo": {"n_examples": 40, "test_size": 8}, "max_train_samples": 16},
    "models": {"teacher": {"source": "tiny:llama"}, "student": {"keep_every": 2}},
    "sft": {"mode": "lora", "lora": {"r": 4, "dropout": 0.0}, "batch_size": 4, "val_max_samples": 8,
            "teacher": {"n_checkpoints": 2, "epochs": 1, "lr": 0.01}, "student": {"epochs": 1, "lr": 0.01}},
    "cache": {"top_k": 8},
    "subdomains": {"probe_size": 8},
    "distill": {"init": "sft", "phases": 2, "epochs_per_phase": 1, "batch_size": 4},
}


def test_every_stage_accepts_lora_checkpoints_and_a_lora_sft_student(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    commands = [["prepare-model", "--role", "teacher"], ["prepare-model", "--role", "student"], ["prepare-data"],
                ["sft", "--role", "teacher"], ["sft", "--role", "student"],
                ["cache-logits", "--checkpoint", "1"], ["cache-logits", "--checkpoint", "2"],
                ["estimate-subdomains"], ["distill", "--method", "scd_aw"],
                ["evaluate", "--model", "results/demo/students/scd_aw"],
                ["evaluate", "--model", "results/demo/student_sft"],
                ["evaluate", "--model", "results/demo/teacher/ckpt-2"]]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        for command in commands:
            result = CliRunner().invoke(app, [*command, "--config", "tiny.yaml"])
            assert result.exit_code == 0, (command, result.output)
    finally:
        os.chdir(old)
    task = Path(tmp_path) / "results" / "demo"
    for adapter in (task / "teacher" / "ckpt-1", task / "student_sft"):
        assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    schedule = json.loads((task / "students" / "scd_aw" / "schedule.json").read_text())
    assert [p["checkpoint"] for p in schedule["phases"]] and (task / "students" / "scd_aw" / "config.json").is_file()
    for name in ("scd_aw", "student_sft", "teacher-ckpt-2"):
        assert json.loads((task / "eval" / f"{name}.json").read_text())["n"] == 8
