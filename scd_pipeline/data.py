"""The data stage (``scd-pipeline prepare-data``): task sources -> train/val/test Parquet splits.

Flow: a loader reads one task source into ``Example`` rows (test rows and a train/val pool, or an
explicit val split) and validates them, naming file, row and column on bad input; the pool is
split into train and val (stratified by label, seeded); the training split is balanced and capped;
every row is rendered with the tokenizer's chat template and tokenized (prompts cut from the start
of the question text when too long, answers never); the three splits, ``manifest.json`` and the
effective config are written into a temporary directory that replaces ``{task}/data`` only when
everything succeeded. See docs/ARTIFACTS.md for the columns.

Sources: ``demo`` (scd_pipeline.demo), JMED-LLM CSVs (crade, rrtnm, smdis, jmmlu_med, nrner;
optionally downloaded from the upstream repository), PubMedQA expert set, and ``custom`` files or
a Hugging Face dataset (a ``save_to_disk`` folder, or a hub id already in the local cache).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import re
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from scd_pipeline.config import task_dir, write_effective_config
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.io import atomic_dir, atomic_path, sha256_file, write_json
from scd_pipeline.splits import (
    Example,
    PromptEncoder,
    end_of_turn_id,
    make_prompt_renderer,
    split_options_block,
    write_split,
)
from scd_pipeline.tokenization import load_tokenizer, tokenizer_fingerprint

SPLITS = ("train", "val", "test")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STAGE = "prepare-data"

JMED_TASKS = {"crade": "choice", "rrtnm": "choice", "smdis": "choice", "jmmlu_med": "choice",
              "nrner": "list"}
# Upstream JMED-LLM (github.com/sociocom/JMED-LLM) pinned at commit 3774a34. Tests point this at a
# local http.server. Layout: datasets/<task>.csv (100-row evaluation sets) and datasets/all/<NAME>
# (whole pools). The pool names are an assumption read from the repository index: CRADE, NRNER
# and SMDIS appear under datasets/all/, RRTNM and JMMLU-Med under datasets/v1/all/.
JMED_BASE_URL = "https://raw.githubusercontent.com/sociocom/JMED-LLM/3774a34e4a26a7b8a7851f421ecad91a04c2f59b"
JMED_UPSTREAM_POOL = {"crade": "CRADE.csv", "rrtnm": "RRTNM.csv", "smdis": "SMDIS.csv",
                      "jmmlu_med": "JMMLU-Med.csv", "nrner": "NRNER.csv"}
# Known checksums of upstream files (from ../shared/data/jmed-llm/SHA256SUMS; SMDIS.csv is the
# shared all/smdis.csv, which is the whole upstream pool). Files not listed are not verified.
JMED_KNOWN_SHA256 = {
    "datasets/crade.csv": "21e41f3f52ea5138339d3c034eed8c50d96abb8f7f08a867fd319c02a9aeac26",
    "datasets/jmmlu_med.csv": "b8ab3275a92ca2bc24bd63e7d0aa823564a3c8d8f9518e377511856574b92c60",
    "datasets/nrner.csv": "1d3e22a77404cfec60d2a7caef626f475f2d385d26d4b2b22487331ca8a5d5f1",
    "datasets/rrtnm.csv": "4362ec23e2260abb9388402a9682e66261c417e475243e345b25b8f0903eabbb",
    "datasets/smdis.csv": "ee2fb38d87661a579c8483cda057e79999a806944a60d71533085c3d7f60b7fd",
    "datasets/all/SMDIS.csv": "ed6c182076356fda221266b486967d5d3066cacca55a9083c8289aa02e64f034",
}

PUBMEDQA_DECISIONS = ("yes", "no", "maybe")  # letters A, B, C
LIST_INSTRUCTION = ('Answer with a JSON list of the exact expressions from the text, '
                    'e.g. ["...", "..."], or [] if there are none.')


# --------------------------------------------------------------------------------------------
# Examples and what a loader returns


@dataclass
class TaskSource:
    """A task's rows: the test split, and a pool split into train/val (or an explicit val)."""

    kind: str
    test: list[Example]
    pool: list[Example]
    val: list[Example] | None = None
    files: list[dict] = field(default_factory=list)   # path, sha256, role
    pool_info: dict = field(default_factory=dict)     # e.g. test rows excluded from the pool


