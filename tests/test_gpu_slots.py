"""One machine, several GPUs: ``scd-pipeline run-on-gpus`` gives each job GPUs no other job holds,
all at once or none, and a job's GPUs are free again when it ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from scd_pipeline.engine.gpu_slots import claim, try_claim
from scd_pipeline.errors import ConfigError

CLI = [sys.executable, "-m", "scd_pipeline", "run-on-gpus"]
SHOW = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ.get('MARK', ''))"]


def test_claims_are_disjoint_all_or_nothing_and_end_with_their_holder(tmp_path):
    first = try_claim(2, 3, tmp_path)
    assert first is not None and first[0] == [0, 1]
    assert try_claim(2, 3, tmp_path) is None  # one free: a two-GPU job holds nothing while it waits
    second = try_claim(1, 3, tmp_path)
    assert second is not None and second[0] == [2]  # the one-GPU job was not blocked by the waiting one
    for fd in first[1]:
        os.close(fd)  # the holder ends
    assert try_claim(2, 3, tmp_path)[0] == [0, 1]
    with pytest.raises(ConfigError, match="3 GPU.s. asked of 2"):
        try_claim(3, 2, tmp_path)
    with pytest.raises(TimeoutError):
        claim(1, 3, tmp_path, poll_seconds=0.05, timeout=0.2)  # 0, 1 and 2 are held


def test_run_on_gpus_gives_each_job_its_own_and_a_killed_job_frees_them(tmp_path):
    slots = ["--of", "2", "--slots", str(tmp_path)]
    holder = subprocess.Popen([*CLI, "--gpus", "1", *slots, "--", "sleep", "60"])
    try:
        deadline = time.monotonic() + 60
        while (both := try_claim(2, 2, tmp_path)) is not None:  # until the holder has taken its GPU
            for fd in both[1]:
                os.close(fd)
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.1)
        other = subprocess.run([*CLI, "--gpus", "1", *slots, "--", "MARK=x", *SHOW],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ["1", "x"]  # GPU 0 is the holder's; NAME=value sets the environment
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = subprocess.run([*CLI, "--gpus", "2", *slots, "--", *SHOW], capture_output=True, text=True, timeout=60)
    assert after.stdout.split() == ["0,1"]


def test_a_request_beyond_the_machine_is_one_line(tmp_path):
    result = subprocess.run([*CLI, "--gpus", "3", "--of", "2", "--slots", str(tmp_path), "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "resources.gpus must be between 1 and resources.local_gpus" in result.stderr
