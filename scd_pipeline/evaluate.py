"""Task evaluation: ``scd-pipeline evaluate --model PATH`` -> ``eval/{name}.json`` + predictions.

Choice tasks are scored without free generation: one teacher-forced forward per batch over
prompt + gold completion, logits only at completion positions (``batching.completion_logits``);
the options are ranked by the log-probability of their letter token at the first completion
position, and the same forward gives the gold completion's log-likelihood. List tasks (nrner)
generate greedily and parse a JSON or Python list; malformed output counts as an empty list.

A model path may be a base model, a teacher checkpoint, a LoRA adapter directory (its
``adapter_config.json`` names the base, which is loaded and merged) or a distilled student.
"""

from __future__ import annotations

import ast
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from scd_pipeline.batching import (
    completion_logits,
    completion_token_counts,
    frame_batch,
    length_grouped_batches,
    per_sample_sum,
    read_split,
)
from scd_pipeline.config import task_dir
from scd_pipeline.errors import DataError, ModelError
from scd_pipeline.io import atomic_path, read_json, write_json
from scd_pipeline.metrics import choice_metrics, exact_f1_document, kappa_weights, list_metrics
from scd_pipeline.models import load_model
from scd_pipeline.naming import default_eval_name
from scd_pipeline.tokenization import tokenizer_fingerprint

PREDICTION_COLUMNS = ["sample_id", "tag", "gold", "prediction", "gold_logprob", "gold_tokens", "score"]


# --- models --------------------------------------------------------------------------------------

def check_data_tokenizer(data_dir: str | Path, tokenizer, model_path: str | Path) -> None:
    """Refuse a model whose tokenizer differs from the one the data manifest records."""
    manifest_file = Path(data_dir) / "manifest.json"
    if not manifest_file.is_file():
        return
    recorded = read_json(manifest_file).get("tokenizer")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return
    actual = tokenizer_fingerprint(tokenizer)
    if recorded["sha256"] != actual["sha256"]:
        raise ModelError(
            f"{model_path}: its tokenizer (vocab {actual['vocab_size']}, {actual['sha256'][:12]}) is "
            f"not the one {manifest_file} was prepared with (vocab {recorded.get('vocab_size')}, "
            f"{recorded['sha256'][:12]}); use a model of the same family or re-run prepare-data")


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


# --- scoring -------------------------------------------------------------------------------------

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


def _first_positions(counts: torch.Tensor) -> torch.Tensor:
    """Index of each sample's first completion token in the flattened (N,) completion order."""
    return torch.cumsum(counts, 0) - counts


