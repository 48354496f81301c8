"""One machine, several GPUs, several jobs: each job its own GPUs (``scd-pipeline run-on-gpus``).

Snakemake counts GPUs (``--resources gpu=N``) but does not say which: without SLURM, every job
would start on GPU 0. Here a job claims ``count`` of the machine's ``total`` GPUs by taking an
exclusive ``flock`` on ``{folder}/gpu-{i}.lock`` for each, all at once or none (a job never holds
some while it waits for more, so two jobs cannot block each other), and runs with
``CUDA_VISIBLE_DEVICES`` set to them. The locks belong to the job's process: they go when it ends,
however it ends (a killed job leaves no claim behind). Under SLURM the scheduler assigns GPUs.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from scd_pipeline.errors import ConfigError


def try_claim(count: int, total: int, folder: Path) -> tuple[list[int], list[int]] | None:
    """``count`` free GPU ids of ``total`` and the open lock descriptors holding them, or None
    (nothing held) when fewer are free."""
    if not 1 <= count <= total:
        raise ConfigError(f"run-on-gpus: {count} GPU(s) asked of {total} on this machine "
                          "(resources.gpus must be between 1 and resources.local_gpus)")
    folder.mkdir(parents=True, exist_ok=True)
    held: list[tuple[int, int]] = []
    for device in range(total):
        fd = os.open(folder / f"gpu-{device}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((device, fd))
        if len(held) == count:
            return [d for d, _ in held], [f for _, f in held]
    for _, fd in held:
        os.close(fd)  # not enough free: hold none while waiting
    return None


def claim(count: int, total: int, folder: Path, poll_seconds: float = 2.0,
          timeout: float | None = None) -> tuple[list[int], list[int]]:
    """Wait until ``count`` GPUs are free and claim them (see :func:`try_claim`)."""
    started = time.monotonic()
    while True:
        found = try_claim(count, total, folder)
        if found is not None:
            return found
        if timeout is not None and time.monotonic() - started > timeout:
            raise TimeoutError(f"{folder}: {count} of {total} GPUs not free after {timeout:.0f} s")
        time.sleep(poll_seconds)


def run_on_gpus(count: int, total: int, folder: Path, command: list[str]) -> None:
    """Claim the GPUs, then replace this process by ``command`` with ``CUDA_VISIBLE_DEVICES`` set
    (leading ``NAME=value`` words are environment settings, as in a shell). The lock descriptors
    pass to the command, which holds the GPUs until it exits."""
    env = dict(os.environ)
    while command and "=" in command[0] and command[0].split("=", 1)[0].isidentifier():
        name, value = command.pop(0).split("=", 1)
        env[name] = value
    if not command:
        raise ConfigError("run-on-gpus: no command after --")
    devices, fds = claim(count, total, folder)
    for fd in fds:
        os.set_inheritable(fd, True)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    os.execvpe(command[0], command, env)