# --------------------------------------------------------------------------------------------
# Building examples (shared by every loader)


def choice_instruction(letters: Sequence[str]) -> str:
    """The sentence that closes a multiple-choice user message."""
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else letters[0]
    return f"Answer with the letter of the correct option ({listed})."


def choice_example(sample_id: str, tag: str, body: str, options: Sequence[tuple[str, str]],
                   answer: str, origin: str, answer_column: str) -> Example:
    """A multiple-choice example. ``options`` are (column, text) pairs in letter order; trailing
    empty options are dropped (rrtnm's M rows have two options, T rows five)."""
    texts = [text for _, text in options]
    while texts and not texts[-1].strip():
        texts.pop()
    for column, text in options[: len(texts)]:
        if not text.strip():
            raise DataError(f"{origin}, column '{column}': empty option before a filled one; "
                            "fill it or move the later options up")
    if not texts:
        raise DataError(f"{origin}, column '{options[0][0] if options else answer_column}': "
                        "no options; a choice task needs at least one")
    letters = tuple(LETTERS[: len(texts)])
    answer = answer.strip()
    if answer not in letters:
        raise DataError(f"{origin}, column '{answer_column}': answer {answer!r} is not one of the "
                        f"option letters {', '.join(letters)}")
    lines = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True))
    suffix = f"\n\n{lines}\n\n{choice_instruction(letters)}"
    return Example(sample_id, tag, "choice", body, suffix, letters, answer, letters.index(answer),
                   origin)


def parse_list_answer(value: Any, origin: str, column: str) -> list[str]:
    """A list answer from a list, a JSON list or a Python list literal (JMED-LLM's nrner)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                parsed = None
    elif isinstance(value, np.ndarray):
        parsed = value.tolist()
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        shown = value if len(str(value)) < 60 else str(value)[:57] + "..."
        raise DataError(f"{origin}, column '{column}': {shown!r} is not a list of strings "
                        "(expected e.g. ['fever', 'cough'])")
    return parsed


def list_example(sample_id: str, tag: str, body: str, answer: Any, origin: str,
                 answer_column: str) -> Example:
    """A list-extraction example; the answer is stored as a JSON list."""
    items = parse_list_answer(answer, origin, answer_column)
    return Example(sample_id, tag, "list", body, f"\n\n{LIST_INSTRUCTION}",
                   (), json.dumps(items, ensure_ascii=False), -1, origin)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"true/false ({value!r})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def require_text(value: Any, origin: str, column: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # JSON null, empty Parquet cell
        raise DataError(f"{origin}, column '{column}': missing text")
    if not isinstance(value, str):
        raise DataError(f"{origin}, column '{column}': {_json_kind(value)} where text is expected; "
                        "write it as a string (in JSON, in quotes)")
    if not value.strip():
        raise DataError(f"{origin}, column '{column}': empty text")
    return value


def check_unique(values: Iterable[tuple[str, str]], what: str, column: str) -> None:
    """Raise on the second occurrence of a value; ``values`` are (value, origin) pairs."""
    seen: dict[str, str] = {}
    for value, origin in values:
        if value in seen:
            raise DataError(f"{origin}, column '{column}': duplicate {what} (first seen at "
                            f"{seen[value]}); remove the duplicate row")
        seen[value] = origin


# --------------------------------------------------------------------------------------------
# Reading files


def file_record(path: Path, role: str) -> dict:
    return {"role": role, "path": str(path), "sha256": sha256_file(path)}


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); a bad byte is reported with its line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save the file as UTF-8") from exc


def csv_row_lines(text: str) -> list[int]:
    """The line, as an editor numbers it, where each data row of a CSV text starts (a quoted cell
    may span lines); blank lines are skipped, as pandas skips them."""
    reader = csv.reader(io.StringIO(text))
    starts, end = [], 0
    for row in reader:
        start, end = end + 1, reader.line_num
        if row and not (len(row) == 1 and not row[0].strip()):
            starts.append(start)
    return starts[1:]  # the first row is the header


def read_csv_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a UTF-8 CSV as dicts of strings (empty cells are ""), and where each row is
    ("{path}: line N", the line an editor shows), with one-line errors."""
    text = read_utf8(path)
    records = _parse_csv(path, text)
    try:
        lines = csv_row_lines(text)
    except csv.Error:
        lines = []
    if len(lines) != len(records):  # a dialect detail pandas reads otherwise: assume one line per row
        lines = [index + 2 for index in range(len(records))]
    return records, [f"{path}: line {line}" for line in lines]


