"""IOA's Adapter: ``scd-pipeline synthesize`` -> ``data/synthetic.parquet`` + ``ioa/synthesis.json``.

For the most severe ``ioa.synthesis.top_share`` of the modules the plan marks deficient
(``ioa/plan.json``; IOA's authors take 25%, at least one), the teacher T* writes new items
from few-shot prompts of that module's training rows in every *style*: three registers that use
the task's own structure (T*'s gold NLL orders a module's rows by difficulty), which any teacher
can continue,

- ``remedial`` (simpler, shorter): examples from the shortest third of the module's easier half
  (T* NLL at most the module's median), under a header asking for short, simple questions;
- ``standard``: examples from all of the module's rows;
- ``bridging`` (one notch harder): examples from the module's hardest third (highest T* NLL);

and the Adapter's five strategies (``ioa.synthesis.strategies``; IOA: concretization, reasoning
decomposition, cognitive-load management, format templates, linguistic simplification): an
instruction in the teacher's chat template beside the module's examples, for a teacher that
follows instructions (without a chat template the strategies are skipped and the summary says
so). Each strategy's items play a register's part in the curriculum (``STRATEGIES``): remedial
items are what a remedial pass adds, standard items join every pass of their module's stage. Every
other module of the plan gets ``remedial`` items too, so that a module which was not deficient
at plan time has fresh items when it fails a gate (the curriculum hands each remedial pass items
the student has not seen yet).

Seed rows are those T* scores a pass on (its answer right); each prompt holds ``shots`` of them
(seeded choice) and T* samples ``per_prompt`` continuations at ``temperature``; the text up to the
first blank line is the new item. When the task's options are shared (every row lists the same,
e.g. the demo's labels) the item is a question body and takes the seeds' options block and
instruction; when each question has options of its own (e.g. JMMLU-Med) the examples show theirs
and the item must end with its own, one line per option letter of the seeds, in order. The teacher then answers each new item: choice tasks take T*'s most probable option
letter, list tasks T*'s greedy list. An item is kept only if

1. it parses into the task's format (``unparsable`` otherwise): a non-empty body that ended
   within ``length_factor`` x the prompt's longest example, wrote no options of its own (shared
   options) or exactly one per letter (options per question) and, for lists, an answer that
   parses and whose items all occur in the body;
2. the teacher is confident (``unconfident``): its probability of its own answer (the letter's
   probability; for lists the mean token probability of the list) >= ``min_confidence``;
3. it is not a near-duplicate (``overlaps_eval``, ``copies_train``, ``duplicate``): at most
   ``max_overlap`` of its word ``overlap_ngram``-grams (NFKC, lower-cased) occur in any one
   validation or test row, training row or already kept item;
4. its module has fewer than ``max_items_per_module`` kept items (``over_cap``); candidates are
   taken in turn over the registers, so the cap keeps each register's share.

Kept items have the split columns (docs/ARTIFACTS.md) plus ``module``, ``register`` (the
curriculum part), ``strategy`` (the style that wrote it: a register or a strategy), ``source_ids`` (the prompt's seed rows) and ``teacher_confidence``; ``cache-logits --split
synthetic`` caches them like any split. Generation runs in batches of prompts with a progress bar
and resumes after a kill from ``.state/synthesize/`` (the same settings give the same items).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.curriculum_files import ioa_dir, read_plan
from scd_pipeline.engine.io import atomic_path, read_json, sha256_file, sha256_text, write_json
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.errors import DataError
from scd_pipeline.math.curriculum import NgramIndex, row_members, targeted

REGISTERS = ("remedial", "standard", "bridging")
HEADERS = {"remedial": "Short, simple questions of the kind '{module}', one fact each:",
           "standard": "Questions of the kind '{module}':",
           "bridging": "Harder questions of the kind '{module}', each with one more detail to weigh:"}
# The Adapter's strategies: (the register whose part the items play, the instruction to the teacher).
STRATEGIES = {
    "concretization": ("standard", "Make it concrete: name specific people, substances, numbers and times "
                                   "instead of describing them in general terms."),
    "decomposition": ("remedial", "Break the reasoning down: state each fact the answer depends on in its own "
                                  "short sentence, in the order one would check them."),
    "cognitive_load": ("remedial", "Keep the load low: give only the facts needed to answer, at most three, "
                                   "and no distracting details."),
    "format_template": ("standard", "Keep the examples' format exactly: the same layout, the same order of "
                                    "information and the same final question line."),
    "simplification": ("remedial", "Keep the language simple: plain everyday words and short sentences, "
                                   "no abbreviations."),
}
REASONS = ("unparsable", "unconfident", "overlaps_eval", "copies_train", "duplicate", "over_cap")
SYNTHETIC_SPLIT = "synthetic"
SUMMARY_FILE = "synthesis.json"
STATE_FILE = "generated.jsonl"


def synthetic_path(config: dict) -> Path:
    return task_dir(config) / "data" / f"{SYNTHETIC_SPLIT}.parquet"


def state_dir(config: dict) -> Path:
    return task_dir(config) / ".state" / "synthesize"


# --- prompts ---------------------------------------------------------------------------------------

def register_pools(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Seed rows per register from one module's passed training rows (columns ``teacher_nll``,
    ``body_tokens``): remedial = shortest third of the easier half, standard = all, bridging =
    the hardest third by T* NLL."""
    by_nll = rows.sort_values(["teacher_nll", "sample_id"], kind="stable")
    easier = by_nll[by_nll["teacher_nll"] <= by_nll["teacher_nll"].median()]
    third = max(1, math.ceil(len(rows) / 3))
    remedial = easier.sort_values(["body_tokens", "sample_id"], kind="stable").iloc[:third]
    bridging = by_nll.iloc[len(by_nll) - third:]
    return {"remedial": remedial, "standard": by_nll, "bridging": bridging}


