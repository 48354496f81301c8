"""The data stage (``scd-pipeline prepare-data``): task sources -> train/val/test Parquet splits.

Flow: a loader reads one task source into ``Example`` rows (test rows and a train/val pool, or an
explicit val split) and validates them, naming file, row and column on bad input; the pool is
split into train and val (stratified by label, seeded); the training split is balanced and capped;
every row is rendered with the tokenizer's chat template and tokenized (prompts cut from the start
of the question text when too long, answers never); the three splits, ``manifest.json`` and the
effective config are written into a temporary directory that replaces ``{task}/data`` only when
everything succeeded. See docs/ARTIFACTS.md for the columns.

The task sources are in ``sources.py`` beside this file; the demo generator in ``demo.py``.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.io import atomic_dir, sha256_file, write_json
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.splits import (
    Example,
    PromptEncoder,
    end_of_turn_id,
    make_prompt_renderer,
    write_split,
)
from scd_pipeline.engine.tokenization import load_tokenizer, tokenizer_fingerprint
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.stages.prepare_data.sources import JMED_TASKS, SPLITS, TaskSource, load_task

STAGE = "prepare-data"


# --------------------------------------------------------------------------------------------
# Splitting, balancing, capping (pure functions of the rows and a seed)


def proportional_quotas(counts: dict, total: int) -> dict:
    """Split ``total`` over groups in proportion to ``counts`` (largest remainder; ties broken
    by group key so the result is deterministic)."""
    size = sum(counts.values())
    exact = {key: total * n / size for key, n in counts.items()} if size else {}
    quotas = {key: int(value) for key, value in exact.items()}
    leftover = total - sum(quotas.values())
    by_remainder = sorted(exact, key=lambda key: (-(exact[key] - quotas[key]), str(key)))
    for key in by_remainder[:leftover]:
        quotas[key] += 1
    return quotas


def stratified_sample(rows: Sequence[Example], total: int, rng: np.random.Generator) -> list[Example]:
    """``total`` rows drawn without replacement, label shares kept; returned in input order."""
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.label, []).append(index)
    quotas = proportional_quotas({label: len(ix) for label, ix in sorted(groups.items())}, total)
    chosen = []
    for label in sorted(groups):
        chosen.extend(rng.permutation(groups[label])[: quotas[label]].tolist())
    return [rows[index] for index in sorted(chosen)]


def split_pool(pool: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``round(val_fraction * len(pool))`` rows as val, stratified by label."""
    n_val = round(val_fraction * len(pool))
    if len(pool) >= 2:
        n_val = min(max(n_val, 1), len(pool) - 1)
    val = stratified_sample(pool, n_val, np.random.default_rng([seed, 1]))
    held_out = {row.sample_id for row in val}
    return [row for row in pool if row.sample_id not in held_out], val


def balance_rows(rows: Sequence[Example], mode: str, seed: int) -> list[Example]:
    """Class balancing of the training rows by label.

    undersample: every label keeps as many rows as the rarest label has (seeded choice);
    oversample: rarer labels repeat rows (whole cycles, then a seeded choice) up to the commonest
    label's count, repeats get ids ``<id>#r1``, ``<id>#r2``...; none/weights: rows unchanged.
    Output keeps input order, each repeat right after its original.
    """
    if mode in ("none", "weights"):
        return list(rows)
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.label, []).append(index)
    rng = np.random.default_rng([seed, 2])
    if mode == "undersample":
        target = min(len(ix) for ix in groups.values())
        keep = sorted(i for label in sorted(groups) for i in rng.permutation(groups[label])[:target])
        return [rows[i] for i in keep]
    if mode != "oversample":
        raise ConfigError(f"config key data.balance: unknown mode {mode!r}")
    target = max(len(ix) for ix in groups.values())
    repeats = Counter()
    for label in sorted(groups):
        members = groups[label]
        extra = target - len(members)
        cycles, rest = divmod(extra, len(members))
        for i in members:
            repeats[i] += cycles
        for i in rng.permutation(members)[:rest]:
            repeats[int(i)] += 1
    out = []
    for index, row in enumerate(rows):
        out.append(row)
        out.extend(replace(row, sample_id=f"{row.sample_id}#r{r}", repeat=r)
                   for r in range(1, repeats[index] + 1))
    return out


def inverse_frequency_weights(labels: Sequence[int]) -> list[float]:
    """Weight of a row = N / (K * n_label): inverse class frequency, mean 1 over the rows."""
    counts = Counter(labels)
    return [len(labels) / (len(counts) * counts[label]) for label in labels]


