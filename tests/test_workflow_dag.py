"""The static DAG (``snakemake -n``, nothing runs): replicates fan distillation and evaluation out
over seeds while teacher SFT and the caches stay shared; ``tasks=[a,b]`` plans every task's
pipeline once, the base models once and one table across tasks; one task keeps its rule names.
Also the '/'-separated student names that replicates need."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from scd_pipeline.engine.config import load_config
from scd_pipeline.errors import ConfigError
from scd_pipeline.stages.distill.inputs import distill_paths

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TINY = {
    "task": "demo",
    "data": {"demo": {"n_examples": 40, "test_size": 8}, "max_train_samples": 24},
    "models": {"teacher": {"source": "tiny:llama"}, "student": {"keep_every": 2}},
    "sft": {"teacher": {"n_checkpoints": 2, "epochs": 1}, "student": {"epochs": 1}},
    "distill": {"methods": ["td", "scd_aw"], "phases": 2},
}


def dry_run(tmp_path: Path, *config: str) -> tuple[Counter, list[str]]:
    """Jobs per rule and the shell commands of a dry run in a fresh working directory."""
    return planned(dry_run_output(tmp_path, *config))


def planned(output: str) -> tuple[Counter, list[str]]:
    """Jobs per rule and the shell commands, from a dry run's output."""
    stats = output.split("Job stats:")[1].split("total")[0]
    jobs = Counter({m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)})
    shells = [line.split("Shell command: ", 1)[1] for line in output.splitlines()
              if "Shell command: " in line]
    return jobs, shells


def resource_by_rule(output: str, name: str = "gpu") -> dict[str, set[int]]:
    """The resource ``name`` each rule's planned jobs request, from a dry run's job blocks."""
    found: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", output):  # sft_teacher: a checkpoint
        rule = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        value = re.search(rf"resources: .*\b{name}=(\d+)", block)
        if rule and value:
            found.setdefault(rule.group(1), set()).add(int(value.group(1)))
    return found