def few_shot_prompt(register: str, module: str, bodies: Sequence[str]) -> str:
    """Plain text (no chat template: the teacher continues a list): a header, the examples, and
    the opening of the next one."""
    parts = [HEADERS[register].format(module=module)]
    parts += [f"Question {i}:\n{body.strip()}" for i, body in enumerate(bodies, start=1)]
    parts.append(f"Question {len(bodies) + 1}:\n")
    return "\n\n".join(parts)


def strategy_request(strategy: str, module: str, bodies: Sequence[str]) -> str:
    """The user turn of a strategy prompt: the module's examples, then the strategy's instruction."""
    examples = "\n\n".join(f"Question {i}:\n{body.strip()}" for i, body in enumerate(bodies, start=1))
    return (f"Here are questions of the kind '{module}':\n\n{examples}\n\nWrite one new question of this "
            f"kind. {STRATEGIES[strategy][1]} Write the question only, without its answer.")


def prompt_text(prompt: dict, render) -> str:
    """What the teacher continues: a register's plain few-shot list, or a strategy's request in the
    chat template (``render``: user text -> the templated prompt)."""
    if prompt["strategy"] in REGISTERS:
        return few_shot_prompt(prompt["register"], prompt["module"], prompt["bodies"])
    return render(strategy_request(prompt["strategy"], prompt["module"], prompt["bodies"]))


def candidate_body(text: str, budget_hit: bool) -> str | None:
    """The new question body in a continuation: the text before the first blank line (a reply
    that opens with a "Question N:" line, as the examples do, loses that line); None when the
    continuation never ended within its budget (no blank line, no stop token)."""
    body, blank, _ = text.lstrip(" ").partition("\n\n")
    if not blank and budget_hit:
        return None
    first, newline, rest = body.partition("\n")
    if newline and first.strip().startswith("Question") and first.strip().endswith(":"):
        body = rest
    body = body.strip()
    return body or None


# --- checks ------------------------------------------------------------------------------------------