def _parse_csv(path: Path, text: str) -> list[dict[str, str]]:
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file; expected a header line and data rows") from exc
    except pd.errors.ParserError as exc:
        detail = str(exc).strip().splitlines()[-1].split("C error: ")[-1]
        line = re.search(r"line (\d+)", detail)
        where = f"line {line.group(1)}: " if line else ""
        raise DataError(f"{path}: {where}not a valid CSV ({detail})") from exc
    if frame.empty:
        raise DataError(f"{path}: header only, no data rows")
    return frame.to_dict("records")


def require_columns(path: str | Path, columns: Iterable[str], required: Iterable[str]) -> None:
    present = list(columns)
    for column in required:
        if column not in present:
            raise DataError(f"{path}: header row, column '{column}': missing (found: "
                            f"{', '.join(map(str, present))})")


def read_table_records(path: Path) -> tuple[list[dict | None], list[str]]:
    """Rows of a JSONL, CSV or Parquet file and where each one is, for messages: "{path}: line N"
    (the line an editor shows) in text files, "{path}: row N" in Parquet."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix == ".csv":
        return read_csv_rows(path)
    if suffix in (".jsonl", ".json"):
        records = read_jsonl_records(path)
        return records, [f"{path}: line {number}" for number in range(1, len(records) + 1)]
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable Parquet file ({exc.__class__.__name__})") from exc
        if frame.empty:
            raise DataError(f"{path}: empty file (no rows)")
        return frame.to_dict("records"), [f"{path}: row {number}" for number in range(1, len(frame) + 1)]
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .csv or .parquet")


def read_jsonl_records(path: Path) -> list[dict | None]:
    """JSON objects by line; a blank line gives None, so list index == line number - 1."""
    lines = read_utf8(path).splitlines()
    records: list[dict | None] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            records.append(None)
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}: line {number}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if all(record is None for record in records):
        raise DataError(f"{path}: empty file (no JSON lines)")
    return records


# --------------------------------------------------------------------------------------------
# JMED-LLM


def jmed_pool_file(root: Path, task: str) -> Path:
    """``all/{task}.csv`` if present, else the one ``all/{task}_*.csv`` (e.g. crade_head200.csv)."""
    exact = root / "all" / f"{task}.csv"
    if exact.is_file():
        return exact
    matches = sorted((root / "all").glob(f"{task}_*.csv"))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DataError(f"{root / 'all'}: no {task}.csv or {task}_*.csv (set data.jmed_root, or "
                        "data.jmed_download: true to fetch the upstream files)")
    raise DataError(f"{root / 'all'}: several pool files for {task} ({', '.join(m.name for m in matches)}); "
                    f"keep one or name it {task}.csv")


def read_jmed_file(path: Path, task: str, id_prefix: str, id_width: int) -> list[Example]:
    """One JMED-LLM CSV as examples; sample ids are ``{id_prefix}-{0-based row index}``."""
    records, origins = read_csv_rows(path)
    columns = list(records[0])
    kind = JMED_TASKS[task]
    option_columns = [c for c in columns if c.startswith("option")] if kind == "choice" else []
    require_columns(path, columns, ["tag", "question", "answer"])
    if kind == "choice" and not option_columns:
        require_columns(path, columns, ["optionA"])
    examples = []
    for index, record in enumerate(records):
        origin = origins[index]
        sample_id = f"{id_prefix}-{index:0{id_width}d}"
        tag = require_text(record["tag"], origin, "tag").strip()
        question = require_text(record["question"], origin, "question")
        if kind == "choice":
            options = [(column, record[column]) for column in option_columns]
            examples.append(choice_example(sample_id, tag, question, options, record["answer"],
                                           origin, "answer"))
        else:
            examples.append(list_example(sample_id, tag, question, record["answer"], origin, "answer"))
    check_unique(((e.body, e.origin) for e in examples), "question", "question")
    return examples


def download_jmed(task: str, root: Path) -> list[Path]:
    """Fetch the task's upstream test and pool CSVs into ``root/test/{task}.csv`` and
    ``root/all/{task}.csv`` (files already there are kept). All files are fetched and checked
    before any is written."""
    wanted = {root / "test" / f"{task}.csv": f"datasets/{task}.csv",
              root / "all" / f"{task}.csv": f"datasets/all/{JMED_UPSTREAM_POOL[task]}"}
    fetched: dict[Path, bytes] = {}
    for target, relative in wanted.items():
        if target.is_file():
            continue
        url = f"{JMED_BASE_URL}/{relative}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"cannot download {url} ({reason}); check the network, or set "
                            f"data.jmed_download: false and put the CSVs under {root}") from exc
        expected = JMED_KNOWN_SHA256.get(relative)
        actual = hashlib.sha256(payload).hexdigest()
        if expected and actual != expected:
            raise DataError(f"{url}: sha256 {actual[:12]}... does not match the pinned "
                            f"{expected[:12]}...; the upstream file changed, nothing was written")
        fetched[target] = payload
    for target, payload in fetched.items():
        with atomic_path(target) as tmp:
            tmp.write_bytes(payload)
    return list(fetched)


def load_jmed(task: str, root: Path, download: bool = False) -> TaskSource:
    """JMED-LLM: the 100-row file is the test split; the pool is the ``all`` file minus every row
    whose question is in the test file."""
    if download:
        download_jmed(task, root)
    test_path = root / "test" / f"{task}.csv"
    if not test_path.is_file():
        raise DataError(f"{test_path}: file not found (set data.jmed_root to the folder with "
                        "test/ and all/, or data.jmed_download: true)")
    pool_path = jmed_pool_file(root, task)
    test = read_jmed_file(test_path, task, f"{task}-test", 3)
    everything = read_jmed_file(pool_path, task, f"{task}-all", 5)
    test_questions = {example.body for example in test}
    pool = [example for example in everything if example.body not in test_questions]
    excluded = len(everything) - len(pool)
    return TaskSource(
        kind=JMED_TASKS[task], test=test, pool=pool,
        files=[file_record(test_path, "test"), file_record(pool_path, "pool")],
        pool_info={"pool_file_rows": len(everything), "test_rows_excluded_from_pool": excluded,
                   "test_rows_not_in_pool": len(test) - excluded})


# --------------------------------------------------------------------------------------------
# PubMedQA (expert-labelled set)


def read_json_mapping(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data.pubmedqa_dir to the folder with "
                        "ori_pqal.json and test_ground_truth.json)")
    try:
        data = json.loads(read_utf8(path))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object keyed by PMID")
    return data


def check_decision(decision: Any, origin: str, column: str) -> str:
    if decision not in PUBMEDQA_DECISIONS:
        raise DataError(f"{origin}, column '{column}': {decision!r} is not one of "
                        f"{', '.join(PUBMEDQA_DECISIONS)}")
    return decision


def pubmedqa_example(pmid: str, entry: Any, decision: str, origin: str) -> Example:
    """Contexts are the cuttable body; the question, options and instruction are always kept."""
    if not isinstance(entry, dict):
        raise DataError(f"{origin}: expected an object with QUESTION, CONTEXTS, final_decision")
    question = require_text(entry.get("QUESTION"), origin, "QUESTION")
    contexts = entry.get("CONTEXTS")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise DataError(f"{origin}, column 'CONTEXTS': expected a list of strings")
    options = [(name, name) for name in PUBMEDQA_DECISIONS]
    letter = LETTERS[PUBMEDQA_DECISIONS.index(decision)]
    example = choice_example(f"pubmedqa-{pmid}", "all", "Context:\n" + "\n".join(contexts),
                             options, letter, origin, "final_decision")
    return replace(example, suffix=f"\nQuestion: {question}{example.suffix}")


def load_pubmedqa(directory: Path) -> TaskSource:
    """PubMedQA: the PMIDs of ``test_ground_truth.json`` are the test split (gold from that file);
    the other PMIDs of ``ori_pqal.json`` form the pool."""
    ori_path, truth_path = directory / "ori_pqal.json", directory / "test_ground_truth.json"
    entries, truth = read_json_mapping(ori_path), read_json_mapping(truth_path)
    position = {pmid: number for number, pmid in enumerate(entries, start=1)}
    test = []
    for number, (pmid, decision) in enumerate(truth.items(), start=1):
        truth_origin = f"{truth_path}: row {number} (PMID {pmid})"
        if pmid not in entries:
            raise DataError(f"{truth_origin}, column 'PMID': not in {ori_path}")
        check_decision(decision, truth_origin, "answer")
        origin = f"{ori_path}: row {position[pmid]} (PMID {pmid})"
        test.append(pubmedqa_example(pmid, entries[pmid], decision, origin))
    pool = []
    for pmid, entry in entries.items():
        if pmid in truth:
            continue
        origin = f"{ori_path}: row {position[pmid]} (PMID {pmid})"
        decision = entry.get("final_decision") if isinstance(entry, dict) else None
        pool.append(pubmedqa_example(pmid, entry, check_decision(decision, origin, "final_decision"),
                                     origin))
    return TaskSource(kind="choice", test=test, pool=pool,
                      files=[file_record(ori_path, "pool+test"), file_record(truth_path, "test")],
                      pool_info={"pool_file_rows": len(entries),
                                 "test_rows_excluded_from_pool": len(truth)})


# --------------------------------------------------------------------------------------------
# Custom files


def cell_text(value: Any) -> str:
    """A cell as text; missing values (None, NaN from Parquet/pandas) become ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def custom_examples(path: Path, split: str, custom: dict) -> list[Example]:
    """Rows of one custom file (JSONL, CSV or Parquet) mapped through ``data.custom.fields``."""
    records, origins = read_table_records(path)
    return map_custom_records(records, origins, path, split, custom, tabular=path.suffix.lower() in (".csv", ".parquet"))


