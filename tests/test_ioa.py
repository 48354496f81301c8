"""IOA (SPEC 4.6): knowledge modules, the Identifier's gaps, the Organizer's stages and mastery
gate, the Adapter's checks, and the whole curriculum on tiny models (plan, synthesis, synthetic
caches, distillation through the stages, resume, report)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_evaluate import one_torch_thread  # noqa: F401 (fixture)
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine import scoring
from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.logit_cache import open_task_cache
from scd_pipeline.engine.methods import parse_method
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.math.curriculum import (
    ADVANCE,
    ADVANCE_UNMASTERED,
    REMEDIAL,
    NgramIndex,
    PlannedModule,
    assign_modules,
    dependency_strength,
    fresh_remedial,
    gate,
    identify,
    mastery_decision,
    merge_stages,
    ngram_containment,
    organize,
    replay_count,
    strata_edges,
    targeted,
    zpd_report,
)
from scd_pipeline.stages import ioa_plan as ioa
from scd_pipeline.stages.distill import run_distill
from scd_pipeline.stages.synthesize import (
    REGISTERS,
    STRATEGIES,
    _prompt_plan,
    candidate_body,
    interleaved,
    near_duplicate_reason,
    parse_item,
    prompt_text,
    register_pools,
    writes_options,
    yield_by_style,
)

# --------------------------------------------------------------------------- modules


def test_modules_are_the_tags_or_three_nll_strata_fixed_once():
    assert assign_modules(["a", "b", "a"], [0.1, 0.2, 0.3]).modules == ["a", "b", "a"]
    nll = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2]
    # quantiles 1/3 and 2/3 of the sorted {0.1, 0.2, 0.3, 0.5, 0.7, 0.9} (linear, positions 5/3
    # and 10/3): 0.2 + (2/3)(0.3 - 0.2) and 0.5 + (1/3)(0.7 - 0.5)
    edges = strata_edges(nll)
    assert edges == pytest.approx([0.2 + 0.1 * 2 / 3, 0.5 + 0.2 / 3])
    assigned = assign_modules(["only"] * 6, nll)
    assert assigned.basis == "strata" and assigned.edges == pytest.approx(edges)
    assert assigned.modules == ["advanced", "introductory", "intermediate", "intermediate", "advanced",
                                "introductory"]
    # validation rows are placed by the training rows' edges, not by their own quantiles
    assert assign_modules(["only"] * 2, [0.0, 5.0], edges).modules == ["introductory", "advanced"]


# --------------------------------------------------------------------------- identifier


def test_gap_severity_and_deficient_set_by_hand():
    teacher = {"a": 0.8, "b": 0.5, "c": 0.0, "d": 0.6}
    student = {"a": 0.4, "b": 0.45, "c": 0.1, "d": 0.42}
    gaps = {g.module: g for g in identify(teacher, student, tau_gap=0.3, gap_weight=0.7,
                                          dependency={"b": 0.5})}
    assert gaps["a"].gap == pytest.approx(0.5)           # (0.8 - 0.4) / 0.8
    assert gaps["b"].gap == pytest.approx(0.1)           # (0.5 - 0.45) / 0.5
    assert gaps["c"].gap == 0.0                          # the teacher scores 0: nothing to close
    assert gaps["d"].gap == pytest.approx(0.3)           # exactly tau: not above it
    # 7 of 20 rows against 10 of 20: a gap of exactly 0.3, which floats compute as 0.30000000000000004
    assert not identify({"m": 10 / 20}, {"m": 7 / 20}, tau_gap=0.3)[0].deficient
    assert gaps["b"].severity == pytest.approx(0.7 * 0.1 + 0.3 * 0.5)
    assert gaps["a"].severity == pytest.approx(0.35)
    assert [m for m, g in gaps.items() if g.deficient] == ["a"]
    # sorted by severity, highest first
    assert [g.module for g in identify(teacher, student, dependency={"b": 0.5})] == ["a", "b", "d", "c"]


def test_dependency_strength_follows_ioas_conditional_performance_definition():
    # prerequisite i: ratios 0.95, 0.5, 1.0, 0.6 (P_T = 1); dependent j's scores in those states
    value = dependency_strength([0.95, 0.5, 1.0, 0.6], [0.8, 0.2, 0.6, 0.4], 1.0)
    mastered, unmastered = (0.8 + 0.6) / 2, (0.2 + 0.4) / 2
    assert value == pytest.approx((mastered - unmastered) / mastered, rel=1e-6)
    assert dependency_strength([0.95, 1.0], [0.1, 0.2], 1.0) is None  # never unmastered: unknown
    assert dependency_strength([0.95, 0.2], [0.1, 0.5], 1.0) == 0.0   # clipped at 0


# --------------------------------------------------------------------------- organizer


def module(name: str, teacher: float, student: float, rows: int = 20) -> PlannedModule:
    return PlannedModule(name, teacher, student, rows)


def test_stages_go_easiest_first_and_merge_within_the_zone_of_proximal_development():
    modules = [module("hard", 0.5, 0.30), module("easy", 0.9, 0.80), module("easy2", 0.85, 0.75),
               module("mid", 0.7, 0.62)]
    stages = merge_stages(modules, tau_zpd=0.15)
    # by P_T: easy, easy2, mid, hard. easy2's 0.75 is within 0.15 x 0.80 of 0.80: merged;
    # mid's 0.62 is 0.155 below that stage's mean 0.775 > 0.116: a new stage; hard likewise.
    assert [s.names for s in stages] == [["easy", "easy2"], ["mid"], ["hard"]]
    assert stages[0].mean_student == pytest.approx(0.775)
    report = zpd_report(stages, 0.15)
    assert [r["within_zpd"] for r in report] == [False, False]
    assert report[0]["allowed_drop"] == pytest.approx(0.15 * 0.775)


def test_a_stage_that_steps_too_far_is_split_into_its_easier_and_harder_half():
    modules = [module("easy", 0.9, 0.8), module("hard", 0.6, 0.4)]
    halves = {"hard": (PlannedModule("hard/easier", 0.7, 0.75, 10, "hard", "easier"),
                       PlannedModule("hard/harder", 0.5, 0.05, 10, "hard", "harder")),
              "easy": (PlannedModule("easy/easier", 0.9, 0.9, 10, "easy", "easier"),
                       PlannedModule("easy/harder", 0.9, 0.7, 10, "easy", "harder"))}
    stages = organize(modules, 0.15, halves, min_split_rows=8)
    assert [s.names for s in stages] == [["easy"], ["hard/easier"], ["hard/harder"]]
    assert stages[1].split_from == ["hard"]
    # halves with too few validation rows to be scored: the stage stays whole
    small = {k: tuple(PlannedModule(p.name, p.teacher, p.student, 3, p.parent, p.part) for p in v)
             for k, v in halves.items()}
    assert [s.names for s in organize(modules, 0.15, small, min_split_rows=8)] == [["easy"], ["hard"]]
    # a step within the ZPD is never split
    assert [s.names for s in organize([module("a", 0.9, 0.8), module("b", 0.8, 0.75)], 0.15, halves)] == [["a", "b"]]


def test_mastery_gate_advances_repeats_and_stops_after_max_remedial():
    assert mastery_decision({"a": 0.95, "b": 0.9}, 0.9, 0, 5) == ADVANCE
    assert mastery_decision({"a": 0.95, "b": 0.89}, 0.9, 0, 5) == REMEDIAL
    assert mastery_decision({"a": 0.95, "b": 0.89}, 0.9, 4, 5) == REMEDIAL
    assert mastery_decision({"a": 0.95, "b": 0.89}, 0.9, 5, 5) == ADVANCE_UNMASTERED
    assert mastery_decision({"a": 0.93}, 0.95, 0, 0) == ADVANCE_UNMASTERED
    assert mastery_decision({"a": (9 / 12) / (10 / 12)}, 0.9, 0, 5) == ADVANCE  # 0.8999999999999999 in floats


def test_the_gate_after_a_remedial_pass_checks_every_unit_of_the_stage():
    """Stage [a, b], P_T 0.8 each, τ_mastery 0.9. After the first pass a is mastered (0.8), b is
    not (0.6): remedial on b. After it b reaches 0.8 but a slipped to 0.6: the gate sees a, and
    the next remedial pass trains a (it checked only b before, and advanced)."""
    teacher = {"a": 0.8, "b": 0.8}
    ratios, decision, weak = gate(["a", "b"], teacher, {"a": 0.8, "b": 0.6}, 0.9, 0, 2)
    assert (decision, weak) == (REMEDIAL, ["b"]) and ratios == pytest.approx({"a": 1.0, "b": 0.75})
    ratios, decision, weak = gate(["a", "b"], teacher, {"a": 0.6, "b": 0.8}, 0.9, 1, 2)
    assert (decision, weak) == (REMEDIAL, ["a"]) and set(ratios) == {"a", "b"}
    assert gate(["a", "b"], teacher, {"a": 0.6, "b": 0.8}, 0.9, 2, 2)[1] == ADVANCE_UNMASTERED


def test_synthesis_targets_the_most_severe_share_of_the_deficient_modules():
    modules = [{"module": "a", "severity": 0.2, "deficient": True}, {"module": "b", "severity": 0.9, "deficient": True},
               {"module": "c", "severity": 0.5, "deficient": True}, {"module": "d", "severity": 0.7, "deficient": True},
               {"module": "e", "severity": 0.95, "deficient": False}]
    assert targeted(modules, 0.25) == ["b"]              # 25% of 4 deficient modules: the most severe one
    assert targeted(modules, 0.5) == ["b", "d"]
    assert targeted(modules, 1.0) == ["b", "d", "c", "a"]  # e is not deficient, however severe
    assert targeted(modules[:1], 0.25) == ["a"]          # at least one
    assert targeted([{"module": "x", "severity": 1.0, "deficient": False}], 0.25) == []


def test_replay_makes_earlier_stages_the_configured_share_of_a_pass():
    assert replay_count(40, 100, 0.2) == 10       # 10 / (40 + 10) = 0.2
    assert replay_count(40, 6, 0.2) == 6          # at most what earlier stages hold
    assert replay_count(40, 100, 0.0) == 0 and replay_count(40, 0, 0.2) == 0


def test_plan_from_hand_made_scores_marks_the_deficient_module_and_orders_stages():
    train = pd.DataFrame({"sample_id": [f"t{i}" for i in range(8)], "tag": ["x"] * 4 + ["y"] * 4})
    train_nll = np.array([0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0, 4.0])
    val = pd.DataFrame({"sample_id": [f"v{i}" for i in range(6)], "tag": ["x", "x", "x", "y", "y", "y"],
                        "teacher_score": [1, 1, 0, 1, 1, 0.0], "student_score": [1, 1, 0, 0, 0, 0.0],
                        "teacher_nll": [0.1, 0.2, 0.5, 1.0, 1.5, 3.5]})
    settings = load_config(None, {})["ioa"]
    plan, scored = ioa.build_plan(train, train_nll, val, settings)
    by_module = {m["module"]: m for m in plan["modules"]}
    assert by_module["y"]["gap"] == pytest.approx(1.0) and by_module["x"]["gap"] == 0.0
    assert plan["deficient"] == ["y"]
    assert [[u["unit"] for u in s["units"]] for s in plan["stages"]] == [["x"], ["y"]]  # no split: 3 val rows
    assert scored["unit"].tolist() == ["x", "x", "x", "y", "y", "y"]
    assert plan["dependency"] == ioa.DEPENDENCY_NOTE


# --------------------------------------------------------------------------- adapter checks


def test_a_new_items_body_ends_at_the_first_blank_line_within_its_budget():
    assert candidate_body("A case of rash.\n\nQuestion 5:\nmore", budget_hit=True) == "A case of rash."
    assert candidate_body("A case of rash that never ends", budget_hit=True) is None
    assert candidate_body("A case of rash.", budget_hit=False) == "A case of rash."
    assert candidate_body("  \n\nQuestion", budget_hit=False) is None
    assert writes_options("A case.\nA. yes\nB. no") and not writes_options("A case of B. cereus.")
    # an instruction-following reply may open with the examples' "Question N:" line: it is not the item
    assert candidate_body("Question 4:\nA case of rash.\n\n", budget_hit=False) == "A case of rash."
    assert candidate_body("Question: is it the drug?", budget_hit=False) == "Question: is it the drug?"


def test_items_of_a_task_with_options_per_question_write_their_own_options():
    """Shared options (the demo's labels): a body that lists options does not parse, the others take
    the seeds' options block. Options per question (JMMLU-Med): the item must end with one line per
    seed letter, in order, which become its options before the seeds' instruction."""
    shared = {"own_options": False, "suffix": "\n\nA. yes\nB. no\n\nAnswer with A or B.", "letters": ["A", "B"]}
    assert parse_item("Is it red?\n\nQuestion 5:", False, shared, "choice") == (
        "Is it red?", shared["suffix"], ("A", "B"))
    assert parse_item("Is it red?\nA. yes\nB. no\n\n", False, shared, "choice") is None
    own = {"own_options": True, "suffix": "\n\nA. 1\nB. 2\nC. 3\n\nAnswer with A, B or C.",
           "letters": ["A", "B", "C"], "instruction": "Answer with A, B or C."}
    body, suffix, choices = parse_item("Which organ filters blood?\nA. heart\nB. kidney\nC. lung\n\nQuestion 5:",
                                       False, own, "choice")
    assert (body, choices) == ("Which organ filters blood?", ("A", "B", "C"))
    assert suffix == "\n\nA. heart\nB. kidney\nC. lung\n\nAnswer with A, B or C."
    for broken in ("Which organ?\nA. heart\nB. kidney\n\n",             # an option missing
                   "Which organ?\nA. heart\nC. lung\nB. kidney\n\n",   # out of order
                   "Which organ?\nA. heart\nB. \nC. lung\n\n",         # an empty option
                   "A. heart\nB. kidney\nC. lung\n\n",                # no question
                   "Which organ?\n\n"):                                 # no options at all
        assert parse_item(broken, False, own, "choice") is None, broken


PLAN_M = {"deficient": ["m"], "modules": [{"module": "m", "severity": 1.0, "deficient": True}]}


def test_prompts_show_the_options_only_where_each_question_has_its_own():
    def rows(suffixes):
        return pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(suffixes))], "module": "m", "tag": "t",
                             "teacher_score": 1.0, "teacher_nll": [0.1 * i for i in range(len(suffixes))],
                             "body": [f"question {i}" for i in range(len(suffixes))], "suffix": suffixes,
                             "choices": [["A", "B"]] * len(suffixes), "body_tokens": 3, "suffix_tokens": 5})
    config = load_config(overrides={"ioa.synthesis.shots": 2, "ioa.synthesis.prompts_per_register": 1})
    per_question = _prompt_plan(config, PLAN_M, rows(
        ["\n\nA. x\nB. y\n\nPick.", "\n\nA. u\nB. v\n\nPick.", "\n\nA. p\nB. q\n\nPick."]), list(STRATEGIES))
    assert all(p["own_options"] and p["instruction"] == "Pick." for p in per_question)
    assert all(p["max_body_tokens"] == 3 + 5 for p in per_question)  # the item is written with its options
    assert all(any(line.startswith("A. ") for line in body.splitlines()) for p in per_question for body in p["bodies"])
    shared = _prompt_plan(config, PLAN_M, rows(["\n\nA. x\nB. y\n\nPick."] * 3), [])
    assert not any(p["own_options"] for p in shared) and all(p["max_body_tokens"] == 3 for p in shared)
    assert all(body.startswith("question ") and "A. " not in body for p in shared for body in p["bodies"])


