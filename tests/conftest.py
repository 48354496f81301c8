"""Shared fixtures: the repository root, the shared JMED-LLM files, a tiny byte-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_JMED = REPO_ROOT.parent / "shared" / "data" / "jmed-llm"

# Tests never reach a hub; keep CPU runs small and repeatable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def jmed_root() -> Path:
    if not SHARED_JMED.is_dir():
        pytest.skip(f"shared JMED-LLM files not found at {SHARED_JMED}")
    return SHARED_JMED


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A saved byte-level tokenizer (259 tokens, ChatML template) usable as --tokenizer."""
    from scd_pipeline.engine.tiny import byte_level_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """One uninterrupted run of the tiny workflow (tests/tiny_workflow.py), shared by the workflow
    fault tests and the SLURM test; returns (its folder, when the dry run made during it ended)."""
    from tiny_workflow import reference_run

    return reference_run(tmp_path_factory.mktemp("tiny-reference"))


@pytest.fixture(scope="session", autouse=True)
def no_work_lines_at_exit():
    """Stages run in-process by tests record their batches; the test process is not a job, so it
    forgets them instead of printing ``scd-work`` lines when it exits."""
    yield
    from scd_pipeline.engine import worklog

    worklog.discard()