def map_custom_records(records: Sequence[dict | None], origins: Sequence[str], where: str | Path, split: str,
                       custom: dict, tabular: bool = True) -> list[Example]:
    """Custom rows (from a file or a dataset split named ``where``) as examples, mapped through
    ``data.custom.fields``; errors name the row's origin (``origins``) and the column."""
    fields, kind = custom["fields"], custom["kind"]
    required = [fields["question"], fields["answer"]] + [f for f in (fields.get("id"), fields.get("tag")) if f]
    required += list(fields.get("options") or []) if kind == "choice" else []
    if tabular:  # one header for all rows
        require_columns(where, records[0].keys(), required)
    examples = []
    for index, record in enumerate(records):
        if record is None:  # blank JSONL line
            continue
        origin = origins[index]
        for column in required:
            if column not in record:
                raise DataError(f"{origin}, column '{column}': missing")
        raw_id = record[fields["id"]] if fields.get("id") else None
        sample_id = f"custom-{raw_id}" if raw_id is not None else f"custom-{split}-{index:05d}"
        if raw_id is not None and not str(raw_id).strip():
            raise DataError(f"{origin}, column '{fields['id']}': empty id")
        tag = str(record[fields["tag"]]).strip() if fields.get("tag") else "all"
        if not tag:
            raise DataError(f"{origin}, column '{fields['tag']}': empty tag")
        question = require_text(record[fields["question"]], origin, fields["question"])
        answer = record[fields["answer"]]
        if kind == "choice":
            options = [(column, cell_text(record[column])) for column in fields["options"]]
            examples.append(choice_example(sample_id, tag, question, options, cell_text(answer),
                                           origin, fields["answer"]))
        else:
            examples.append(list_example(sample_id, tag, question, answer, origin, fields["answer"]))
    return examples