def test_near_duplicates_of_evaluation_training_or_kept_items_are_named():
    evaluation = NgramIndex(["the patient took aspirin and developed a rash after two days"], 4)
    training = NgramIndex(["a man on warfarin had bleeding gums that stopped after the dose was lowered"], 4)
    kept = NgramIndex([], 4)
    assert near_duplicate_reason("The patient took Aspirin and developed a rash after two days.",
                                 evaluation, training, kept, 0.6) == "overlaps_eval"
    assert near_duplicate_reason("A man on warfarin had bleeding gums that stopped after the dose was lowered",
                                 evaluation, training, kept, 0.6) == "copies_train"
    fresh = "a woman on metformin reported nausea which settled within a week of stopping"
    assert near_duplicate_reason(fresh, evaluation, training, kept, 0.6) is None
    kept.add(fresh)
    assert near_duplicate_reason(fresh, evaluation, training, kept, 0.6) == "duplicate"
    # containment by hand: 2 of the item's 3 word 4-grams occur in the reference
    assert ngram_containment("a b c d e f", "x a b c d e y", 4) == pytest.approx(2 / 3)


def test_targeted_modules_get_every_style_and_the_others_a_remedial_reserve():
    """The targeted (most severe deficient) module: three registers and the five strategies, each
    strategy's items playing its register's part; a module that is not deficient: remedial items
    only, so that a failed gate later finds fresh ones."""
    plan = {"deficient": ["m"], "modules": [{"module": "m", "severity": 1.0, "deficient": True},
                                            {"module": "n", "severity": 0.1, "deficient": False}]}
    rows = pd.DataFrame({"sample_id": [f"s{i}" for i in range(8)], "module": ["m"] * 4 + ["n"] * 4, "tag": "t",
                         "teacher_score": 1.0, "teacher_nll": [0.1 * i for i in range(8)],
                         "body": [f"question {i}" for i in range(8)], "suffix": "\n\nA. x\nB. y\n\nPick.",
                         "choices": [["A", "B"]] * 8, "body_tokens": 3, "suffix_tokens": 5})
    config = load_config(overrides={"ioa.synthesis.shots": 2, "ioa.synthesis.prompts_per_register": 2})
    prompts = _prompt_plan(config, plan, rows, list(STRATEGIES))
    styles = {module: [p["strategy"] for p in prompts if p["module"] == module] for module in ("m", "n")}
    assert styles["m"] == [s for s in (*REGISTERS, *STRATEGIES) for _ in range(2)]
    assert styles["n"] == ["remedial", "remedial"]
    parts = {p["strategy"]: p["register"] for p in prompts}
    assert parts == {"remedial": "remedial", "standard": "standard", "bridging": "bridging",
                     "concretization": "standard", "decomposition": "remedial", "cognitive_load": "remedial",
                     "format_template": "standard", "simplification": "remedial"}
    # the two prompts of one style draw their own seeds; a strategy's prompt is an instruction in the
    # chat template beside the examples, a register's the plain list the teacher continues
    render = "<user>{}</user>".format
    strategy = next(p for p in prompts if p["strategy"] == "simplification")
    text = prompt_text(strategy, render)
    assert text.startswith("<user>Here are questions of the kind 'm':") and STRATEGIES["simplification"][1] in text
    assert all(body.strip() in text for body in strategy["bodies"])
    register = next(p for p in prompts if p["strategy"] == "bridging")
    assert prompt_text(register, render).startswith("Harder questions of the kind 'm'")
    assert prompt_text(register, render).endswith(f"Question {len(register['bodies']) + 1}:\n")
    # without strategies (a teacher with no chat template) the targeted module keeps the registers
    assert [p["strategy"] for p in _prompt_plan(config, plan, rows, []) if p["module"] == "m"] == [
        s for s in REGISTERS for _ in range(2)]


