"""Scoring a model on a prepared split: the one path that evaluation, SFT validation, the teacher
caches, the subdomains and PACED's pass rates all use, so "correct" means the same everywhere.

A sample's *score* is the task metric computed on that one sample (``sample_score``):

- ``choice``: the options are ranked by the log-probability of their letter token at the first
  completion position (one teacher-forced forward, no free generation); score 1 when the top
  option is the gold one, else 0 (ties: the first option);
- ``list``: greedy generation, the first JSON / Python list in the output parsed (malformed output
  counts as an empty list); score = that document's exact-match F1 against the gold list.

The same teacher-forced forward also gives the gold completion's log-likelihood (temperature 1).
PACED's pass rate (SPEC 4.4) is the probability that one *sampled* answer scores a pass:
``choice``: the model's probability of the gold letter at the first completion position (exact,
no sampling); ``list``: the share of K sampled answers (seeded) whose exact- or partial-match F1
is at least a threshold.
"""

from __future__ import annotations

import ast
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from scd_pipeline.engine import sharding, worklog
from scd_pipeline.engine.batching import (
    Batch,
    completion_logits,
    completion_token_counts,
    frame_batch,
    length_grouped_batches,
    per_sample_sum,
)
from scd_pipeline.errors import DataError
from scd_pipeline.math.metrics import (
    choice_metrics,
    exact_f1_document,
    list_metrics,
    partial_f1_document,
)

SAMPLE_METRIC = {"choice": "accuracy (1 if the top-ranked option letter is the gold one, else 0)",
                 "list": "exact-match F1 of the document's parsed list against the gold list"}
LIST_PASS_METRICS = {"exact_f1": exact_f1_document, "partial_f1": partial_f1_document}


# --- the split's task ------------------------------------------------------------------------------

def split_kind(frame: pd.DataFrame, where: str) -> str:
    """The split's task kind (``choice`` or ``list``); mixed kinds are a data error."""
    kinds = sorted(set(frame["kind"]))
    if len(kinds) != 1 or kinds[0] not in ("choice", "list"):
        raise DataError(f"{where}: column kind holds {kinds}; expected one of choice or list for all rows")
    return kinds[0]


def choice_categories(frame: pd.DataFrame) -> list[str]:
    """Option letters in their order of appearance (the order of an ordered scale)."""
    seen: dict[str, None] = {}
    for choices in frame["choices"]:
        for letter in choices:
            seen.setdefault(str(letter), None)
    return list(seen)


def letter_token_ids(tokenizer, frame: pd.DataFrame, where: str) -> dict[str, int]:
    """Token id of each option letter; each gold completion must start with its letter's token."""
    ids: dict[str, int] = {}
    for letter in choice_categories(frame):
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise DataError(f"{where}: option {letter!r} is {len(encoded)} tokens; ranking by "
                            "log-likelihood needs single-token option letters")
        ids[letter] = encoded[0]
    for sample_id, answer, completion in zip(frame["sample_id"], frame["answer"], frame["completion_ids"], strict=True):
        if answer not in ids or completion[0] != ids[answer]:
            raise DataError(f"{where}: row {sample_id}: completion_ids start with token "
                            f"{completion[0]}, not the token of answer {answer!r} "
                            f"({ids.get(answer)}); was the split prepared with another tokenizer?")
    return ids


# --- list outputs ----------------------------------------------------------------------------------

def parse_list_output(text: str) -> list[str] | None:
    """The list in a model's output (JSON or Python literal, first '[' to last ']'), or None.

    Items must be strings or numbers (kept as strings); anything else is malformed.
    """
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        return None
    snippet = text[start : end + 1]
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(snippet)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                           for v in value):
            return [str(v) for v in value]
    return None


def gold_list(text: str, sample_id: str) -> list[str]:
    """A list task's gold ``answer`` (a JSON list), with a one-line error naming the row."""
    parsed = parse_list_output(text)
    if parsed is None:
        raise DataError(f"row {sample_id}: column answer {text!r} is not a JSON list")
    return parsed


def sample_score(kind: str, gold: str, prediction: str, sample_id: str = "?") -> float:
    """The task metric of one sample: 1.0 / 0.0 for a letter, the exact-match F1 for a list
    (``prediction`` as written to predictions.parquet: a letter, or a JSON list)."""
    if kind == "choice":
        return float(gold == prediction)
    return exact_f1_document(gold_list(gold, sample_id), json.loads(prediction))