def writes_options(body: str) -> bool:
    """The body lists options of its own (a line starting "A. " or "B. ")."""
    return any(line.lstrip().startswith(("A. ", "B. ")) for line in body.splitlines())


def list_items_in_body(answer: list[str], body: str) -> bool:
    """Every extracted item occurs verbatim in the text (an extraction task's format)."""
    return all(item and item in body for item in answer)


def near_duplicate_reason(body: str, evaluation: NgramIndex, training: NgramIndex, kept: NgramIndex,
                          max_overlap: float) -> str | None:
    """Which near-duplicate test ``body`` fails first, or None (see the module doc, check 3)."""
    for reason, index in (("overlaps_eval", evaluation), ("copies_train", training), ("duplicate", kept)):
        if index.max_containment(body) > max_overlap:
            return reason
    return None


# --- the stage ---------------------------------------------------------------------------------------

def interleaved(keys: Sequence[tuple[str, str]]) -> list[int]:
    """Positions of ``keys`` ((module, style) per candidate) in turn over each module's styles:
    the first candidate of every style, then the second of every style, and so on, so a module's
    cap keeps each style's share instead of the first style's items only."""
    rank, seen = [], Counter()
    for key in keys:
        rank.append(seen[key])
        seen[key] += 1
    order = {style: i for i, style in enumerate((*REGISTERS, *STRATEGIES))}
    return sorted(range(len(keys)), key=lambda i: (keys[i][0], rank[i], order[keys[i][1]]))


def _read_state(path: Path, fingerprint: str) -> dict[int, list[str]]:
    """Generated continuations per prompt index of a run with the same fingerprint (a torn last
    line, from a kill during the write, is dropped)."""
    done: dict[int, list[str]] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path}: line {number} is not a JSON record (the file was damaged); delete "
                            f"the folder {path.parent} to generate afresh") from None
        if record.get("fingerprint") != fingerprint:
            return {}
        done[int(record["prompt"])] = [(str(t), bool(b)) for t, b in record["texts"]]
    return done


def _prompt_plan(config: dict, plan: dict, train: pd.DataFrame, strategies: Sequence[str]) -> list[dict]:
    """Every few-shot prompt: module, style (register or strategy), its seed rows (seeded choice,
    fixed order). Targeted modules get every register and ``strategies``; the plan's other modules
    the ``remedial`` register (fresh items for a module that fails a gate later)."""
    synthesis = config["ioa"]["synthesis"]
    chosen_modules = targeted(plan["modules"], synthesis["top_share"])
    prompts = []
    for module in [m["module"] for m in plan["modules"]]:
        rows = train[(train["module"] == module) & (train["teacher_score"] >= 0.5)]
        if len(rows) < 1:
            rows = train[train["module"] == module]
        if len(rows) < 1:
            continue
        pools = register_pools(rows)
        styles = [*REGISTERS, *strategies] if module in chosen_modules else ["remedial"]
        for style in styles:
            register = style if style in REGISTERS else STRATEGIES[style][0]
            pool = pools[style] if style in REGISTERS else pools["standard"]
            for index in range(synthesis["prompts_per_register"]):
                key = f"{config['seed']}/{module}/{style}/{index}"
                rng = random.Random(key)
                chosen = rng.sample(range(len(pool)), min(synthesis["shots"], len(pool)))
                seeds = pool.iloc[chosen]
                # Options per question (the module's rows list different options, e.g. JMMLU-Med):
                # the examples show them and the teacher writes a new item's own; options shared by
                # the task (e.g. the demo's labels): the examples are bodies, the item takes them.
                own = bool(rows["suffix"].nunique() > 1)
                instruction = options_and_instruction(seeds["suffix"].iat[0])[1]
                examples = [body.strip() + ("\n" + "\n".join(options_and_instruction(suffix)[0]) if own else "")
                            for body, suffix in zip(seeds["body"], seeds["suffix"], strict=True)]
                prompts.append({"module": module, "register": register, "strategy": style,
                                "source_ids": seeds["sample_id"].astype(str).tolist(),
                                "bodies": examples, "suffix": seeds["suffix"].iat[0], "own_options": own,
                                "letters": [str(c) for c in seeds["choices"].iat[0]],
                                "instruction": instruction, "tag": str(seeds["tag"].iat[0]),
                                # an item with options of its own is written with them
                                "max_body_tokens": int((seeds["body_tokens"] + (seeds["suffix_tokens"] if own else 0)).max())})
    return prompts