def test_the_yield_by_style_sums_modules_and_gives_the_kept_share():
    rows = [{"module": "m", "strategy": "remedial", "register": "remedial", "generated": 10, "kept": 4},
            {"module": "n", "strategy": "remedial", "register": "remedial", "generated": 30, "kept": 2},
            {"module": "m", "strategy": "simplification", "register": "remedial", "generated": 0, "kept": 0},
            {"module": "m", "strategy": "standard", "register": "standard", "generated": 5, "kept": 5}]
    assert yield_by_style(rows) == [
        {"strategy": "remedial", "register": "remedial", "generated": 40, "kept": 6, "kept_rate": 0.15},
        {"strategy": "standard", "register": "standard", "generated": 5, "kept": 5, "kept_rate": 1.0},
        {"strategy": "simplification", "register": "remedial", "generated": 0, "kept": 0, "kept_rate": None}]


def test_each_remedial_round_takes_items_the_student_has_not_seen():
    """Unit u has 5 remedial items and max_remedial 2: ceil(5 / 2) = 3 per round. Round 1 takes the
    first three, round 2 the last two and, spent, one again (counted as repeated); training rows
    and standard items come every round, the other unit's remedial items never."""
    from scd_pipeline.stages.distill.curriculum import CurriculumRecipe

    assert (fresh_remedial(5, 2), fresh_remedial(5, 0), fresh_remedial(0, 3), fresh_remedial(6, 3)) == (3, 5, 0, 2)
    recipe = object.__new__(CurriculumRecipe)
    units = np.array(["u", "u", "u", "u", "u", "u", "u", "v", "v"], dtype=object)
    registers = np.array(["", "standard", "remedial", "remedial", "remedial", "remedial", "remedial",
                          "", "remedial"], dtype=object)
    recipe.curriculum = type("C", (), {"units": units, "registers": registers})()
    recipe.stages, recipe.config = [["u", "v"]], {"seed": 0}
    recipe.ioa = {"max_remedial": 2, "replay_share": 0.0}
    used: list[int] = []
    first, counts = recipe.pass_rows(0, ["u"], 1, used)
    assert first == [0, 1, 2, 3, 4] and counts == {"train": 1, "synthetic": 4, "replay": 0, "remedial": 3,
                                                    "repeated": 0}
    second, counts = recipe.pass_rows(0, ["u"], 2, used)
    assert second == [0, 1, 2, 5, 6] and counts["remedial"] == 3 and counts["repeated"] == 1
    assert recipe.pass_rows(0, None, 3, [])[0] == [0, 1, 7]  # a first pass: no remedial items


