"""Shared fixtures: the repository root, the shared JMED-LLM files, a tiny byte-level tokenizer."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_JMED = REPO_ROOT.parent / "shared" / "data" / "jmed-llm"

# The SLURM executor plugin runs `scontrol show config` whenever Snakemake starts (to word a help
# text). With SLURM's client installed but no controller up (this machine, except during the SLURM
# test) that call waits ~9 s per Snakemake start, ~20 starts in the suite. Every test but the SLURM
# one finds first on PATH an `scontrol` that fails at once, as where no controller answers: the
# plugin words its help without MinJobAge, nothing else changes. tests/test_slurm.py runs with
# REAL_PATH.
REAL_PATH = os.environ.get("PATH", "")
_NO_SLURM_PROBE = Path(tempfile.mkdtemp(prefix="scd-tests-no-slurm-probe-"))
(_NO_SLURM_PROBE / "scontrol").write_text("#!/bin/sh\nexit 1\n")
(_NO_SLURM_PROBE / "scontrol").chmod(0o755)
os.environ["PATH"] = f"{_NO_SLURM_PROBE}{os.pathsep}{REAL_PATH}"
atexit.register(shutil.rmtree, _NO_SLURM_PROBE, ignore_errors=True)

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