def options_and_instruction(suffix: str) -> tuple[list[str], str]:
    """A choice row's suffix ("\n\nA. ...\nB. ...\n\n<instruction>") as its option lines and the
    instruction after them."""
    options, _, instruction = suffix.strip().partition("\n\n")
    return [line for line in options.splitlines() if line.strip()], instruction


def parse_item(text: str, budget_hit: bool, prompt: dict, kind: str) -> tuple[str, str, tuple[str, ...]] | None:
    """A continuation as a new item (body, suffix, choices), or None when it does not parse. With
    options shared by the task the body must list none and takes the prompt's; with options per
    question it must end with its own, one line "X. text" per letter of the seeds, in order."""
    item = candidate_body(text, budget_hit)
    if item is None:
        return None
    if kind != "choice" or not prompt.get("own_options"):
        return None if writes_options(item) else (item, prompt["suffix"], tuple(prompt["letters"]) if kind == "choice" else ())
    lines = item.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{prompt['letters'][0]}. ")]
    if not starts:
        return None
    body, options = "\n".join(lines[: starts[-1]]).strip(), [line.strip() for line in lines[starts[-1]:]]
    letters = list(prompt["letters"])
    if not body or writes_options(body) or len(options) != len(letters) or any(
            not line.startswith(f"{letter}. ") or not line[len(letter) + 2:].strip()
            for letter, line in zip(letters, options, strict=True)):
        return None
    return body, "\n\n" + "\n".join(options) + "\n\n" + prompt["instruction"], tuple(letters)


def _generate(model, tokenizer, prompts: list[dict], config: dict, state: Path, fingerprint: str,
              stop_ids: Sequence[int], render) -> list[list[tuple[str, bool]]]:
    """Continuations of every prompt: (text, ran out of its budget without a stop token).

    Prompts go in fixed batches of ``synthesis.batch_size`` (left-padded, ``per_prompt`` samples
    each), every batch under its own seed; a batch is logged to ``state`` when done, so a rerun
    after a kill generates only the batches not logged and ends with the same items.
    """
    from tqdm.auto import tqdm

    from scd_pipeline.engine.scoring import generate

    synthesis = config["ioa"]["synthesis"]
    state.mkdir(parents=True, exist_ok=True)
    log = state / STATE_FILE
    done = _read_state(log, fingerprint)
    if not done and log.exists():
        log.unlink()
    size = synthesis["batch_size"]
    batches = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]
    todo = [batch for batch in batches if not all(i in done for i in batch)]
    bar = tqdm(total=len(prompts), initial=sum(len(b) for b in batches if b not in todo), desc="synthesize",
               unit="prompt", dynamic_ncols=True)
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    for batch in todo:
        budgets = [max(1, math.ceil(synthesis["length_factor"] * prompts[i]["max_body_tokens"])) for i in batch]
        ids = tokenizer([prompt_text(prompts[i], render) for i in batch], add_special_tokens=False).input_ids
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(config["seed"] * 100_003 + batch[0])
            output = generate(model, tokenizer, ids, max(budgets), stop_ids, samples=synthesis["per_prompt"],
                              temperature=synthesis["temperature"])
        with open(log, "a", encoding="utf-8") as handle:
            for j, index in enumerate(batch):
                texts = []
                for tokens, stopped in output[j * synthesis["per_prompt"] : (j + 1) * synthesis["per_prompt"]]:
                    ended = stopped and len(tokens) <= budgets[j]
                    texts.append((tokenizer.decode(tokens[: budgets[j]], skip_special_tokens=True), not ended))
                done[index] = texts
                handle.write(json.dumps({"fingerprint": fingerprint, "prompt": index, "texts": texts},
                                        ensure_ascii=False) + "\n")
        bar.update(len(batch))
    bar.close()
    return [done[i] for i in range(len(prompts))]