def load_custom(custom: dict) -> TaskSource:
    """Custom train/test (and optional val) files, or splits of a Hugging Face dataset
    (``data.custom.dataset``); val is carved from train when not given."""
    if custom["kind"] == "choice" and not custom["fields"].get("options"):
        raise ConfigError("config key data.custom.fields.options: list the option columns in "
                          "letter order (a choice task needs them)")
    if custom.get("dataset"):
        return load_custom_dataset(custom)
    for key in ("train", "test"):
        if not custom.get(key):
            raise ConfigError(f"config key data.custom.{key}: set the path of the {key} file")
    paths = {split: Path(custom[split]) for split in SPLITS if custom.get(split)}
    examples = {split: custom_examples(path, split, custom) for split, path in paths.items()}
    return custom_source(examples, custom, [file_record(path, split) for split, path in paths.items()])


def custom_source(examples: dict[str, list[Example]], custom: dict, files: list[dict]) -> TaskSource:
    """The custom rows of every split as a task source, ids (and, without a val split, questions)
    checked unique."""
    check_unique(((e.sample_id, e.origin) for split in examples for e in examples[split]),
                 "id", custom["fields"].get("id") or "<row number>")
    if "val" not in examples:  # a repeated question would leak between train and val
        check_unique(((e.body, e.origin) for e in examples["train"]), "question",
                     custom["fields"]["question"])
    return TaskSource(kind=custom["kind"], test=examples["test"], pool=examples["train"],
                      val=examples.get("val"), files=files)


