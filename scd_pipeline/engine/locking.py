"""One writer per artifact: a stage holds an exclusive OS lock on everything it writes.

Each stage declares what it writes (``artifacts()`` in its module; ``scd_pipeline.stages.artifacts``
finds it by command name). Before touching anything, a stage locks each artifact it writes (its
outputs and its resume state) with ``fcntl.flock`` on a file under ``{results_dir}/.locks/``. The OS releases the lock when the
process ends, however it ends, so a killed run never leaves a stale lock behind. A second writer of
the same artifact stops at once with one line naming the running one (pid and command), and
touches nothing. With the locks held, the stage removes temporaries that killed writers of the same
artifacts left behind (``.NAME.*.tmp`` from ``io.atomic_path`` / ``io.atomic_dir``): no live
writer can own them any more.

Under ``accelerate launch`` every process runs the same command; only the process of rank 0 (or a
process without RANK / LOCAL_RANK) locks and cleans. The lock files stay (removing one while
another process opens it would break the exclusion); ``results/.locks/`` may be deleted whenever
nothing runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scd_pipeline.errors import ConfigError, ScdError

LOCK_DIR = ".locks"
# flock is not offered by every network file system; there the stage runs unlocked, with a warning.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockHeld(ScdError):
    """Another live process is writing the same artifact."""


@dataclass(frozen=True)
class Artifact:
    """What a stage writes as one unit, and the files and folders it consists of."""

    path: Path               # names the artifact in messages and its lock file
    parts: tuple[Path, ...]  # files and folders whose stale temporaries are removed once locked
    resume_state: bool = False  # a .state/ folder: only its top-level temporaries are removed


def plain_name(name: str, option: str) -> str:
    """``name`` when it is a plain folder name; a one-line ConfigError naming ``option`` otherwise."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"{option} {name!r}: must be a plain folder name (no '/', not starting with '.')")
    return name


def is_lock_holder_rank() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (RANK, else LOCAL_RANK)."""
    for variable in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(variable, "").strip()
        if value:
            return value == "0"
    return True


def lock_file(config: dict, artifact: Path) -> Path:
    """``{results_dir}/.locks/<artifact relative to results_dir>.lock``."""
    results = Path(config["results_dir"])
    try:
        relative = artifact.relative_to(results)
    except ValueError:
        relative = Path(*[part for part in artifact.parts if part not in ("/", "..")])
    return results / LOCK_DIR / f"{relative}.lock"


def _this_process() -> dict:
    argv = list(sys.argv) or ["scd-pipeline"]
    program = Path(argv[0]).name
    argv[0] = {"__main__.py": "python -m scd_pipeline", "-c": "python -c"}.get(program, program)
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([argv[0], shlex.join(argv[1:])]).strip(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _holder(path: Path) -> dict:
    """Who holds the lock, as written by the holder (it writes just after locking: retry briefly)."""
    for _ in range(20):
        try:
            text = path.read_text(encoding="utf-8").strip()
            if text:
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _held_message(artifact: Path, holder: dict) -> str:
    pid = holder.get("pid")
    if pid is None:
        return (f"{artifact} is being written by another process (it did not say which); wait for "
                "it to finish, then re-run")
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return (f"{artifact} is being written by pid {pid}{where} ({holder.get('command', '?')}, started "
            f"{holder.get('started', '?')}); wait for it to finish, or stop it (kill {pid}), then re-run")


def _acquire(path: Path, artifact: Path) -> int | None:
    """An open descriptor holding the exclusive lock ``path``; None where locks are unsupported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(_held_message(artifact, _holder(path))) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKING:
            print(f"warning: {path}: this file system does not support locks ({exc.strerror}); "
                  "a second writer of the same output would not be stopped", file=sys.stderr)
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(_this_process()) + "\n").encode("utf-8"))
    return fd


def _is_temporary(entry: Path, keep_old: bool) -> bool:
    name = entry.name
    return name.startswith(".") and (name.endswith(".tmp") or (name.endswith(".old") and not keep_old))


def stale_temporaries(artifact: Artifact) -> list[Path]:
    """Leftovers of killed writers: ``.NAME.*.tmp`` and ``.NAME.old`` beside each part, and inside a
    part that is a folder ``.*.tmp`` / ``.*.old`` at any depth (a resume-state folder: ``.*.tmp`` at
    the top only; its ``.latest.old`` may be the last complete resume point)."""
    found: list[Path] = []
    for part in artifact.parts:
        if part.parent.is_dir():
            found += [entry for entry in part.parent.iterdir()
                      if entry.name.startswith(f".{part.name}.") and _is_temporary(entry, keep_old=False)]
        if part.is_dir():
            entries = part.iterdir() if artifact.resume_state else part.rglob(".*")
            found += [entry for entry in entries if _is_temporary(entry, keep_old=artifact.resume_state)]
    return sorted(set(found), key=lambda entry: len(entry.parts))  # outermost first


def remove_stale_temporaries(artifact: Artifact) -> None:
    for entry in stale_temporaries(artifact):
        if not entry.exists() and not entry.is_symlink():
            continue  # inside a folder removed just before
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        print(f"removed {entry} (left by a killed run)", file=sys.stderr)


@contextlib.contextmanager
def stage_lock(config: dict, artifacts: list[Artifact]) -> Iterator[list[Artifact]]:
    """Hold the exclusive locks of ``artifacts`` (what a stage declares it writes) for the block,
    after removing stale temporaries; raise LockHeld naming the holder if another process has one."""
    if not is_lock_holder_rank():
        yield artifacts
        return
    held: list[int] = []
    try:
        for artifact in artifacts:
            fd = _acquire(lock_file(config, artifact.path), artifact.path)
            if fd is not None:
                held.append(fd)
        for artifact in artifacts:
            remove_stale_temporaries(artifact)
        yield artifacts
    finally:
        for fd in held:
            os.close(fd)  # closing the last descriptor releases the lock