def check_test_overlap(splits: dict[str, list[Example]], allow: bool) -> None:
    """Train/val rows whose question is also a test question inflate the test scores: a warning
    line, or a DataError when ``data.allow_test_overlap`` is false."""
    test_origin = {row.question: row.origin for row in splits["test"]}
    repeats = [row for name in ("train", "val") for row in splits[name]
               if not row.repeat and row.question in test_origin]
    if not repeats:
        return
    first = repeats[0]
    rows = "1 train/val row repeats" if len(repeats) == 1 else f"{len(repeats)} train/val rows repeat"
    found = f"{rows} a test question (first: {first.origin} = {test_origin[first.question]})"
    if not allow:
        raise DataError(f"{found}; remove them from the training data, or set "
                        "data.allow_test_overlap: true to accept them")
    print(f"warning: {found}; test scores will be optimistic (data.allow_test_overlap: false "
          "refuses this)", file=sys.stderr)


JMED_HELDOUT_ROWS = 1000  # data.heldout_size: auto for a JMED-LLM task (its official test has 100 rows)
HELDOUT = "heldout"


def heldout_size(config: dict) -> int:
    """Rows of the extra held-out split (``data.heldout_size``; ``auto``: 1,000 for the JMED-LLM
    tasks, none for the others, whose test split is as large as the task makes it)."""
    size = config["data"].get("heldout_size", 0)
    if size == "auto":
        return JMED_HELDOUT_ROWS if config["task"] in JMED_TASKS else 0
    return int(size)


def heldout_rows(unused: Sequence[Example], test: Sequence[Example], size: int, kind: str,
                 seed: int) -> list[Example]:
    """Up to ``size`` of the ``unused`` pool rows (in neither train nor val), drawn with the test
    split's label shares (choice tasks; a label short of rows gives what it has) or at random
    (list tasks); seeded, returned in pool order."""
    if size <= 0 or not unused:
        return []
    rng = np.random.default_rng([seed, 4])
    if kind != "choice":
        chosen = rng.permutation(len(unused))[:size]
        return [unused[i] for i in sorted(chosen.tolist())]
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(unused):
        groups.setdefault(row.answer, []).append(index)
    quotas = proportional_quotas(Counter(row.answer for row in test), min(size, len(unused)))
    chosen = []
    for answer in sorted(quotas):
        chosen.extend(rng.permutation(groups.get(answer, []))[: quotas[answer]].tolist())
    return [unused[i] for i in sorted(chosen)]


def select_splits(source: TaskSource, data: dict, seed: int, heldout: int = 0) -> dict[str, list[Example]]:
    """Train/val/test rows: val carved from the pool (unless given), then the training split
    balanced (``data.balance``) and capped (``data.max_train_samples``, seeded, label shares kept);
    with ``heldout`` > 0 also a held-out split of pool rows that neither uses (``heldout_rows``;
    none whose question is a training or validation question). It may hold fewer rows than asked,
    or none, when training and validation use the pool up (the manifest says so)."""
    mode = data["balance"]
    if mode != "none" and source.kind != "choice":
        raise ConfigError(f"config key data.balance: {mode!r} needs class labels; this is a "
                          "list-extraction task, use none")
    if source.val is None:
        train, val = split_pool(source.pool, data["val_fraction"], seed)
    else:
        train, val = list(source.pool), list(source.val)
    train = balance_rows(train, mode, seed)
    cap = data.get("max_train_samples")
    if cap is not None and cap < len(train):
        train = stratified_sample(train, cap, np.random.default_rng([seed, 3]))
    for name, rows in (("train", train), ("test", source.test)):
        if not rows:
            paths = ", ".join(record["path"] for record in source.files)
            raise DataError(f"the {name} split is empty (sources: {paths}); check the source files")
    splits = {"train": train, "val": val, "test": list(source.test)}
    if heldout > 0:
        used = {row.source_id for row in train} | {row.source_id for row in val}
        seen = {row.question for row in train} | {row.question for row in val}
        unused = [row for row in source.pool if row.sample_id not in used and row.question not in seen]
        splits[HELDOUT] = heldout_rows(unused, source.test, heldout, source.kind, seed)
    return splits


# --------------------------------------------------------------------------------------------
# Prompts and tokens


def encode_split(rows: Sequence[Example], encoder: PromptEncoder,
                 weights: Sequence[float] | None = None) -> list[dict]:
    """Encode rows; oversampled repeats (``id#rN``) reuse their original's tokens."""
    originals: dict[str, Example] = {}
    for row in rows:  # the cap may keep a repeat without its original
        originals.setdefault(row.source_id, row)
    by_id = dict(zip(originals, encoder.encode(list(originals.values())), strict=True))
    out = []
    for index, row in enumerate(rows):
        record = dict(by_id[row.source_id], sample_id=row.sample_id)
        if weights is not None:
            record["weight"] = float(weights[index])
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# Writing


def split_names(data_dir: str | Path) -> list[str]:
    """The splits of a data folder: train, val, test, and heldout when it was made."""
    return [*SPLITS, *([HELDOUT] if (Path(data_dir) / f"{HELDOUT}.parquet").is_file() else [])]


