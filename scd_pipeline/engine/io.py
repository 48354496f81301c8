"""Atomic writes and checksums: a crash never leaves a half-written file under its final name.
Also the one-line description of a file-system error that the CLI prints instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; outputs should be shareable
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; it replaces ``final`` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_safe(value: Any) -> Any:
    """JSON has no NaN: undefined metrics (e.g. on an empty tag) are written as null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_RESULTS_ADVICE = "set results_dir (--results-dir or config key results_dir) to a writable folder"


def _file_in_the_way(*paths: str | None) -> Path | None:
    """The first existing ancestor of one of ``paths`` that is not a folder (ENOTDIR's cause)."""
    for raw in paths:
        if not raw:
            continue
        for ancestor in Path(raw).parents:
            if ancestor.exists():
                if not ancestor.is_dir():
                    return ancestor
                break
    return None


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error: the path, what went wrong and what to do."""
    path = exc.filename if exc.filename is not None else exc.filename2
    where = f"{path}: " if path is not None else ""
    code = exc.errno
    if code == errno.EROFS:
        return f"{where}read-only file system; {_RESULTS_ADVICE}"
    if code == errno.ENOTDIR:
        blocker = _file_in_the_way(exc.filename, exc.filename2)
        if blocker is not None:
            return (f"{blocker} is a file where a folder is needed (for {path}); move the file "
                    f"away or {_RESULTS_ADVICE}")
        return f"{where}a part of this path is not a folder; {_RESULTS_ADVICE}"
    if code == errno.EEXIST and path is not None and Path(path).exists() and not Path(path).is_dir():
        return f"{path} is a file where a folder is needed; move the file away or {_RESULTS_ADVICE}"
    if code == errno.EISDIR:
        return f"{where}is a folder where a file is needed; move the folder away or pass a file"
    if code in (errno.EACCES, errno.EPERM):
        return (f"{where}permission denied; give this user access to it, or {_RESULTS_ADVICE}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}no space left (disk or quota full); free some space, or {_RESULTS_ADVICE}"
    if code == errno.ENOENT:
        return f"{where}no such file or folder; check the path (or re-run the stage that writes it)"
    detail = " ".join(str(exc.strerror or exc).split())  # some libraries put newlines in messages
    return f"{where}{detail}"