def stop_token_ids(tokenizer, frame: pd.DataFrame) -> list[int]:
    """Generation stops at end-of-sequence or at the split's end-of-turn token."""
    return sorted({tokenizer.eos_token_id, *(int(c[-1]) for c in frame["completion_ids"])})


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             stop_ids: Sequence[int], samples: int = 1, temperature: float = 0.0) -> list[tuple[list[int], bool]]:
    """Continuations of left-padded prompts: greedy when ``temperature`` is 0, else ``samples``
    sampled continuations per prompt (prompt-major order). Each is ``(token ids before the first
    stop token, whether a stop token came)``."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = _left_padded(prompts, pad_id)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
                "num_return_sequences": samples} if temperature > 0 else {"do_sample": False}
    started = time.perf_counter()
    # a sharded model's processes decode in step until the last one is done (each forward gathers)
    synced = sharding.several_processes() and sharding.is_sharded(model)
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                            pad_token_id=pad_id, synced_gpus=synced, **sampling)
    copies = samples if temperature > 0 else 1  # every row decodes until the batch's last one stops
    worklog.add("generate", int(attention_mask.sum()) * copies + output.shape[0] * (output.shape[1] - input_ids.shape[1]),
                time.perf_counter() - started)
    stops = set(stop_ids)
    continuations = []
    for row in output[:, input_ids.shape[1]:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), None)
        continuations.append((row, False) if cut is None else (row[:cut], True))
    return continuations


def generate_texts(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_ids: Sequence[int], samples: int = 1, temperature: float = 0.0) -> list[tuple[str, bool]]:
    """:func:`generate`'s continuations as text (up to the first stop token), each with whether a
    stop token came (False: the budget cut it)."""
    return [(tokenizer.decode(ids, skip_special_tokens=True), stopped)
            for ids, stopped in generate(model, tokenizer, prompts, max_new_tokens, stop_ids, samples, temperature)]


AUTO = "auto"


def generation_budget(frame: pd.DataFrame, max_new_tokens: int | str) -> int:
    """Tokens greedy generation may write for the list rows of ``frame``: ``max_new_tokens``, or with
    ``auto`` the longest gold completion among them plus a quarter of it, at least 16 more (an
    answer cut short has no closing bracket, parses as malformed and scores 0)."""
    if max_new_tokens != AUTO:
        return int(max_new_tokens)
    lists = frame["kind"].astype(str).to_numpy() == "list"
    longest = int(frame["completion_ids"][lists].map(len).max()) if lists.any() else 0
    return longest + max(16, math.ceil(longest / 4))


def warn_truncated(where: str, cut: int, generated: int, budget: int) -> None:
    """One line on stderr when generated answers ran into the budget."""
    if cut:
        print(f"warning: {where}: {cut} of {generated} generated answers reached max_new_tokens = {budget} "
              "before their end of turn; they are scored as cut (malformed lists score 0): raise "
              "evaluate.max_new_tokens (or set it to auto)", file=sys.stderr)


# --- the forward pass --------------------------------------------------------------------------------

def forward_batches(model, frame: pd.DataFrame, batch_size: int, pad_id: int) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Teacher-forced, no-grad forwards over every row in length-sorted batches: ``(batch, logits)``
    with fp32 logits (N, vocab) at the completion positions only."""
    lengths = [len(p) + len(c) for p, c in zip(frame["prompt_ids"], frame["completion_ids"], strict=True)]
    device = next(model.parameters()).device
    for rows in length_grouped_batches(lengths, batch_size, seed=None):
        batch = frame_batch(frame, rows, pad_id).to(device)
        with worklog.timed("forward", int(batch.attention_mask.sum())), torch.no_grad():
            logits = completion_logits(model, batch)
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)  # the time of the whole pass, not of its launch
        yield batch, logits


def first_positions(counts: torch.Tensor) -> torch.Tensor:
    """Index of each sample's first completion token in the flattened (N,) completion order."""
    return torch.cumsum(counts, 0) - counts


@dataclass
class ScoredBatch:
    """One inference batch: its completion logits, the gold log-likelihood and the task score."""

    batch: Batch
    logits: torch.Tensor        # (N, vocab) fp32, completion positions only
    n_tokens: torch.Tensor      # (B,) completion tokens per sample
    gold_logprob: torch.Tensor  # (B,) log-likelihood of the gold completion, temperature 1
    predictions: list[str]      # a letter, or a JSON list
    scores: list[float]         # sample_score of each prediction
    malformed: list[bool]       # list tasks: the output held no parsable list


def row_kinds(frame: pd.DataFrame, where: str) -> np.ndarray:
    """Each row's kind; a training mixture may hold both, but nothing else."""
    kinds = frame["kind"].astype(str).to_numpy()
    unknown = sorted(set(kinds) - {"choice", "list"})
    if unknown:
        raise DataError(f"{where}: column kind holds {unknown}; expected choice or list")
    return kinds


