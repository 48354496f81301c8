"""The one config: defaults load, overrides apply, and bad keys fail with the key path and type."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine.config import (
    load_config,
    parse_assignment,
    validate_config,
    write_effective_config,
)
from scd_pipeline.errors import ConfigError


def test_defaults_validate_and_hold_every_stage_section():
    config = load_config()
    assert config["task"] == "demo"
    assert {"data", "models", "sft", "evaluate", "cache"} <= set(config)
    assert config["models"]["student"]["keep_every"] == 4


def test_dotted_overrides_replace_defaults():
    config = load_config(overrides={"data.max_length": 256, "models.student.keep_layers": [0, 2]})
    assert config["data"]["max_length"] == 256
    assert config["models"]["student"]["keep_layers"] == [0, 2]


def test_user_file_merges_onto_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: smdis\ndata:\n  balance: undersample\n")
    config = load_config(path)
    assert config["task"] == "smdis" and config["data"]["balance"] == "undersample"
    assert config["data"]["max_length"] == load_config()["data"]["max_length"]


def test_a_key_repeated_in_one_mapping_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: demo\ndata:\n  balance: none\n  val_fraction: 0.2\n  balance: oversample\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: line 5: key 'balance' repeats line 3 of the same mapping"):
        load_config(path)
    path.write_text("data:\n  balance: none\nmodels:\n  student:\n    keep_every: 2\n  teacher:\n    keep_every: 2\n")
    assert load_config(path)["models"]["student"]["keep_every"] == 2  # one key in two mappings is fine


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.max_length": "long"}, "config key data.max_length: expected an integer, got 'long'"),
        ({"data.colour": 1}, "config key data.colour: unknown key"),
        ({"modls": {}}, "config key modls: unknown key"),
        ({"models.student.keep_every": 1.5}, "config key models.student.keep_every: expected an integer or null"),
        ({"task": "unknown"}, "config key task: 'unknown' is not one of"),
        ({"sft.teacher.n_checkpoints": 0}, "config key sft.teacher.n_checkpoints:"),
        ({"data.system_prompt": True}, "config key data.system_prompt: expected a string, got True; YAML reads "
                                       "an unquoted yes / no / true / false as a boolean: quote it"),
    ],
)
def test_schema_errors_name_the_key_path_and_expected_type(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("data.max_length=128") == ("data.max_length", 128)
    assert parse_assignment("models.student.keep_layers=[0, 4]") == ("models.student.keep_layers", [0, 4])
    assert parse_assignment("data.max_train_samples=null") == ("data.max_train_samples", None)
    with pytest.raises(ConfigError):
        parse_assignment("data.max_length")


def test_effective_config_is_written_and_round_trips(tmp_path):
    config = load_config(overrides={"seed": 7})
    written = write_effective_config(config, tmp_path, "prepare-data")
    assert written.name == "prepare-data.config.yaml"
    assert validate_config(yaml.safe_load(written.read_text())) == config


def test_cli_reports_a_bad_override_in_one_line():
    result = CliRunner().invoke(app, ["prepare-data", "--set", "data.max_length=abc"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: config key data.max_length: expected an integer, got 'abc'"]


def test_cli_help_lists_every_stage_in_pipeline_order_and_each_has_help():
    from scd_pipeline.cli import PIPELINE_ORDER

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    registered = [command.name for command in app.registered_commands]
    assert registered == list(PIPELINE_ORDER)  # every command, in pipeline order
    positions = [result.output.index(f" {name} ") for name in PIPELINE_ORDER]
    assert positions == sorted(positions)
    for name in PIPELINE_ORDER:
        page = CliRunner().invoke(app, [name, "--help"])
        assert page.exit_code == 0 and "Usage:" in page.output, name
        assert "--config" in page.output or name in ("cache-info", "init", "run-on-gpus"), name


def test_the_console_command_raises_the_collector_threshold_and_freezes_the_heap_when_done(monkeypatch):
    import gc
    import sys

    from scd_pipeline import cli

    calls = []
    monkeypatch.setattr(gc, "set_threshold", lambda *thresholds: calls.append(("threshold", thresholds)))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(("freeze",)))
    later = gc.get_threshold()[1:]
    for argv, status in ((["init", "--help"], 0), (["no-such-stage"], 2)):  # also when a command fails
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["scd-pipeline", *argv])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == status
        assert calls == [("threshold", (cli.GC_FIRST_THRESHOLD, *later)), ("freeze",)]
    assert cli.GC_FIRST_THRESHOLD > 700  # Python's default


def test_snakemake_nested_config_strings_are_read_as_their_schema_types():
    # Snakemake hands `--config 'data={demo: {seed: 7}}'` over as {'data': {'demo': {'seed': '7'}}}
    config = load_config()
    config["data"]["demo"]["seed"] = "7"
    config["distill"]["phases"] = "null"
    config["sft"]["teacher"]["lr"] = "1e-4"
    config["models"]["student"]["keep_layers"] = "[0, 4]"
    validate_config(config)
    assert config["data"]["demo"]["seed"] == 7 and config["distill"]["phases"] is None
    assert config["sft"]["teacher"]["lr"] == 1e-4 and config["models"]["student"]["keep_layers"] == [0, 4]
    config["data"]["demo"]["seed"] = "seven"  # still a type error, in one line
    with pytest.raises(ConfigError, match="config key data.demo.seed: expected an integer, got 'seven'"):
        validate_config(config)


def test_snakemake_dry_run_accepts_a_nested_config_override(tmp_path, repo_root):
    import subprocess
    import sys
    from pathlib import Path

    snakemake = str(Path(sys.executable).parent / "snakemake")
    result = subprocess.run([snakemake, "-n", "-s", str(repo_root / "Snakefile"), "-d", str(tmp_path),
                             "--config", "data={demo: {seed: 7}}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "expected an integer" not in result.stdout + result.stderr


def test_method_strings_are_checked_by_the_one_parser():
    assert load_config(overrides={"distill.methods": ["cd+aw+paced", "scd_aw"]})["distill"]["methods"]
    from scd_pipeline.engine.methods import SUFFIXES

    for suffix in SUFFIXES:  # the schema's pattern knows every suffix the parser does
        assert load_config(overrides={"distill.methods": [f"td+{suffix}"]})["distill"]["methods"] == [f"td+{suffix}"]
    with pytest.raises(ConfigError, match="distill.methods: method 'taid\\+aw': TAID has no CE/KD mix"):
        load_config(overrides={"distill.methods": ["taid+aw"]})


def test_set_null_restores_a_nullable_default(tmp_path):
    from scd_pipeline.cli import build_config

    config = build_config(None, ["distill.phases=null", "data.max_train_samples=null"], task=None)
    assert config["distill"]["phases"] is None
    assert config["data"]["max_train_samples"] is None
    assert build_config(None, [], task=None)["task"] == "demo"  # unset CLI options change nothing


def test_a_curriculum_refuses_evaluation_on_the_validation_split_its_gates_steer_by():
    with pytest.raises(ConfigError, match=r"distill.methods \(ioa\) and evaluate.split: val: .* set evaluate.split: test"):
        load_config(overrides={"distill.methods": ["td", "ioa"], "evaluate.split": "val"})
    assert load_config(overrides={"distill.methods": ["td"], "evaluate.split": "val"})["evaluate"]["split"] == "val"
    assert load_config(overrides={"distill.methods": ["ioa"]})["evaluate"]["split"] == "test"