@contextmanager
def hub_offline():
    """Hugging Face hub access switched off (datasets and huggingface_hub), restored afterwards:
    a hub id is only ever read from the local cache."""
    import datasets
    import huggingface_hub.constants

    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = before


def open_hf_dataset(source: str, config_name: str | None):
    """A ``datasets.DatasetDict`` from a ``save_to_disk`` directory or a hub id in the local cache
    (``HF_DATASETS_CACHE``); never downloads. A single saved ``Dataset`` is its train split."""
    import datasets

    folder = Path(source).expanduser()
    if folder.is_dir():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"config key data.custom.dataset: {folder} is a folder but not a dataset saved "
                            f"with save_to_disk ({str(exc).splitlines()[0]})") from exc
        return datasets.DatasetDict({"train": loaded}) if isinstance(loaded, datasets.Dataset) else loaded
    with hub_offline():
        try:
            loaded = datasets.load_dataset(source, name=config_name)
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise DataError(
                f"config key data.custom.dataset: {source!r} is neither a save_to_disk folder nor a "
                f"dataset in the local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}); load it "
                f"once where the hub is reachable, or save it with save_to_disk ({reason})") from exc
    return loaded


def load_custom_dataset(custom: dict) -> TaskSource:
    """Custom rows from a Hugging Face dataset: ``data.custom.train`` / ``val`` / ``test`` name its
    splits (default train, none, test), mapped through ``data.custom.fields`` like files."""
    source = str(custom["dataset"])
    dataset = open_hf_dataset(source, custom.get("dataset_config"))
    names = {"train": custom.get("train") or "train", "test": custom.get("test") or "test"}
    if custom.get("val"):
        names["val"] = custom["val"]
    examples, files = {}, []
    for split, name in names.items():
        if name not in dataset:
            raise DataError(f"config key data.custom.{split}: dataset {source} has no split {name!r} "
                            f"(it has {', '.join(sorted(dataset)) or 'none'}); name one of them")
        part = dataset[name]
        where = f"{source} [split {name}]"
        if not len(part):
            raise DataError(f"{where}: no rows")
        origins = [f"{where}: row {number}" for number in range(1, len(part) + 1)]
        examples[split] = map_custom_records(part.to_list(), origins, where, split, custom)
        files.append({"role": split, "path": where, "dataset": source, "split": name, "rows": len(part),
                      "fingerprint": getattr(part, "_fingerprint", None)})
    return custom_source(examples, custom, files)


# --------------------------------------------------------------------------------------------
# Demo