def score_batches(model, tokenizer, frame: pd.DataFrame, batch_size: int, max_new_tokens: int | str,
                  where: str = "split", progress: bool = False) -> Iterator[ScoredBatch]:
    """Score every row of ``frame`` (see the module doc), batch by batch in length order. Each
    row is scored by its own kind (a split prepared for one task has one kind)."""
    from tqdm.auto import tqdm

    kinds = row_kinds(frame, where)
    choice_rows = frame[kinds == "choice"]
    letter_ids = letter_token_ids(tokenizer, choice_rows, where) if len(choice_rows) else {}
    stop_ids = stop_token_ids(tokenizer, frame)
    budget = generation_budget(frame, max_new_tokens)
    generated_rows = cut_rows = 0
    answers = frame["answer"].astype(str).to_numpy()
    sample_ids = frame["sample_id"].astype(str).to_numpy()
    total = math.ceil(len(frame) / batch_size)
    batches = forward_batches(model, frame, batch_size, tokenizer.pad_token_id)
    for batch, logits in tqdm(batches, total=total, desc=f"score {where}", disable=not progress, leave=False):
        rows = batch.index
        logprobs = torch.log_softmax(logits, dim=-1)
        token_logprob = logprobs.gather(1, batch.target_ids[:, None]).squeeze(1)
        counts = completion_token_counts(batch)
        malformed = [False] * len(rows)
        predictions = [""] * len(rows)
        first = logprobs[first_positions(counts)]
        for j, row in enumerate(rows):
            if kinds[row] == "choice":
                options = [str(letter) for letter in frame["choices"].iat[row]]
                ranked = first[j, [letter_ids[letter] for letter in options]]
                predictions[j] = options[int(torch.argmax(ranked))]  # ties: the first option
        generated = [j for j, row in enumerate(rows) if kinds[row] == "list"]
        if generated:
            with torch.no_grad():
                outputs = generate_texts(model, tokenizer, [frame["prompt_ids"].iat[rows[j]] for j in generated],
                                         budget, stop_ids)
            generated_rows += len(outputs)
            cut_rows += sum(not stopped for _, stopped in outputs)
            for j, (text, _) in zip(generated, outputs, strict=True):
                parsed = parse_list_output(text)
                malformed[j] = parsed is None
                predictions[j] = json.dumps(parsed or [], ensure_ascii=False)
        scores = [sample_score(kinds[r], answers[r], p, sample_ids[r]) for r, p in zip(rows, predictions, strict=True)]
        yield ScoredBatch(batch, logits, counts, per_sample_sum(token_logprob, batch), predictions, scores,
                          malformed)
    warn_truncated(where, cut_rows, generated_rows, budget)


def predict_split(model, tokenizer, frame: pd.DataFrame, batch_size: int, max_new_tokens: int | str,
                  where: str = "split", progress: bool = False) -> pd.DataFrame:
    """Predictions for every row of a split, in the split's row order.

    Columns: ``sample_id``, ``tag``, ``gold`` (letter, or the gold JSON list), ``prediction``
    (letter, or the parsed list as JSON; malformed output gives ``[]``), ``gold_logprob`` (log-
    likelihood of the whole gold completion, answer + end-of-turn), ``gold_tokens`` (its length),
    ``score`` (:func:`sample_score`) and ``malformed`` (list tasks: no parsable list).
    """
    n = len(frame)
    predictions, scores, malformed = [""] * n, [0.0] * n, [False] * n
    gold_logprob, gold_tokens = [0.0] * n, [0] * n
    for scored in score_batches(model, tokenizer, frame, batch_size, max_new_tokens, where, progress):
        sums, counts = scored.gold_logprob.tolist(), scored.n_tokens.tolist()
        for j, row in enumerate(scored.batch.index):
            predictions[row], scores[row], malformed[row] = (scored.predictions[j], scored.scores[j],
                                                             scored.malformed[j])
            gold_logprob[row], gold_tokens[row] = sums[j], int(counts[j])
    return pd.DataFrame({"sample_id": frame["sample_id"].astype(str).tolist(),
                         "tag": frame["tag"].astype(str).tolist(),
                         "gold": frame["answer"].astype(str).tolist(),
                         "prediction": predictions, "gold_logprob": gold_logprob,
                         "gold_tokens": gold_tokens, "score": scores, "malformed": malformed})


# --- metrics of a predictions frame ------------------------------------------------------------------

def mean_gold_nll(predictions: pd.DataFrame) -> float:
    """Per-sample mean NLL of the gold completion tokens, averaged over samples (the SFT loss)."""
    if predictions.empty:
        return float("nan")
    return float((-predictions["gold_logprob"] / predictions["gold_tokens"]).mean())