def test_the_cap_takes_candidates_in_turn_over_the_registers():
    # module m: 3 remedial, 2 standard, 1 bridging candidate, in generation order; module n: 1 each
    keys = [("m", "remedial")] * 3 + [("m", "standard")] * 2 + [("m", "bridging"), ("n", "bridging"),
                                                                  ("n", "remedial")]
    order = interleaved(keys)
    assert order == [0, 3, 5, 1, 4, 2, 7, 6]
    assert [keys[i][1] for i in order[:3]] == ["remedial", "standard", "bridging"]  # a cap of 3 keeps one of each


def test_register_pools_use_the_modules_own_difficulty_and_length():
    rows = pd.DataFrame({"sample_id": list("abcdef"), "teacher_nll": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                         "body_tokens": [30, 10, 20, 5, 50, 40]})
    pools = register_pools(rows)
    assert pools["bridging"]["sample_id"].tolist() == ["e", "f"]      # hardest third by T* NLL
    assert pools["remedial"]["sample_id"].tolist() == ["b", "c"]      # shortest of the easier half
    assert len(pools["standard"]) == 6


# --------------------------------------------------------------------------- methods


def test_ioa_composes_with_schedules_and_weightings():
    assert parse_method("ioa").name == "ioa" and parse_method("ioa").schedule == "td"
    assert parse_method("ioa").curriculum and not parse_method("td").curriculum
    assert parse_method("scd_aw+ioa").name == "scd_aw+ioa" and parse_method("scd_aw+ioa").label == "SCD+AW+IOA"
    assert parse_method("td+ioa").name == "ioa"
    assert parse_method("cd+paced+ioa").name == "cd+paced+ioa"
    with pytest.raises(ConfigError, match="TAID's t schedule"):
        parse_method("taid+ioa")
    with pytest.raises(ConfigError, match="each once"):
        parse_method("ioa+ioa")