def generate_texts(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_ids: Sequence[int]) -> list[str]:
    """Greedy continuations of left-padded prompts, cut at the first stop token."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=list(stop_ids), pad_token_id=pad_id)
    texts = []
    for row in output[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


@torch.inference_mode()
def predict_split(model, tokenizer, frame: pd.DataFrame, batch_size: int, max_new_tokens: int,
                  where: str = "split", progress: bool = False) -> pd.DataFrame:
    """Predictions for every row of a split, in the split's row order.

    Columns: ``sample_id``, ``tag``, ``gold`` (letter, or the gold JSON list), ``prediction``
    (letter, or the parsed list as JSON; malformed output gives ``[]``), ``gold_logprob`` (log-
    likelihood of the whole gold completion, answer + end-of-turn), ``gold_tokens`` (its length),
    ``score`` (the task metric of the one sample: 1/0 for a right/wrong letter, the document's
    exact-match F1 for a list) and ``malformed`` (list tasks: the output held no parsable list).
    """
    from tqdm.auto import tqdm

    kind = split_kind(frame, where)
    device = next(model.parameters()).device
    letter_ids = letter_token_ids(tokenizer, frame, where) if kind == "choice" else {}
    stop_ids = sorted({tokenizer.eos_token_id, *(int(c[-1]) for c in frame["completion_ids"])})
    n = len(frame)
    predictions: list[str] = [""] * n
    gold_logprob = [0.0] * n
    gold_tokens = [0] * n
    malformed = [False] * n
    lengths = [len(p) + len(c) for p, c in zip(frame["prompt_ids"], frame["completion_ids"], strict=True)]
    batches = length_grouped_batches(lengths, batch_size)
    for rows in tqdm(batches, desc=f"evaluate {where}", disable=not progress, leave=False):
        batch = frame_batch(frame, rows, tokenizer.pad_token_id).to(device)
        logprobs = torch.log_softmax(completion_logits(model, batch), dim=-1)
        token_logprob = logprobs.gather(1, batch.target_ids[:, None]).squeeze(1)
        sums = per_sample_sum(token_logprob, batch).tolist()
        counts = completion_token_counts(batch)
        for j, row in enumerate(rows):
            gold_logprob[row], gold_tokens[row] = sums[j], int(counts[j])
        if kind == "choice":
            first = logprobs[_first_positions(counts)]
            for j, row in enumerate(rows):
                options = [str(letter) for letter in frame["choices"].iat[row]]
                scores = first[j, [letter_ids[letter] for letter in options]]
                predictions[row] = options[int(torch.argmax(scores))]  # ties: the first option
        else:
            texts = generate_texts(model, tokenizer, [frame["prompt_ids"].iat[r] for r in rows],
                                   max_new_tokens, stop_ids)
            for row, text in zip(rows, texts, strict=True):
                parsed = parse_list_output(text)
                malformed[row] = parsed is None
                predictions[row] = json.dumps(parsed or [], ensure_ascii=False)
    gold = frame["answer"].astype(str).tolist()
    if kind == "choice":
        score = [float(g == p) for g, p in zip(gold, predictions, strict=True)]
    else:
        score = [exact_f1_document(_gold_list(g, s), json.loads(p))
                 for g, p, s in zip(gold, predictions, frame["sample_id"], strict=True)]
    return pd.DataFrame({"sample_id": frame["sample_id"].astype(str).tolist(),
                         "tag": frame["tag"].astype(str).tolist(),
                         "gold": gold, "prediction": predictions, "gold_logprob": gold_logprob,
                         "gold_tokens": gold_tokens, "score": score, "malformed": malformed})


def mean_gold_nll(predictions: pd.DataFrame) -> float:
    """Per-sample mean NLL of the gold completion tokens, averaged over samples (the SFT loss)."""
    if predictions.empty:
        return float("nan")
    return float((-predictions["gold_logprob"] / predictions["gold_tokens"]).mean())


def _gold_list(text: str, sample_id: str) -> list[str]:
    parsed = parse_list_output(text)
    if parsed is None:
        raise DataError(f"row {sample_id}: column answer {text!r} is not a JSON list")
    return parsed


def prediction_metrics(predictions: pd.DataFrame, kind: str, categories: Sequence[str],
                       weights: str) -> dict[str, float]:
    """Task metrics of a predictions frame, plus ``loss`` (mean gold NLL)."""
    if kind == "choice":
        metrics = choice_metrics(list(predictions["gold"]), list(predictions["prediction"]),
                                 categories, weights)
    else:
        gold = [_gold_list(t, s) for t, s in zip(predictions["gold"], predictions["sample_id"], strict=True)]
        metrics = list_metrics(gold, [json.loads(p) for p in predictions["prediction"]])
    return {**metrics, "loss": mean_gold_nll(predictions)}


def summarise(predictions: pd.DataFrame, kind: str, categories: Sequence[str], weights: str) -> dict:
    """Metrics overall and per tag (each tag with its sample count)."""
    per_tag = {str(tag): {"n": len(group), **prediction_metrics(group, kind, categories, weights)}
               for tag, group in predictions.groupby("tag", sort=True)}
    return {"metrics": prediction_metrics(predictions, kind, categories, weights), "per_tag": per_tag}


def json_safe(value):
    """JSON has no NaN: undefined metrics (e.g. on an empty tag) are written as null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(config: dict, model_path: str | Path, split: str | None = None,
             name: str | None = None) -> Path:
    """Evaluate a model on a prepared split; write ``eval/{name}.json`` and ``.predictions.parquet``.

    Returns the path of the JSON file.
    """
    settings = config["evaluate"]
    split = split or settings["split"]
    name = name or default_eval_name(model_path)
    data_dir = task_dir(config) / "data"
    split_file = data_dir / f"{split}.parquet"
    frame = read_split(split_file)
    kind = split_kind(frame, str(split_file))
    model, tokenizer = load_model(model_path)
    first_parameter = next(model.parameters())
    check_data_tokenizer(data_dir, tokenizer, model_path)
    started = time.perf_counter()
    predictions = predict_split(model, tokenizer, frame, settings["batch_size"],
                                settings["max_new_tokens"], where=str(split_file), progress=True)
    seconds = time.perf_counter() - started
    categories = choice_categories(frame) if kind == "choice" else []
    weights = kappa_weights(config["task"])
    summary = summarise(predictions, kind, categories, weights)
    out_dir = task_dir(config) / "eval"
    predictions_file = out_dir / f"{name}.predictions.parquet"
    with atomic_path(predictions_file) as tmp:
        predictions[PREDICTION_COLUMNS].to_parquet(tmp, index=False)
    report = {"name": name, "model": str(model_path), "task": config["task"], "split": split,
              "kind": kind, "n": len(frame), **summary,
              "kappa_weights": weights if kind == "choice" else None, "categories": categories,
              "malformed_outputs": int(predictions["malformed"].sum()),
              "seconds": round(seconds, 3), "samples_per_s": round(len(frame) / max(seconds, 1e-9), 3),
              "device": str(first_parameter.device),
              "dtype": str(first_parameter.dtype).removeprefix("torch.")}
    out_file = out_dir / f"{name}.json"
    write_json(out_file, json_safe(report))
    return out_file
