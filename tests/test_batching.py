"""Completion-only logits equal the full forward's logits at the completion positions."""

from __future__ import annotations

import torch

from scd_pipeline.engine.batching import (
    collate,
    completion_logits,
    length_grouped_batches,
    per_sample_sum,
)
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama


def test_completion_logits_match_full_forward_at_completion_positions():
    tokenizer = byte_level_tokenizer()
    model = tiny_llama(tokenizer, num_layers=2)
    batch = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], tokenizer.pad_token_id)
    # Row 0: prompt length 3 -> positions 2, 3 predict 10, 11; row 1: positions 1, 2, 3.
    assert batch.predict_mask.nonzero().tolist() == [[0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    assert batch.target_ids.tolist() == [10, 11, 12, 13, 14]
    assert batch.token_sample.tolist() == [0, 0, 1, 1, 1]
    with torch.no_grad():
        sliced = completion_logits(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(sliced, full[batch.predict_mask], rtol=1e-5, atol=1e-5)
    # Right padding must not change a row's logits: row 0 alone gives the same values.
    alone = collate([[5, 6, 7]], [[10, 11]], tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(completion_logits(model, alone), sliced[:2], rtol=1e-5, atol=1e-5)


def test_per_sample_sum_groups_token_values():
    batch = collate([[1], [2]], [[3, 4, 5], [6]], pad_id=0)
    totals = per_sample_sum(torch.tensor([1.0, 2.0, 3.0, 10.0]), batch)
    assert totals.tolist() == [6.0, 10.0]


def test_length_grouped_batches_cover_every_row_once_and_group_lengths():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    for seed in (None, 0, 1):
        batches = length_grouped_batches(lengths, batch_size=2, seed=seed, group_factor=4)
        assert sorted(i for b in batches for i in b) == list(range(8))
        assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in batches)
    assert length_grouped_batches(lengths, 2, seed=3) == length_grouped_batches(lengths, 2, seed=3)
    assert length_grouped_batches(lengths, 2, seed=None)[0] == [0, 2]
