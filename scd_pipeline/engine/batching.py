"""Batches of prompt + completion, and completion-only logits.

Every stage that runs a model over a data split (SFT, evaluation, logit caching, distillation)
uses these functions, so the positions a teacher cache stores are exactly the positions a student
is trained on. Sequences are right-padded; position ``t`` predicts token ``t + 1``, so the
completion tokens ``completion_ids`` are predicted from positions ``len(prompt) - 1 ...
len(prompt) + len(completion) - 2``. The LM head runs only at those positions: the full
(batch, sequence, vocab) tensor is never built.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from scd_pipeline.errors import DataError

SPLIT_COLUMNS = ("sample_id", "tag", "kind", "choices", "answer", "label", "prompt_ids",
                 "completion_ids", "weight")


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a prepared split (``data/{train,val,test}.parquet``) with a one-line error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split not found (run `scd-pipeline prepare-data` first)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc.__class__.__name__})") from exc
    missing = [column for column in SPLIT_COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; re-run `scd-pipeline prepare-data`")
    return frame


@dataclass
class Batch:
    """A right-padded batch. ``predict_mask`` marks positions whose next token is a completion token."""

    input_ids: torch.Tensor        # (B, L) long
    attention_mask: torch.Tensor   # (B, L) long
    predict_mask: torch.Tensor     # (B, L) bool
    target_ids: torch.Tensor       # (N,) long: completion tokens in row-major order of predict_mask
    token_sample: torch.Tensor     # (N,) long: batch row of each completion token
    index: list[int]               # row positions in the source frame

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.predict_mask.to(device), self.target_ids.to(device),
                     self.token_sample.to(device), self.index)

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
            index: Sequence[int] | None = None) -> Batch:
    """Concatenate each prompt with its completion and right-pad to the longest sequence."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    batch_size = len(lengths)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    predict_mask = torch.zeros((batch_size, width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if len(prompt) == 0 or len(completion) == 0:
            raise DataError(f"row {row}: empty prompt or completion cannot be trained or scored")
        sequence = list(prompt) + list(completion)
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        predict_mask[row, len(prompt) - 1 : len(sequence) - 1] = True
    target_ids = torch.tensor([t for c in completions for t in c], dtype=torch.long)
    token_sample = torch.repeat_interleave(torch.arange(batch_size),
                                           torch.tensor([len(c) for c in completions]))
    return Batch(input_ids, attention_mask, predict_mask, target_ids, token_sample,
                 list(index) if index is not None else list(range(batch_size)))


def frame_batch(frame: pd.DataFrame, rows: Sequence[int], pad_id: int) -> Batch:
    """Collate the given row positions of a split frame."""
    prompts = [frame["prompt_ids"].iat[i] for i in rows]
    completions = [frame["completion_ids"].iat[i] for i in rows]
    return collate(prompts, completions, pad_id, rows)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int | None = None,
                           group_factor: int = 50) -> list[list[int]]:
    """Batches of similar length, so padding stays small.

    Without a seed: sorted by length (deterministic order, for inference). With a seed: shuffle,
    sort within mega-batches of ``group_factor * batch_size`` rows, then shuffle the batches.
    """
    order = list(range(len(lengths)))
    if seed is None:
        order.sort(key=lambda i: (lengths[i], i))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    mega = batch_size * group_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def completion_hidden_states(model, batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions that predict completion tokens: (N, hidden)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # no KV cache: one full pass only
    return hidden[batch.predict_mask]


def completion_logits(model, batch: Batch) -> torch.Tensor:
    """Logits (N, vocab) at completion positions only; the LM head never sees prompt positions."""
    logits = model.get_output_embeddings()(completion_hidden_states(model, batch))
    return logits.float()


def per_sample_sum(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum per-token values (N,) into per-sample totals (B,)."""
    out = torch.zeros(batch.num_samples, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.token_sample, values)


def completion_token_counts(batch: Batch) -> torch.Tensor:
    return torch.bincount(batch.token_sample, minlength=batch.num_samples)
