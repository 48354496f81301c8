"""What a prepared split row is and how it is made: shared by the data stage and IOA's synthesis.

An :class:`Example` (text, options, answer) becomes a split record through the tokenizer's chat
template (:func:`make_prompt_renderer`) and a :class:`PromptEncoder` (prompt cut from the start
of the question when too long, the answer never); :func:`write_split` stores records with the
fixed column types of docs/ARTIFACTS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scd_pipeline.errors import DataError, ModelError

PLAIN_ANSWER_CUE = "\nAnswer: "


@dataclass(frozen=True)
class Example:
    """One sample before tokenization. The user message is ``body + suffix``: ``body`` is the
    task text (cut from its start when the prompt is too long), ``suffix`` the options and
    instruction (always kept)."""

    sample_id: str
    tag: str
    kind: str                   # "choice" or "list"
    body: str
    suffix: str
    choices: tuple[str, ...]    # option letters; empty for list tasks
    answer: str                 # the letter, or a JSON list
    label: int                  # index of the answer in choices; -1 for list tasks
    origin: str                 # "file: line N" (CSV, JSONL) or "file: row N" (Parquet), for messages
    repeat: int = 0             # > 0 for an oversampled copy (sample_id "<id>#r<repeat>")

    @property
    def question(self) -> str:
        return self.body + self.suffix

    @property
    def source_id(self) -> str:
        """The sample id of the original row (equal to sample_id unless this is a repeat)."""
        return self.sample_id.rsplit("#r", 1)[0] if self.repeat else self.sample_id


def split_options_block(question: str) -> tuple[str, str]:
    """(body, suffix) of a question that already lists its options: the suffix starts at the
    last line beginning with "A. ", so truncation never cuts the options."""
    start = question.rfind("\nA. ")
    return (question[:start], question[start:]) if start > 0 else (question, "")


def make_prompt_renderer(tokenizer, system_prompt: str) -> Callable[[str], str]:
    """user text -> prompt: the chat template with a generation prompt when the tokenizer has one
    (system prompt folded into the user turn if the template rejects or drops a system role),
    else ``[system]\\n\\nquestion\\nAnswer: ``."""
    if not getattr(tokenizer, "chat_template", None):
        prefix = f"{system_prompt}\n\n" if system_prompt else ""
        return lambda user: f"{prefix}{user}{PLAIN_ANSWER_CUE}"

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    if not system_prompt:
        return lambda user: render([{"role": "user", "content": user}])
    try:
        probe = render([{"role": "system", "content": system_prompt}, {"role": "user", "content": "?"}])
        system_role = system_prompt in probe
    except Exception:  # jinja raises TemplateError for "system role not supported"
        system_role = False
    if system_role:
        return lambda user: render([{"role": "system", "content": system_prompt},
                                    {"role": "user", "content": user}])
    return lambda user: render([{"role": "user", "content": f"{system_prompt}\n\n{user}"}])


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the special token the chat template puts right
    after the assistant's text (``<|im_end|>`` for ChatML), else ``eos_token_id``."""
    if getattr(tokenizer, "chat_template", None):
        sentinel = "SCD_ANSWER_SENTINEL"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "?"}, {"role": "assistant", "content": sentinel}],
                tokenize=False)
        except Exception:
            text = ""
        if sentinel in text:
            after = tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False).input_ids
            if after and after[0] in set(tokenizer.all_special_ids):
                return int(after[0])
    if tokenizer.eos_token_id is None:
        raise ModelError("tokenizer has no eos token and no chat template to find the end-of-turn "
                         "token; use a tokenizer with one")
    return int(tokenizer.eos_token_id)


@dataclass
class PromptEncoder:
    """Renders and tokenizes examples under a ``max_length`` cap on prompt + completion tokens."""

    tokenizer: Any
    render: Callable[[str], str]
    end_id: int
    max_length: int

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (one batched call)."""
        return self.tokenizer(texts, add_special_tokens=False).input_ids if texts else []

    def cut_prompt(self, example: Example, prompt_ids: list[int], budget: int) -> tuple[str, list[int]]:
        """The prompt within ``budget`` tokens, cutting ``example.body`` from its start.

        The body is tokenized once; each round drops the number of tokens still over budget from
        its front and decodes the rest (a few rounds, since re-tokenizing text can shift counts).
        """
        body_ids = self.ids([example.body])[0]
        drop = len(prompt_ids) - budget
        while True:
            kept = self.tokenizer.decode(body_ids[drop:]).lstrip("\ufffd") if drop < len(body_ids) else ""
            prompt = self.render(kept + example.suffix)
            prompt_ids = self.ids([prompt])[0]
            if len(prompt_ids) <= budget:
                return prompt, prompt_ids
            if drop >= len(body_ids):
                raise DataError(
                    f"{example.origin}, column 'question': even with the question text removed the "
                    f"prompt takes {len(prompt_ids)} tokens and the answer {self.max_length - budget}, "
                    f"over data.max_length={self.max_length}; raise data.max_length")
            drop += len(prompt_ids) - budget

    def encode(self, examples: Sequence[Example]) -> list[dict]:
        """One record per example (columns of docs/ARTIFACTS.md, weight 1.0)."""
        completions = [ids + [self.end_id] for ids in self.ids([e.answer for e in examples])]
        prompts = [self.render(e.question) for e in examples]
        records = []
        for example, prompt, prompt_ids, completion_ids in zip(
                examples, prompts, self.ids(prompts), completions, strict=True):
            budget = self.max_length - len(completion_ids)
            truncated = len(prompt_ids) > budget
            if truncated:
                prompt, prompt_ids = self.cut_prompt(example, prompt_ids, budget)
            records.append({
                "sample_id": example.sample_id, "tag": example.tag, "kind": example.kind,
                "question": example.question, "choices": list(example.choices),
                "answer": example.answer, "label": example.label, "prompt": prompt,
                "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "truncated": truncated, "weight": 1.0})
        return records


def split_schema():
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("tag", pa.string()), ("kind", pa.string()),
        ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.string()),
        ("label", pa.int32()), ("prompt", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
        ("completion_ids", pa.list_(pa.int32())), ("truncated", pa.bool_()), ("weight", pa.float32()),
    ])


def write_split(records: Sequence[dict], path: Path) -> None:
    """One split as Parquet with the fixed column types of docs/ARTIFACTS.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = split_schema()
    table = pa.Table.from_pylist(list(records), schema=schema)
    pq.write_table(table, path, compression="zstd")


def split_question(question: str, kind: str) -> tuple[str, str]:
    """(body, suffix) of a prepared row's ``question``: choice rows end with their options block
    (from the last line starting "A. "), list rows with their instruction paragraph."""
    if kind == "choice":
        return split_options_block(question)
    body, gap, instruction = question.rpartition("\n\n")
    return (body, gap + instruction) if gap else (question, "")