# --------------------------------------------------------------------------- the curriculum on tiny models

DEFICIENT = "agreeing_cues"
PER_PROMPT = 6
TINY = {
    "task": "demo", "results_dir": "results",
    "data": {"demo": {"n_examples": 200, "test_size": 8}, "max_train_samples": 24},
    "models": {"teacher": {"source": "tiny:llama"}, "student": {"keep_every": 2}},
    "sft": {"batch_size": 4, "val_max_samples": 8, "teacher": {"n_checkpoints": 2, "epochs": 1, "lr": 0.01},
            "student": {"epochs": 1, "lr": 0.01}},
    "cache": {"top_k": 8},
    "subdomains": {"probe_size": 8},
    "distill": {"phases": 2, "epochs_per_phase": 1, "batch_size": 4, "log_every": 1},
    "ioa": {"max_remedial": 1, "synthesis": {"prompts_per_register": 1, "per_prompt": PER_PROMPT,
                                             "min_confidence": 0.0, "max_items_per_module": 2,
                                             "batch_size": 2}},
}


def run_cli(root: Path, *args: str) -> str:
    old = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, [*args, "--config", "tiny.yaml"])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def fake_generate(bodies: dict[str, str]):
    """Stands in for the teacher's sampling: per prompt, one item of each fate (see the test)."""
    calls = {"n": 0}

    def generate(model, tokenizer, prompts, max_new_tokens, stop_ids, samples=1, temperature=0.0):
        outputs = []
        for _ in prompts:
            calls["n"] += 1
            fresh = f"Case {calls['n']}: a patient started drug {calls['n']} and a rash began three days later."
            texts = [(fresh + "\n\nQuestion", True),                      # kept (unless over the cap)
                     ("a body that runs on and on " * 20, False),         # no end within its budget
                     ("A case.\nA. unrelated\nB. unlikely\n\n", True),    # writes its own options
                     (bodies["val"] + "\n\n", True),                      # a validation row's text
                     (bodies["train"] + "\n\n", True),                    # a training row's text
                     (fresh + "\n\n", True)]                              # the first item again
            assert len(texts) == samples
            outputs += [(tokenizer(text, add_special_tokens=False).input_ids, stopped) for text, stopped in texts]
        return outputs

    return generate