def load_demo(demo: dict) -> TaskSource:
    """The built-in generated task: the last ``test_size`` generated rows are the test split (the
    generator already draws cases in random order, so this is a random, reproducible test set)."""
    from scd_pipeline.demo import generate_demo

    if demo["test_size"] >= demo["n_examples"]:
        raise ConfigError(f"config key data.demo.test_size: {demo['test_size']} leaves no training "
                          f"rows of data.demo.n_examples={demo['n_examples']}")
    rows = generate_demo(demo["n_examples"], demo["seed"], demo["tag_shares"])
    examples = []
    for index, row in enumerate(rows):
        origin = f"demo generator: row {index + 1}"
        choices = tuple(row["choices"])
        label = int(row["label"])
        if not 0 <= label < len(choices) or choices[label] != row["answer"]:
            raise DataError(f"{origin}, column 'answer': {row['answer']!r} is not choices[label]")
        body, suffix = split_options_block(row["question"])
        examples.append(Example(str(row["sample_id"]), str(row["tag"]), "choice", body, suffix,
                                choices, row["answer"], label, origin))
    check_unique(((e.sample_id, e.origin) for e in examples), "sample id", "sample_id")
    cut = len(examples) - demo["test_size"]
    return TaskSource(kind="choice", test=examples[cut:], pool=examples[:cut],
                      files=[{"role": "generator", "path": "scd_pipeline.demo.generate_demo",
                              "params": dict(demo)}])


def load_task(config: dict) -> TaskSource:
    """The rows of ``config['task']`` from its configured source."""
    task, data = config["task"], config["data"]
    if task in JMED_TASKS:
        return load_jmed(task, Path(data["jmed_root"]), data.get("jmed_download", False))
    if task == "pubmedqa":
        return load_pubmedqa(Path(data["pubmedqa_dir"]))
    if task == "custom":
        return load_custom(data["custom"])
    if task == "demo":
        return load_demo(data["demo"])
    raise ConfigError(f"config key task: unknown task {task!r}")


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


def select_splits(source: TaskSource, data: dict, seed: int) -> dict[str, list[Example]]:
    """Train/val/test rows: val carved from the pool (unless given), then the training split
    balanced (``data.balance``) and capped (``data.max_train_samples``, seeded, label shares kept)."""
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
    return {"train": train, "val": val, "test": list(source.test)}


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


def dataset_fingerprint(data_dir: str | Path) -> str:
    """sha256 over the three split files: of the text ``"train <sha256>\\nval ...\\ntest ...\\n"``."""
    lines = "".join(f"{name} {sha256_file(Path(data_dir) / f'{name}.parquet')}\n" for name in SPLITS)
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


def build_manifest(config: dict, source: TaskSource, encoded: dict[str, list[dict]], tokenizer,
                   tokenizer_path: Path, end_id: int, data_dir: Path) -> dict:
    summaries = {name: split_summary(encoded[name], source.kind) for name in SPLITS}
    test_questions = {r["question"] for r in encoded["test"]}
    leaked = sum(r["question"] in test_questions for name in ("train", "val") for r in encoded[name])
    return {
        "task": config["task"],
        "kind": source.kind,
        "sources": source.files,
        "pool": source.pool_info,
        "split_sizes": {name: summaries[name]["rows"] for name in SPLITS},
        "label_counts": {name: summaries[name]["label_counts"] for name in SPLITS},
        "tag_counts": {name: summaries[name]["tag_counts"] for name in SPLITS},
        "truncated_rows": {name: summaries[name]["truncated_rows"] for name in SPLITS},
        "token_lengths": {name: summaries[name]["token_lengths"] for name in SPLITS},
        "test_questions_in_train_val": leaked,
        "tokenizer": {**tokenizer_fingerprint(tokenizer), "path": str(tokenizer_path),
                      "end_of_turn_token": tokenizer.convert_ids_to_tokens(end_id),
                      "end_of_turn_id": end_id},
        "files": {f"{name}.parquet": sha256_file(data_dir / f"{name}.parquet") for name in SPLITS},
        "dataset_fingerprint": dataset_fingerprint(data_dir),
        "config": {"task": config["task"], "seed": config["seed"], "data": config["data"]},
    }


def prepare_data(config: dict, tokenizer_path: Path | None = None) -> Path:
    """Build ``{results_dir}/{task}/data/{train,val,test}.parquet``, ``manifest.json`` and
    ``prepare-data.config.yaml``; return the data directory. Bad input raises DataError (one
    line: file, row, column) and leaves no output."""
    data = config["data"]
    source = load_task(config)
    splits = select_splits(source, data, config["seed"])
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
        for name in SPLITS:
            write_split(encoded[name], tmp / f"{name}.parquet")
        write_json(tmp / "manifest.json",
                   build_manifest(config, source, encoded, tokenizer, tokenizer_path, end_id, tmp))
        write_effective_config(config, tmp, STAGE)
    return out