def _encoder(config: dict, tokenizer):
    from scd_pipeline.engine.splits import PromptEncoder, end_of_turn_id, make_prompt_renderer

    data = config["data"]
    return PromptEncoder(tokenizer, make_prompt_renderer(tokenizer, data["system_prompt"]),
                         end_of_turn_id(tokenizer), data["max_length"])


def _answer(model, tokenizer, frame: pd.DataFrame, kind: str, config: dict) -> tuple[list[str], np.ndarray]:
    """T*'s answer to each provisional row and its probability (see the module doc, check 2)."""
    from scd_pipeline.engine.scoring import letter_probabilities, predict_split

    batch_size = config["cache"]["batch_size"]
    if kind == "choice":
        probabilities = letter_probabilities(model, tokenizer, frame, batch_size, "synthetic items")
        letters = [str(letter) for letter in frame["choices"].iat[0]]
        best = probabilities.argmax(axis=1)
        return [letters[i] for i in best], probabilities[np.arange(len(frame)), best]
    scored = predict_split(model, tokenizer, frame, batch_size, config["evaluate"]["max_new_tokens"],
                           where="synthetic items")
    return scored["prediction"].tolist(), np.zeros(len(frame))


def synthesize(config: dict) -> dict:
    """The stage (see the module doc); returns the summary written to ``ioa/synthesis.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scd_pipeline.engine.checkpoints import checkpoint_entry, read_checkpoints
    from scd_pipeline.engine.logit_cache import checkpoint_identity, open_task_cache
    from scd_pipeline.engine.models import load_model
    from scd_pipeline.engine.scoring import predict_split, stop_token_ids
    from scd_pipeline.engine.splits import (
        Example,
        make_prompt_renderer,
        split_question,
        split_schema,
    )

    synthesis = config["ioa"]["synthesis"]
    root = task_dir(config)
    plan = read_plan(config)
    plan_file = ioa_dir(config) / "plan.json"
    checkpoints = read_checkpoints(root / "teacher")
    best = int(checkpoints["best_index"])
    if best != plan["best_index"]:
        raise DataError(f"{plan_file}: planned for T* = ckpt-{plan['best_index']}, but the teacher's best "
                        f"checkpoint is now {best}; re-run `scd-pipeline ioa-plan`")
    teacher_dir = root / "teacher" / checkpoint_entry(checkpoints, best)["path"]
    train_file = root / "data" / f"{config['cache']['split']}.parquet"
    train = read_split(train_file)
    kind = str(train["kind"].iat[0])
    stats = open_task_cache(config, best).stats().set_index("sample_id").loc[train["sample_id"]]
    parts = [split_question(q, kind) for q in train["question"]]
    model, tokenizer = load_model(teacher_dir)
    model.eval()
    train = train.assign(teacher_nll=stats["nll_mean"].to_numpy(), teacher_score=stats["score"].to_numpy(),
                         body=[b for b, _ in parts], suffix=[s for _, s in parts])
    lengths = {name: [len(ids) for ids in tokenizer([part[i] for part in parts], add_special_tokens=False).input_ids]
               for i, name in enumerate(("body_tokens", "suffix_tokens"))}
    train = train.assign(**lengths,
                         module=row_members({**plan, "split_nll": {}}, train["tag"], train["teacher_nll"]))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    strategies = list(synthesis["strategies"]) if has_template else []
    prompts = _prompt_plan(config, plan, train, strategies)
    fingerprint = sha256_text(json.dumps({"plan": sha256_file(plan_file), "train": sha256_file(train_file),
                                          "teacher": checkpoint_identity(teacher_dir, best)["sha256"],
                                          "synthesis": synthesis, "seed": config["seed"]}, sort_keys=True))
    generated = _generate(model, tokenizer, prompts, config, state_dir(config), fingerprint,
                          stop_token_ids(tokenizer, train),
                          make_prompt_renderer(tokenizer, config["data"]["system_prompt"]))

    # 1. format
    candidates, rejected = [], Counter()
    for prompt, texts in zip(prompts, generated, strict=True):
        for text, budget_hit in texts:
            item = parse_item(text, budget_hit, prompt, kind)
            if item is None:
                rejected[(prompt["module"], prompt["strategy"], "unparsable")] += 1
                continue
            candidates.append((prompt, item))
    encoder = _encoder(config, tokenizer)
    examples = []
    for number, (prompt, (body, suffix, choices)) in enumerate(candidates):
        answer = str(choices[0]) if kind == "choice" else "[]"
        examples.append(Example(f"syn-{number:05d}", prompt["tag"], kind, body, suffix, choices, answer,
                                0 if kind == "choice" else -1, f"synthetic item {number}"))
    records = encoder.encode(examples) if examples else []
    frame = pd.DataFrame(records)
    # 2. the teacher's answer and confidence
    if len(frame):
        answers, confidence = _answer(model, tokenizer, frame, kind, config)
        answered = [replace(e, answer=a, label=list(e.choices).index(a) if kind == "choice" else -1)
                    for e, a in zip(examples, answers, strict=True)]
        records = encoder.encode(answered)
        frame = pd.DataFrame(records)
        if kind == "list":
            scored = predict_split(model, tokenizer, frame, config["cache"]["batch_size"],
                                   config["evaluate"]["max_new_tokens"], where="synthetic items")
            confidence = np.exp(scored["gold_logprob"] / scored["gold_tokens"]).to_numpy()
    # 3.-4. near-duplicates and the cap
    evaluation = NgramIndex([split_question(q, kind)[0] for name in ("val", "test")
                             for q in read_split(root / "data" / f"{name}.parquet")["question"]],
                            synthesis["overlap_ngram"])
    training = NgramIndex(train["body"].tolist(), synthesis["overlap_ngram"])
    kept_index = NgramIndex([], synthesis["overlap_ngram"])
    kept_rows, kept_per_module = [], Counter()
    for row in interleaved([(prompt["module"], prompt["strategy"]) for prompt, _ in candidates]):
        (prompt, (body, _, _)), record = candidates[row], records[row]
        key = (prompt["module"], prompt["strategy"])
        if kind == "list" and not (json.loads(record["answer"]) and
                                   list_items_in_body(json.loads(record["answer"]), body)):
            rejected[(*key, "unparsable")] += 1
            continue
        if confidence[row] < synthesis["min_confidence"]:
            rejected[(*key, "unconfident")] += 1
            continue
        reason = near_duplicate_reason(body, evaluation, training, kept_index, synthesis["max_overlap"])
        if reason is None and kept_per_module[prompt["module"]] >= synthesis["max_items_per_module"]:
            reason = "over_cap"
        if reason is not None:
            rejected[(*key, reason)] += 1
            continue
        kept_index.add(body)
        kept_per_module[prompt["module"]] += 1
        kept_rows.append({**record, "module": prompt["module"], "register": prompt["register"],
                          "strategy": prompt["strategy"], "source_ids": prompt["source_ids"],
                          "teacher_confidence": float(confidence[row])})

    schema = split_schema()
    for name, kind_type in (("module", pa.string()), ("register", pa.string()), ("strategy", pa.string()),
                            ("source_ids", pa.list_(pa.string())), ("teacher_confidence", pa.float32())):
        schema = schema.append(pa.field(name, kind_type))
    out = synthetic_path(config)
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pylist(kept_rows, schema=schema), tmp, compression="zstd")
    generated_counts, roles = Counter(), {}
    for prompt, texts in zip(prompts, generated, strict=True):
        generated_counts[(prompt["module"], prompt["strategy"])] += len(texts)
        roles[prompt["strategy"]] = prompt["register"]
    kept_counts = Counter((r["module"], r["strategy"]) for r in kept_rows)
    yield_rows = [{"module": m, "strategy": s, "register": roles[s], "generated": generated_counts[(m, s)],
                   "kept": kept_counts[(m, s)], **{reason: rejected[(m, s, reason)] for reason in REASONS}}
                  for (m, s) in sorted(generated_counts, key=lambda key: (key[0], style_order(key[1])))]
    summary = {
        "task": config["task"], "teacher": str(teacher_dir), "best_index": best, "deficient": plan["deficient"],
        "targeted": targeted(plan["modules"], synthesis["top_share"]),
        "strategies": strategies,
        "strategies_skipped": (None if has_template or not synthesis["strategies"] else
                               "the teacher's tokenizer has no chat template to put an instruction in"),
        "prompts": len(prompts), "generated": sum(generated_counts.values()), "kept": len(kept_rows),
        "rejected": {reason: sum(v for k, v in rejected.items() if k[2] == reason) for reason in REASONS},
        "yield": yield_rows, "yield_by_style": yield_by_style(yield_rows),
        "settings": synthesis, "file": str(out), "sha256": sha256_file(out),
        "examples": [{k: r[k] for k in ("sample_id", "module", "register", "strategy", "question", "answer",
                                        "teacher_confidence", "source_ids")}
                     for r in examples_by_style(kept_rows, 3)],
        "checks": ("format: a body that ended within length_factor x the prompt's longest example and wrote "
                   "no options (lists: a parsable answer whose items occur in the body); confidence: T*'s "
                   "probability of its own answer >= min_confidence; near-duplicate: more than max_overlap "
                   f"of the item's word {synthesis['overlap_ngram']}-grams (NFKC, lower-cased) in one "
                   "validation/test row, training row or kept item"),
    }
    write_json(ioa_dir(config) / SUMMARY_FILE, summary)
    write_effective_config(config, ioa_dir(config), "synthesize")
    shutil.rmtree(state_dir(config), ignore_errors=True)  # published: the resume log has done its job
    return {**summary, "paths": [str(out), str(ioa_dir(config) / SUMMARY_FILE)]}


def style_order(style: str) -> int:
    """Registers first (remedial, standard, bridging), then the strategies in ``STRATEGIES`` order."""
    return (*REGISTERS, *STRATEGIES).index(style)


def yield_by_style(rows: Sequence[dict]) -> list[dict]:
    """The yield summed over modules, per style: generated, kept and the kept share (None when
    nothing was generated)."""
    totals: dict[str, dict] = {}
    for row in rows:
        total = totals.setdefault(row["strategy"], {"strategy": row["strategy"], "register": row["register"],
                                                    "generated": 0, "kept": 0})
        total["generated"] += row["generated"]
        total["kept"] += row["kept"]
    return [{**total, "kept_rate": total["kept"] / total["generated"] if total["generated"] else None}
            for total in sorted(totals.values(), key=lambda total: style_order(total["strategy"]))]


def examples_by_style(rows: list[dict], count: int) -> list[dict]:
    """Up to ``count`` kept items of every style, styles in ``style_order``."""
    chosen = []
    for style in (*REGISTERS, *STRATEGIES):
        chosen += [r for r in rows if r["strategy"] == style][:count]
    return chosen


def read_synthesis(config: dict) -> dict:
    """``ioa/synthesis.json``, or {} when synthesis has not run."""
    path = ioa_dir(config) / SUMMARY_FILE
    return read_json(path) if path.is_file() else {}


def artifacts(config: dict) -> list[Artifact]:
    """What ``synthesize`` writes: the synthetic split, its summary and config; and its resume state."""
    folder = ioa_dir(config)
    return [Artifact(synthetic_path(config),
                     (synthetic_path(config), folder / SUMMARY_FILE, folder / "synthesize.config.yaml")),
            Artifact(state_dir(config), (state_dir(config),), resume_state=True)]