def dry_run_output(tmp_path: Path, *config: str) -> str:
    """The stdout of ``snakemake -n -p`` on the tiny config in a fresh working directory."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    command = [SNAKEMAKE, "-n", "-p", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "work"),
               "--configfile", str(REPO / "config.yaml"), str(tmp_path / "tiny.yaml"), "--config", *config]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_replicates_fan_out_distillation_and_evaluation_only(tmp_path):
    jobs, shells = dry_run(tmp_path, "replicates=3", "seed=5")
    assert jobs["distill"] == 3 * 2  # 2 methods (one job each without replicates, see below)
    # evaluate: teacher_base, student_sft, then the distilled students; T*'s evaluation joins the
    # DAG once the teacher SFT (a Snakemake checkpoint) has named it, so a dry run cannot list it.
    assert jobs["evaluate"] == 2 + 3 * 2 + 2  # + the SFT student's seeds 1 and 2
    for rule in ("sft_teacher", "sft_student", "estimate_subdomains", "prepare_data", "report"):
        assert jobs[rule] == 1, rule
    # the SFT student has the methods' three seeds: student_sft (seed 5, the AW anchor) and two more
    assert jobs["sft_student_replicate"] == 2
    assert sorted(re.search(r"--replicate (\d+)", s).group(1) for s in shells if "sft --role student --replicate" in s) \
        == ["1", "2"]
    assert jobs["cache_logits"] == 2
    distill = sorted(s for s in shells if " distill " in s)
    assert [re.search(r"--name '([^']+)'.* --set seed=(\d+)", s).groups() for s in distill] == [
        ("scd_aw/seed-0", "5"), ("scd_aw/seed-1", "6"), ("scd_aw/seed-2", "7"),
        ("td/seed-0", "5"), ("td/seed-1", "6"), ("td/seed-2", "7")]
    evaluated = {re.search(r"--model (\S+) --name '([^']+)'", s).groups() for s in shells if " evaluate " in s}
    assert ("results/demo/students/td/seed-2", "td@seed-2") in evaluated
    assert ("results/demo/students/scd_aw/seed-0", "scd_aw@seed-0") in evaluated
    assert ("results/demo/student_sft_seeds/seed-2", "student_sft@seed-2") in evaluated


def test_several_tasks_share_the_base_models_and_end_in_one_table(tmp_path):
    jobs, shells = dry_run(tmp_path, "tasks=[demo,smdis]")
    for task in ("demo", "smdis"):
        assert jobs[f"{task}_sft_teacher"] == 1 and jobs[f"{task}_distill"] == 2
        assert jobs[f"{task}_evaluate"] == 4 and jobs[f"{task}_report"] == 1
    assert jobs["demo_prepare_model_teacher"] == jobs["demo_prepare_model_student"] == 1
    assert not any(rule.startswith("smdis_prepare_model") for rule in jobs)
    # smdis (a JMED-LLM task) also scores the same four models on its held-out split; the demo does not
    assert jobs["smdis_evaluate_heldout"] == 4 and "demo_evaluate_heldout" not in jobs
    assert jobs["demo_multitask_report"] == 1 and sum(jobs.values()) == 2 * 13 + 4 + 2 + 1 + 1
    # Every task rule names its own task; the table reads both.
    assert any("sft --role teacher --task smdis" in s and "results/smdis/logs" in s for s in shells)
    assert any("report --tasks demo,smdis" in s for s in shells)


def test_one_task_keeps_the_documented_rule_names(tmp_path):
    jobs, shells = dry_run(tmp_path, "task=crade")
    assert {"sft_teacher", "distill", "evaluate", "report", "all"} <= set(jobs)
    assert (jobs["distill"], jobs["evaluate"], jobs["evaluate_heldout"], jobs["sft_teacher"]) == (2, 4, 4, 1)
    held = [s for s in shells if "--split heldout" in s]
    assert len(held) == 4 and all("results/crade/logs/heldout/evaluate_" in s for s in held)
    assert not any("--split heldout" in s for s in shells if "results/crade/logs/evaluate_" in s)
    assert not any("_" in rule and rule.startswith("crade") for rule in jobs)
    assert any("distill --method 'td' --name 'td' --task crade" in s for s in shells)
    assert any("results/crade/logs/report.log" in s for s in shells)


def test_distill_names_may_have_slash_separated_segments(tmp_path):
    config = load_config(overrides={"results_dir": str(tmp_path)})
    paths = distill_paths(config, "td/seed-1")
    assert paths.output == tmp_path / "demo" / "students" / "td" / "seed-1"
    assert paths.state == tmp_path / "demo" / ".state" / "distill-td--seed-1"
    assert distill_paths(config, "td").state == tmp_path / "demo" / ".state" / "distill-td"
    for bad in ("", "td/../x", "td/.hidden", "/td", "td/", "td\\seed"):
        with pytest.raises(ConfigError, match="--name") as caught:
            distill_paths(config, bad)
        assert "\n" not in str(caught.value)


def test_several_gpus_launch_training_with_one_process_per_gpu(tmp_path):
    output = dry_run_output(tmp_path / "ddp", "resources={gpus: 2}")
    # Only training asks the cluster for every GPU; caches and evaluations run one process on one.
    gpus = resource_by_rule(output)
    assert resource_by_rule(output, "runtime")["sft_teacher"] == {480}  # no data yet: the fixed values
    assert {rule: gpus[rule] for rule in ("sft_teacher", "sft_student", "distill")} == {
        "sft_teacher": {2}, "sft_student": {2}, "distill": {2}}
    assert gpus["cache_logits"] == gpus["evaluate"] == gpus["estimate_subdomains"] == {1}, gpus
    _, shells = planned(output)
    training = [s for s in shells if " sft --role " in s or " distill --method " in s]
    assert len(training) == 2 + 2  # teacher, student; td, scd_aw
    assert all("accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m scd_pipeline" in s
               for s in training)
    others = [s for s in shells if " cache-logits " in s or " evaluate " in s]
    assert others and not any("accelerate" in s for s in others)  # one process each
    _, shells = dry_run(tmp_path / "fsdp", "resources={gpus: 4, accelerate_config: workflow/accelerate/fsdp.yaml}")
    assert any("launch --config_file workflow/accelerate/fsdp.yaml --num_processes 4" in s and " sft " in s
               for s in shells)
    _, shells = dry_run(tmp_path / "one", "resources={gpus: 1}")
    assert not any("accelerate" in s for s in shells)
    assert not any("run-on-gpus" in s for s in shells)  # every job sees every GPU unless local_gpus is set
    # One machine with 4 GPUs, no SLURM: every job that runs a model waits for GPUs of its own.
    _, shells = dry_run(tmp_path / "local", "resources={gpus: 2, local_gpus: 4}")
    on = lambda s, n: f"run-on-gpus --gpus {n} --of 4 --slots results/.gpus -- " in s  # noqa: E731
    assert all(on(s, 2) and "accelerate launch" in s for s in shells if " sft --role " in s or " distill " in s)
    assert all(on(s, 1) for s in shells if " cache-logits " in s or " evaluate " in s or " estimate-subdomains " in s)
    assert not any("run-on-gpus" in s for s in shells if " prepare-data " in s or " report " in s)


def test_on_gpus_the_rules_request_the_plans_memory_and_runtime_once_models_and_data_are_known(tmp_path):
    """With the data prepared (its manifest) and the models' shapes readable, each job's mem_mb and
    runtime are the plan's (engine/sizing.rule_resources); on a CPU, or before the data exists,
    the rules' fixed values. Each of a training job's processes gets its share of the threads."""
    from scd_pipeline.engine.sizing import PLANNED_RULES, rule_resources

    data = tmp_path / "known" / "work" / "results" / "demo" / "data"
    data.mkdir(parents=True)
    manifest = {"split_sizes": {"train": 20_000, "val": 500, "test": 1_000},
                "token_lengths": {"train": {"prompt": {"mean": 600.0}, "completion": {"mean": 175.0}}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    output = dry_run_output(tmp_path / "known", "resources={gpus: 2}")
    config = load_config(tmp_path / "known" / "tiny.yaml", {"results_dir": str(data.parents[1]), "resources.gpus": 2})
    expected = rule_resources(config)
    assert expected is not None
    for rule in ("sft_teacher", "sft_student", "distill", "cache_logits", "estimate_subdomains"):
        assert resource_by_rule(output, "mem_mb")[rule] == {expected[rule][0]}, rule
        assert resource_by_rule(output, "runtime")[rule] == {expected[rule][1]}, rule
    assert expected["sft_teacher"][1] != 480 and expected["sft_teacher"][0] == PLANNED_RULES["sft_teacher"][1]
    _, shells = planned(output)
    teacher = next(s for s in shells if " sft --role teacher" in s)
    assert teacher.startswith("OMP_NUM_THREADS=$(( (") and "/ 2 ))" in teacher  # the job's threads over 2
    cpu = dry_run_output(tmp_path / "known", "resources={gpus: 0}")
    assert resource_by_rule(cpu, "runtime")["sft_teacher"] == {480}


def test_curriculum_methods_add_the_ioa_stages_once_and_only_for_themselves(tmp_path):
    jobs, shells = dry_run(tmp_path / "a", "distill={methods: [td, ioa, scd_aw+ioa]}")
    for rule in ("ioa_plan", "synthesize", "estimate_subdomains_synthetic"):
        assert jobs[rule] == 1, rule
    assert jobs["cache_logits_synthetic"] == jobs["cache_logits"] == 2  # one per teacher checkpoint
    assert jobs["distill"] == 3
    assert any("cache-logits --synthetic --checkpoint 2" in s for s in shells)
    # ioa weights no samples: no AW of the synthetic items is needed
    jobs, _ = dry_run(tmp_path / "b", "distill={methods: [td, ioa]}")
    assert jobs["synthesize"] == 1 and jobs["estimate_subdomains_synthetic"] == 0
    # without a curriculum method none of IOA's stages is planned
    jobs, _ = dry_run(tmp_path / "c")
    assert not any(jobs[rule] for rule in ("ioa_plan", "synthesize", "cache_logits_synthetic"))


def test_the_paper_scale_config_plans(tmp_path):
    """config/paper-gpu.yaml (Qwen2.5-7B -> 1.5B on crade, every row, 10 checkpoints, 4 GPUs under
    FSDP) plans: 10 caches, a phase per checkpoint, training under accelerate with the FSDP config."""
    command = [SNAKEMAKE, "-n", "-p", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
               "--configfile", str(REPO / "config.yaml"), str(REPO / "config" / "paper-gpu.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs, shells = planned(result.stdout)
    assert jobs["cache_logits"] == 10 and jobs["distill"] == 5
    assert all("launch --config_file workflow/accelerate/fsdp.yaml --num_processes 4" in s
               for s in shells if " sft --role " in s or " distill --method " in s)
    config = load_config(REPO / "config" / "paper-gpu.yaml")
    assert config["distill"]["phases"] is None and config["data"]["max_train_samples"] is None