def weaker_student_on(tag: str):
    """The diagnosed student scores 0 on ``tag``'s validation rows, T* scores 1 on every row: ``tag`` is
    the one deficient module (the rest of the plan runs on the models' real predictions)."""
    real = ioa._val_predictions

    def predictions(model_dir, frame, config, where):
        scored = real(model_dir, frame, config, where)
        student = Path(model_dir).name in ("student_sft", "student_base")
        scored["score"] = np.where(student & (frame["tag"].to_numpy() == tag), 0.0, 1.0)
        return scored

    return predictions


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    """The tiny pipeline up to two curriculum students (ioa, scd_aw+ioa), with one deficient
    module and scripted teacher generations; returns the folder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ioa")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    for command in (["prepare-model", "--role", "teacher"], ["prepare-model", "--role", "student"],
                    ["prepare-data"], ["sft", "--role", "teacher"], ["sft", "--role", "student"],
                    ["cache-logits", "--checkpoint", "1"], ["cache-logits", "--checkpoint", "2"],
                    ["estimate-subdomains"]):
        run_cli(root, *command)
    task = root / "results" / "demo"
    val = read_split(task / "data" / "val.parquet")
    train = read_split(task / "data" / "train.parquet")
    bodies = {"val": val["question"].iat[0].split("\nA. ")[0], "train": train["question"].iat[0].split("\nA. ")[0]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ioa, "_val_predictions", weaker_student_on(DEFICIENT))
        run_cli(root, "ioa-plan")
        patch.setattr(scoring, "generate", fake_generate(bodies))
        run_cli(root, "synthesize")
    for command in (["cache-logits", "--synthetic", "--checkpoint", "1"],
                    ["cache-logits", "--synthetic", "--checkpoint", "2"],
                    # ioa with an open budget (every stage gated to its end); scd_aw+ioa matched (the default)
                    ["estimate-subdomains", "--synthetic"], ["distill", "--method", "ioa", "--set", "ioa.budget=open"],
                    ["distill", "--method", "scd_aw+ioa"], ["distill", "--method", "td+synthetic"]):
        run_cli(root, *command)
    return root


def test_plan_marks_the_weaker_module_deficient_and_stages_it_last(curriculum_run):
    plan = json.loads((curriculum_run / "results/demo/ioa/plan.json").read_text())
    assert plan["deficient"] == [DEFICIENT] and plan["basis"] == "tag"
    # distill.init: base (the default): the curriculum trains the base student, so it is the one diagnosed
    assert plan["diagnosed"] == "student_base" and plan["student"].endswith("models/student_base")
    assert plan["stages"][-1]["units"][0]["module"] == DEFICIENT  # P_S 0 against 1 elsewhere: hardest
    scores = pd.read_parquet(curriculum_run / "results/demo/ioa/val_scores.parquet")
    assert set(scores.columns) >= {"sample_id", "tag", "unit", "teacher_score", "student_score", "teacher_nll"}


def test_synthesis_keeps_only_items_that_parse_and_are_new_and_says_why_the_others_went(curriculum_run):
    task = curriculum_run / "results/demo"
    summary = json.loads((task / "ioa/synthesis.json").read_text())
    # the deficient module: one prompt per register and per strategy (8); the three other tags: one
    # remedial prompt each (their reserve for a failed gate)
    assert summary["deficient"] == [DEFICIENT] and summary["prompts"] == 8 + 3
    assert summary["strategies"] == list(STRATEGIES) and summary["strategies_skipped"] is None
    assert summary["generated"] == 11 * PER_PROMPT
    # per prompt: 2 unparsable (no end, own options), 1 overlaps a validation row, 1 copies a
    # training row, and a fresh item followed by its repeat. Candidates are taken in turn over a
    # module's styles: the deficient module's cap (2) keeps the first two fresh items (remedial,
    # standard; their repeats are duplicates), its six other fresh items and their repeats are over
    # it; each other module keeps its one fresh item and calls the repeat a duplicate.
    assert summary["rejected"] == {"unparsable": 22, "unconfident": 0, "overlaps_eval": 11, "copies_train": 11,
                                   "duplicate": 2 + 3, "over_cap": 12}
    assert summary["kept"] == 2 + 3
    by_style = {row["strategy"]: row for row in summary["yield_by_style"]}
    assert by_style["remedial"]["generated"] == 4 * PER_PROMPT and by_style["remedial"]["kept"] == 4
    assert by_style["simplification"]["kept_rate"] == 0 and by_style["standard"]["kept_rate"] == 1 / PER_PROMPT
    assert {e["strategy"] for e in summary["examples"]} == {"remedial", "standard"}
    items = read_split(task / "data/synthetic.parquet")
    train = read_split(task / "data/train.parquet")
    assert set(train.columns) < set(items.columns)
    assert {"module", "register", "strategy", "source_ids", "teacher_confidence"} <= set(items.columns)
    assert sorted(items["module"].unique()) == sorted(train["tag"].unique())
    deficient = items[items["module"] == DEFICIENT]
    assert deficient["register"].tolist() == ["remedial", "standard"] == deficient["strategy"].tolist()
    assert (items[items["module"] != DEFICIENT]["register"] == "remedial").all()
    assert all(set(ids) <= set(train["sample_id"]) for ids in items["source_ids"])
    # the teacher's own answer: its most probable letter, and that letter's probability
    assert items["answer"].isin(["A", "B", "C", "D"]).all()
    assert ((items["teacher_confidence"] > 0) & (items["teacher_confidence"] <= 1)).all()
    assert not (task / ".state/synthesize").exists()  # the resume log is gone once published


def test_an_unconfident_teacher_keeps_nothing(curriculum_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(curriculum_run, root, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("students"))
    task = root / "results/demo"
    val = read_split(task / "data/val.parquet")
    train = read_split(task / "data/train.parquet")
    bodies = {"val": val["question"].iat[0].split("\nA. ")[0], "train": train["question"].iat[0].split("\nA. ")[0]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring, "generate", fake_generate(bodies))
        run_cli(root, "synthesize", "--set", "ioa.synthesis.min_confidence=0.99")
    summary = json.loads((task / "ioa/synthesis.json").read_text())
    # confidence is checked after the format: every item that parses (4 per prompt) goes for it
    assert summary["kept"] == 0 and summary["rejected"]["unconfident"] == 11 * 4
    assert summary["rejected"]["unparsable"] == 11 * 2
    assert len(read_split(task / "data/synthetic.parquet")) == 0


def test_a_synthetic_cache_of_other_items_is_refused(curriculum_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(curriculum_run, root, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("students"))
    task = root / "results/demo"
    config = load_config(root / "tiny.yaml", {"results_dir": str(root / "results")})
    open_task_cache(config, 2, synthetic=True)  # current: accepted
    items = pd.read_parquet(task / "data/synthetic.parquet")
    items.iloc[:1].to_parquet(task / "data/synthetic.parquet", index=False)  # the items changed
    with pytest.raises(DataError, match="dataset_fingerprint"):
        open_task_cache(config, 2, synthetic=True)
    with pytest.raises(DataError, match="dataset_fingerprint"):
        run_distill(config, "ioa", name="stale")


def test_curriculum_trains_stage_by_stage_through_the_mastery_gates(curriculum_run):
    task = curriculum_run / "results/demo"
    plan = json.loads((task / "ioa/plan.json").read_text())
    record = json.loads((task / "students/ioa/curriculum.json").read_text())
    schedule = json.loads((task / "students/ioa/schedule.json").read_text())
    passes = record["passes"]
    assert [p["stage"] for p in passes if p["kind"] == "first"] == list(range(1, len(plan["stages"]) + 1))
    teacher = record["teacher_scores"]
    stage_units = [[u["unit"] for u in stage["units"]] for stage in plan["stages"]]
    for entry in passes:  # every gate: the live student's score on every unit of the stage, then the rule
        ratios = {u: entry["scores"][u] / teacher[u] for u in stage_units[entry["stage"] - 1]}
        assert entry["ratios"] == pytest.approx(ratios)
        # remedial rounds the stage has had when this gate decides (this pass included)
        remedial_done = sum(p["kind"] == "remedial" for p in passes
                            if p["stage"] == entry["stage"] and p["pass"] <= entry["pass"])
        assert entry["decision"] == mastery_decision(ratios, 0.9, remedial_done, 1)
    # max_remedial 1: a stage has at most 2 passes, the second one remedial
    for stage in {p["stage"] for p in passes}:
        kinds = [p["kind"] for p in passes if p["stage"] == stage]
        assert kinds in (["first"], ["first", "remedial"])
    # the deficient module's stage trains on its synthetic items, later stages replay earlier ones
    last = [p for p in passes if p["units"] == [DEFICIENT] and p["kind"] == "first"][0]
    assert last["rows"]["synthetic"] == 1 and last["rows"]["replay"] > 0  # the standard item
    assert len(schedule["phases"]) == len(passes)
    assert all(phase["checkpoint"] == schedule["best_index"] for phase in schedule["phases"])  # ioa: T*
    assert schedule["lr_schedule"] == "per_phase"  # open length: every pass restarts, whatever distill.schedule says
    assert schedule["budget_steps"] is None and record["budget"] == "open" and record["ended"] == "last gate"
    scd = json.loads((task / "students/scd_aw+ioa/schedule.json").read_text())
    assert all(phase["candidates"] for phase in scd["phases"])  # SCD's choice at every pass start


def test_the_synthetic_control_trains_on_the_curriculums_data_without_it_at_the_same_budget(curriculum_run):
    """td+synthetic: the 24 training rows plus the kept synthetic items, no curriculum, each phase
    one epoch over them cut at the plain method's 6 steps: 12 steps, the plain method's budget."""
    task = curriculum_run / "results/demo"
    schedule = json.loads((task / "students/td+synthetic/schedule.json").read_text())
    kept = len(read_split(task / "data/synthetic.parquet"))
    assert kept > 0 and schedule["synthetic_rows"] == kept and schedule["rows"] == 24 + kept
    assert [p["last_step"] - p["first_step"] + 1 for p in schedule["phases"]] == [6, 6]
    assert schedule["total_steps"] == schedule["budget_steps"] == 12 and schedule["lr_schedule"] == "whole_run"
    assert not (task / "students/td+synthetic/curriculum.json").exists()
    assert parse_method("td+synthetic").label == "TD+SYNTHETIC" and not parse_method("td+synthetic").curriculum
    with pytest.raises(ConfigError, match="the curriculum trains on the synthetic items already"):
        parse_method("ioa+synthetic")


def test_a_matched_curriculum_spends_the_plain_methods_steps_under_one_schedule(curriculum_run):
    """ioa.budget: matched (the default): 2 phases x 1 epoch over 24 rows in micro-batches of 4 =
    12 optimizer steps, the plain method's, under distill.schedule (whole_run: one AdamW state, one
    LR schedule); the gates decide how they are spent, and the curriculum stops when they are."""
    task = curriculum_run / "results/demo"
    schedule = json.loads((task / "students/scd_aw+ioa/schedule.json").read_text())
    record = json.loads((task / "students/scd_aw+ioa/curriculum.json").read_text())
    opened = json.loads((task / "students/ioa/schedule.json").read_text())
    assert schedule["budget_steps"] == 12 and record["budget"] == "matched"
    assert schedule["lr_schedule"] == "whole_run"
    assert record["ended"] in ("budget", "last gate")
    assert schedule["total_steps"] == 12 if record["ended"] == "budget" else schedule["total_steps"] <= 12
    assert opened["total_steps"] > 12  # the open curriculum ran past the plain method's budget
    last = schedule["phases"][-1]
    assert last["last_step"] == schedule["total_steps"] and schedule["train_tokens"] > 0


def test_a_killed_curriculum_run_resumes_mid_stage_to_the_same_student(curriculum_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(curriculum_run, root, copy_function=shutil.copy2)
    config = load_config(root / "tiny.yaml", {"results_dir": str(root / "results"),
                                              "distill.resume_every_minutes": 0, "ioa.budget": "open"})
    reference = json.loads((root / "results/demo/students/ioa/curriculum.json").read_text())
    middle = reference["passes"][1]
    kill_at = middle["first_step"]  # inside the second pass, after its first step

    def kill(info):
        if info.step == kill_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(config, "ioa", name="resumed", after_step=kill)
    steps = []
    run_distill(config, "ioa", name="resumed", after_step=steps.append)
    assert steps[0].step == kill_at + 1
    students = root / "results/demo/students"
    assert json.loads((students / "resumed/curriculum.json").read_text())["passes"] == reference["passes"]
    from safetensors.torch import load_file

    expected = load_file(students / "ioa" / "model.safetensors")
    for key, value in load_file(students / "resumed" / "model.safetensors").items():
        torch.testing.assert_close(value, expected[key])


def test_report_shows_the_curriculum_rows_plot_and_synthesis_yield(curriculum_run):
    for model in ("students/ioa", "students/scd_aw+ioa", "student_sft", "teacher/ckpt-2"):
        run_cli(curriculum_run, "evaluate", "--model", f"results/demo/{model}")
    run_cli(curriculum_run, "report", "--set", "distill.methods=[ioa,scd_aw+ioa]")
    task = curriculum_run / "results/demo"
    text = (task / "report.md").read_text()
    assert "| IOA " in text and "| SCD+AW+IOA " in text
    assert "## IOA curriculum" in text and "### Synthetic data (Adapter)" in text
    assert (task / "plots/curriculum_ioa.png").is_file() and (task / "plots/curriculum_scd_aw_ioa.png").is_file()
    assert re.search(rf"\|\s*{DEFICIENT}\s*\|\s*remedial\s*\|\s*{PER_PROMPT}\s*\|\s*1\s*\|", text)
    summary = pd.read_csv(task / "summary.csv")
    assert {"IOA", "SCD+AW+IOA"} <= set(summary["model"])
    assert "The mastery gates score the live student on the validation split" in text
    table = re.split(r"\| Student +\| Optimizer steps", text)[1].split("\n\n")[0].splitlines()[2:]
    spent = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table}
    steps = json.loads((task / "students/ioa/curriculum.json").read_text())["steps"]
    assert spent["IOA"][0] == str(steps) and spent["IOA"][2:] == ["per_phase", "open, ended at last gate"]
    # the yield per style, summed over modules: 4 remedial prompts (the deficient module and the
    # three others' reserve) of which 4 items were kept; the strategies' items were over the cap
    assert re.search(rf"\|\s*remedial\s*\|\s*remedial\s*\|\s*{4 * PER_PROMPT}\s*\|\s*4\s*\|", text)
    assert re.search(rf"\|\s*simplification\s*\|\s*remedial\s*\|\s*{PER_PROMPT}\s*\|\s*0\s*\|", text)
    assert spent["SCD+AW+IOA"][0] == "12" and spent["SCD+AW+IOA"][2:] == ["whole_run", "matched, ended at budget"]
    assert "not the paper's 0.3" not in text  # the default τ_gap is the paper's
    plan_file = task / "ioa/plan.json"
    original = plan_file.read_text()
    plan = json.loads(original)
    plan["thresholds"]["tau_gap"] = 0.2
    plan_file.write_text(json.dumps(plan))
    try:
        run_cli(curriculum_run, "report", "--set", "distill.methods=[ioa,scd_aw+ioa]")
        assert "τ_gap is 0.2 in this run, not the paper's 0.3" in (task / "report.md").read_text()
    finally:
        plan_file.write_text(original)


def test_curriculum_commands_have_help():
    for command in ("ioa-plan", "synthesize"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "IOA" in result.output
    assert "--synthetic" in CliRunner().invoke(app, ["cache-logits", "--help"]).output
