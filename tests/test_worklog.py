"""Work records: every compute loop reports its tokens and seconds, the steady rate and the
compute-bound seconds follow the module's formula, and a workflow job's log carries them."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from test_evaluate import choice_rows, one_torch_thread  # noqa: F401 (fixture)

from scd_pipeline.engine import worklog
from scd_pipeline.engine.scoring import forward_batches
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama


@pytest.fixture
def empty_worklog():
    worklog.discard()  # forget what earlier tests in this process recorded
    yield
    worklog.discard()


def test_steady_rate_and_compute_seconds_by_hand():
    # rates 100 (first batch, warm-up: left out), 200, 150, 400 tokens/s -> median 200
    batches = [(100, 1.0), (400, 2.0), (300, 2.0), (400, 1.0)]
    assert worklog.steady_rate(batches) == 200.0
    record = worklog.summary("forward", batches)
    assert record == {"kind": "forward", "batches": 4, "tokens": 1200, "seconds": 6.0,
                      "steady_tokens_per_s": 200.0, "compute_seconds": 6.0}
    assert worklog.steady_rate([(50, 0.5)]) == 100.0  # one batch: its own rate


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        worklog.add("backward", 1, 1.0)


def test_a_forward_loop_records_every_token_it_ran_and_the_report_parses_back(empty_worklog, one_torch_thread):  # noqa: F811
    tokenizer = byte_level_tokenizer()
    frame = pd.DataFrame(choice_rows(tokenizer, 0, 7))
    model = tiny_llama(tokenizer, seed=1).eval()
    batches = list(forward_batches(model, frame, batch_size=3, pad_id=tokenizer.pad_token_id))
    assert len(batches) == 3
    stream = io.StringIO()
    records = worklog.report(stream)
    expected = sum(len(p) + len(c) for p, c in zip(frame["prompt_ids"], frame["completion_ids"], strict=True))
    assert [(r["kind"], r["batches"], r["tokens"]) for r in records] == [("forward", 3, expected)]
    lines = ["score x:  50%|#####     | 2/3" + stream.getvalue().splitlines()[0], "unrelated line"]
    assert worklog.parse(lines) == records  # a progress bar may share the line
    assert worklog.report(io.StringIO()) == []  # reported once


def test_every_model_job_of_a_workflow_run_logs_its_work(tiny_reference):
    """The tiny workflow's jobs end their logs with scd-work lines of the kinds they run."""
    workdir, _ = tiny_reference
    logs = workdir / "results" / "demo" / "logs"
    kinds = {}
    for log in sorted(logs.glob("*.log")):
        records = worklog.parse(log.read_text(encoding="utf-8", errors="replace").splitlines())
        kinds[log.stem] = {r["kind"] for r in records}
        for record in records:
            assert record["tokens"] > 0 and record["compute_seconds"] > 0, (log.name, record)
    assert kinds["sft_teacher"] >= {"train", "forward"}  # training steps, validation at checkpoints
    assert {"train"} <= kinds["distill_scd_aw"]
    assert kinds["cache_logits_1"] == {"forward"}
    assert kinds["evaluate_student_sft"] == {"forward"}
    assert kinds["prepare_data"] == set()


def test_a_process_that_used_a_gpu_adds_its_peak_memory_to_each_line(monkeypatch):
    import torch

    worklog.add("forward", 100, 1.0)
    stream = io.StringIO()
    assert "peak_gpu_bytes" not in worklog.report(stream)[0]  # this CPU: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 3_000_000_000)
    worklog.add("forward", 100, 1.0)
    worklog.add("train", 50, 2.0)
    records = worklog.parse(worklog_lines := _report_lines())
    assert [r["peak_gpu_bytes"] for r in records] == [3_000_000_000, 3_000_000_000], worklog_lines


def _report_lines() -> list[str]:
    stream = io.StringIO()
    worklog.report(stream)
    return stream.getvalue().splitlines()