def prediction_metrics(predictions: pd.DataFrame, kind: str, categories: Sequence[str],
                       weights: str) -> dict[str, float]:
    """Task metrics of a predictions frame, plus ``loss`` (mean gold NLL)."""
    if kind == "choice":
        metrics = choice_metrics(list(predictions["gold"]), list(predictions["prediction"]),
                                 categories, weights)
    else:
        gold = [gold_list(t, s) for t, s in zip(predictions["gold"], predictions["sample_id"], strict=True)]
        metrics = list_metrics(gold, [json.loads(p) for p in predictions["prediction"]])
    return {**metrics, "loss": mean_gold_nll(predictions)}


def summarise(predictions: pd.DataFrame, kind: str, categories: Sequence[str], weights: str) -> dict:
    """Metrics overall and per tag (each tag with its sample count)."""
    per_tag = {str(tag): {"n": len(group), **prediction_metrics(group, kind, categories, weights)}
               for tag, group in predictions.groupby("tag", sort=True)}
    return {"metrics": prediction_metrics(predictions, kind, categories, weights), "per_tag": per_tag}


# --- PACED pass rates --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PassRule:
    """How a list task's sampled answers are scored for PACED (choice tasks need none)."""

    samples: int = 8                 # K sampled answers per sample
    metric: str = "exact_f1"         # exact_f1 | partial_f1 of one document
    threshold: float = 0.5           # an answer passes when its metric is >= this
    temperature: float = 1.0         # sampling temperature
    max_new_tokens: int | str = AUTO
    seed: int = 0


def list_pass_rate(gold: Sequence[str], answers: Sequence[str], rule: PassRule) -> float:
    """Share of sampled answers (raw texts) whose F1 against ``gold`` is >= the threshold."""
    score = LIST_PASS_METRICS[rule.metric]
    passed = [score(gold, parse_list_output(text) or []) >= rule.threshold for text in answers]
    return float(np.mean(passed)) if passed else 0.0


def pass_rates(model, tokenizer, frame: pd.DataFrame, batch_size: int, rule: PassRule) -> np.ndarray:
    """PACED pass rate of every row of ``frame`` under ``model``, in row order (see module doc).

    List tasks sample under a forked RNG seeded with ``rule.seed``, so the training run's own
    random state is untouched and the same model gives the same rates.
    """
    kinds = row_kinds(frame, "training split")
    rates = np.zeros(len(frame), dtype=np.float64)
    choice = np.flatnonzero(kinds == "choice")
    if len(choice):
        subset = frame.iloc[choice].reset_index(drop=True)
        for batch, logits in forward_batches(model, subset, batch_size, tokenizer.pad_token_id):
            first = first_positions(completion_token_counts(batch))
            gold = torch.log_softmax(logits[first], dim=-1).gather(1, batch.target_ids[first, None]).squeeze(1)
            rates[choice[batch.index]] = gold.exp().clamp(0.0, 1.0).double().cpu().numpy()
    listed = np.flatnonzero(kinds == "list")
    if not len(listed):
        return rates
    stop_ids = stop_token_ids(tokenizer, frame)
    budget = generation_budget(frame, rule.max_new_tokens)
    lengths = [len(frame["prompt_ids"].iat[r]) for r in listed]
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(rule.seed)
        for positions in length_grouped_batches(lengths, batch_size, seed=None):
            rows = [int(listed[p]) for p in positions]
            with torch.no_grad():
                texts = [text for text, _ in generate_texts(
                    model, tokenizer, [frame["prompt_ids"].iat[r] for r in rows],
                    budget, stop_ids, samples=rule.samples,
                    temperature=rule.temperature)]
            for j, row in enumerate(rows):
                gold = gold_list(str(frame["answer"].iat[row]), str(frame["sample_id"].iat[row]))
                rates[row] = list_pass_rate(gold, texts[j * rule.samples : (j + 1) * rule.samples], rule)
    return rates


# --- the option letters' probabilities ---------------------------------------------------------------

def letter_probabilities(model, tokenizer, frame: pd.DataFrame, batch_size: int,
                         where: str = "split") -> np.ndarray:
    """(rows, options) probabilities of each option letter at the first completion position (full
    vocabulary softmax, temperature 1), in row order; a choice split's rows share their options.

    The first completion position's logits depend on the prompt only, so rows may carry any
    provisional answer (IOA's synthetic items are scored before they have one).
    """
    letters = choice_categories(frame)
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise DataError(f"{where}: option {letter!r} is {len(encoded)} tokens; ranking by "
                            "log-likelihood needs single-token option letters")
        ids.append(encoded[0])
    probabilities = np.zeros((len(frame), len(letters)), dtype=np.float64)
    for batch, logits in forward_batches(model, frame, batch_size, tokenizer.pad_token_id):
        first = first_positions(completion_token_counts(batch))
        chosen = torch.softmax(logits[first].float(), dim=-1)[:, ids]
        probabilities[batch.index] = chosen.double().cpu().numpy()
    return probabilities
