"""The one scoring path: a sample's score is the task metric of that sample, and PACED's pass rate
on list tasks is the share of K sampled answers that score a pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluate import list_rows, one_torch_thread  # noqa: F401 (fixture)

from scd_pipeline.engine.batching import frame_batch
from scd_pipeline.engine.scoring import (
    PassRule,
    generation_budget,
    list_pass_rate,
    pass_rates,
    predict_split,
    sample_score,
)
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama
from scd_pipeline.engine.training import CompletionLM, per_sample_mean_nll
from scd_pipeline.math.weighting import paced_weight


def test_sample_score_is_the_task_metric_of_one_sample():
    assert sample_score("choice", "B", "B") == 1.0 and sample_score("choice", "B", "C") == 0.0
    # gold {fever, cough}, prediction {fever, rash}: precision 1/2, recall 1/2 -> F1 1/2
    assert sample_score("list", '["fever", "cough"]', '["fever", "rash"]') == pytest.approx(0.5)
    assert sample_score("list", "[]", "[]") == 1.0 and sample_score("list", '["x"]', "[]") == 0.0


def test_list_pass_rate_by_hand():
    gold = ["chest pain", "cough"]
    answers = ['["chest pain", "cough"]',  # exact F1 1
               '["chest pain"]',            # exact F1 2/3, partial 2/3
               '["chest", "cough"]',        # exact F1 1/2, partial F1 1 ("chest" is in "chest pain")
               "no list at all",             # malformed: [] -> 0
               '["fever"]']                  # 0
    assert list_pass_rate(gold, answers, PassRule(metric="exact_f1", threshold=0.5)) == pytest.approx(3 / 5)
    assert list_pass_rate(gold, answers, PassRule(metric="exact_f1", threshold=0.9)) == pytest.approx(1 / 5)
    assert list_pass_rate(gold, answers, PassRule(metric="partial_f1", threshold=0.9)) == pytest.approx(2 / 5)


def trained_list_model(steps: int):
    """A tiny model trained a little on nrner-shaped rows (JSON lists of findings): far enough to
    write lists, not so far that every sample is always right."""
    tokenizer = byte_level_tokenizer()
    answers = [["fever"], ["cough", "rash"], ["pain"], ["fever", "cough"], ["rash"], ["cold", "pain"], [],
               ["flu"]]
    frame = pd.DataFrame(list_rows(tokenizer, answers))
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wrapper = CompletionLM(model)
    batch = frame_batch(frame, list(range(len(frame))), tokenizer.pad_token_id)
    for _ in range(steps):
        per_sample_mean_nll(wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask), batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, frame


def test_paced_pass_rates_on_a_list_task_spread_over_zero_to_one():
    model, tokenizer, frame = trained_list_model(steps=70)
    rule = PassRule(samples=8, metric="exact_f1", threshold=0.5, max_new_tokens=24, seed=0)
    rates = pass_rates(model, tokenizer, frame, batch_size=8, rule=rule)
    # every rate is a share of 8 samples, and the weights p(1 - p) do not vanish
    np.testing.assert_allclose(rates * 8, np.round(rates * 8))
    inside = (rates > 0) & (rates < 1)
    assert inside.sum() >= 3, rates
    assert (paced_weight(torch.from_numpy(rates))[torch.from_numpy(inside)] > 0.05).all()
    # seeded: the same model and seed give the same rates, and the training RNG is left alone
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    np.testing.assert_array_equal(pass_rates(model, tokenizer, frame, 8, rule), rates)
    assert torch.equal(torch.rand(1), before)


def test_choice_pass_rate_is_the_probability_of_the_gold_letter():
    from test_evaluate import choice_rows

    tokenizer = byte_level_tokenizer()
    frame = pd.DataFrame(choice_rows(tokenizer, 0, 6))
    model = tiny_llama(tokenizer, seed=3).eval()
    rates = pass_rates(model, tokenizer, frame, batch_size=4, rule=PassRule())
    for row in range(len(frame)):
        sequence = list(frame["prompt_ids"].iat[row])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sequence])).logits[0, -1]
        gold = int(frame["completion_ids"].iat[row][0])
        assert rates[row] == pytest.approx(float(torch.softmax(logits, -1)[gold]), rel=1e-4)


def test_auto_generation_budget_is_the_longest_gold_answer_plus_a_quarter():
    frame = pd.DataFrame({"kind": ["list", "list", "choice", "list"],
                          "completion_ids": [[1] * 10, [1] * 80, [1] * 200, [1] * 3]})
    assert generation_budget(frame, "auto") == 80 + 20      # the choice row generates nothing
    assert generation_budget(frame.iloc[[0, 3]], "auto") == 10 + 16  # at least 16 more
    assert generation_budget(frame.iloc[[2]], "auto") == 16
    assert generation_budget(frame, 64) == 64


def test_answers_cut_by_the_budget_are_counted_and_warned_about(capsys):
    """A budget of 2 tokens (bytes) cuts every answer before its end of turn, even ``[]``; with
    ``auto`` (the longest gold list + its quarter, >= 16) the trained model finishes its lists."""
    model, tokenizer, frame = trained_list_model(steps=70)
    predict_split(model, tokenizer, frame, batch_size=8, max_new_tokens=2, where="lists")
    assert "warning: lists: 8 of 8 generated answers reached max_new_tokens = 2" in capsys.readouterr().err
    predict_split(model, tokenizer, frame, batch_size=8, max_new_tokens="auto", where="lists")
    assert "reached max_new_tokens" not in capsys.readouterr().err