def dataset_fingerprint(data_dir: str | Path) -> str:
    """sha256 over the split files: of the text ``"train <sha256>\\nval ...\\ntest ...\\n"`` (and
    ``heldout ...`` when there is one)."""
    lines = "".join(f"{name} {sha256_file(Path(data_dir) / f'{name}.parquet')}\n" for name in split_names(data_dir))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def length_stats(values: Sequence[int]) -> dict | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"min": int(array.min()), "mean": round(float(array.mean()), 2),
            "median": float(np.median(array)), "p95": round(float(np.percentile(array, 95)), 2),
            "max": int(array.max())}


def split_summary(records: Sequence[dict], kind: str) -> dict:
    prompt = [len(r["prompt_ids"]) for r in records]
    completion = [len(r["completion_ids"]) for r in records]
    return {
        "rows": len(records),
        "label_counts": dict(sorted(Counter(r["answer"] for r in records).items())) if kind == "choice" else None,
        "tag_counts": dict(sorted(Counter(r["tag"] for r in records).items())),
        "truncated_rows": sum(bool(r["truncated"]) for r in records),
        "token_lengths": {"prompt": length_stats(prompt), "completion": length_stats(completion),
                          "total": length_stats([p + c for p, c in zip(prompt, completion, strict=True)])},
    }


def heldout_record(asked: int, rows: int) -> dict:
    """The manifest's ``heldout``: rows asked and made, and why they differ when they do."""
    return {"asked": asked, "rows": rows,
            "note": "pool rows in neither train nor val, with the test split's label shares" if rows >= asked
            else "fewer rows than asked: training and validation use the rest of the pool"}


def build_manifest(config: dict, source: TaskSource, encoded: dict[str, list[dict]], tokenizer,
                   tokenizer_path: Path, end_id: int, data_dir: Path) -> dict:
    names = list(encoded)
    summaries = {name: split_summary(encoded[name], source.kind) for name in names}
    test_questions = {r["question"] for r in encoded["test"]}
    leaked = sum(r["question"] in test_questions for name in ("train", "val") for r in encoded[name])
    return {
        "task": config["task"],
        "kind": source.kind,
        "sources": source.files,
        "pool": source.pool_info,
        "split_sizes": {name: summaries[name]["rows"] for name in names},
        "label_counts": {name: summaries[name]["label_counts"] for name in names},
        "tag_counts": {name: summaries[name]["tag_counts"] for name in names},
        "truncated_rows": {name: summaries[name]["truncated_rows"] for name in names},
        "token_lengths": {name: summaries[name]["token_lengths"] for name in names},
        "test_questions_in_train_val": leaked,
        **({"heldout": heldout_record(heldout_size(config), len(encoded[HELDOUT]))} if HELDOUT in encoded else {}),
        "tokenizer": {**tokenizer_fingerprint(tokenizer), "path": str(tokenizer_path),
                      "end_of_turn_token": tokenizer.convert_ids_to_tokens(end_id),
                      "end_of_turn_id": end_id},
        "files": {f"{name}.parquet": sha256_file(data_dir / f"{name}.parquet") for name in names},
        "dataset_fingerprint": dataset_fingerprint(data_dir),
        "config": {"task": config["task"], "seed": config["seed"], "data": config["data"]},
    }


def prepare_data(config: dict, tokenizer_path: Path | None = None) -> Path:
    """Build ``{results_dir}/{task}/data/{train,val,test}.parquet``, ``manifest.json`` and
    ``prepare-data.config.yaml``; return the data directory. Bad input raises DataError (one
    line: file, row, column) and leaves no output."""
    data = config["data"]
    source = load_task(config)
    splits = select_splits(source, data, config["seed"], heldout_size(config))
    check_test_overlap(splits, data.get("allow_test_overlap", True))
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else Path(config["results_dir"]) / "models" / "teacher_base"
    tokenizer = load_tokenizer(tokenizer_path)
    end_id = end_of_turn_id(tokenizer)
    encoder = PromptEncoder(tokenizer, make_prompt_renderer(tokenizer, data["system_prompt"]),
                            end_id, data["max_length"])
    weights = (inverse_frequency_weights([row.label for row in splits["train"]])
               if data["balance"] == "weights" else None)
    encoded = {name: encode_split(rows, encoder, weights if name == "train" else None)
               for name, rows in splits.items()}
    out = task_dir(config) / "data"
    with atomic_dir(out) as tmp:
        for name in encoded:
            write_split(encoded[name], tmp / f"{name}.parquet")
        write_json(tmp / "manifest.json",
                   build_manifest(config, source, encoded, tokenizer, tokenizer_path, end_id, tmp))
        write_effective_config(config, tmp, STAGE)
    return out


def artifacts(config: dict) -> list[Artifact]:
    """What ``prepare-data`` writes: the task's data folder, as one unit."""
    data = task_dir(config) / "data"
    return [Artifact(data, (data,))]
