"""Atomic writes: a crash never leaves a half-written artefact that a later stage would trust.

Files and folders are written under a temporary sibling name ``.NAME.tmp-PID-XXXXXXXX`` and
renamed into place only once complete (``os.replace`` is atomic on one filesystem). The pid in
the name lets the next writer of the same place remove what a killed process left behind
(:func:`clean_stale_temporaries`). Files get the modes the umask gives any new file (libraries
that write through :mod:`tempfile` would otherwise leave 0600), and JSON is always valid JSON:
NaN and infinities are written as ``null`` (:func:`json_safe`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmrfed.errors import UsageError

if TYPE_CHECKING:
    from cmrfed.outputs import OutputKind

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``path`` (``.NAME.tmp-PID-*`` siblings) whose process is dead.

    A ``kill -9`` during an atomic write leaves such a sibling; the next write of the same place
    removes it. Temporaries of live processes (another writer at work) are left alone.
    """
    final = Path(path)
    parent = final.parent
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["name"] != final.name:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        target = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                target.unlink()
        removed.append(target)
    return removed


_UMASK: int | None = None


def file_mode() -> int:
    """The mode a new regular file gets under this process's umask (0o644 under umask 022)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False,
               kind: OutputKind | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` only if the block succeeds.

    An existing, non-empty ``path`` is refused unless ``overwrite``; with ``kind``, only a folder
    that is that kind of cmrfed artefact may be replaced (see :mod:`cmrfed.outputs`). The old
    folder is replaced only after the new one is complete, so a failed run leaves it untouched.
    """
    final = Path(path)
    if kind is not None:
        from cmrfed.outputs import check_replaceable

        check_replaceable(final, kind, overwrite)
    elif final.exists() and not overwrite:
        raise UsageError(f"{final} already exists; choose another --out or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(new: Path, final: Path) -> None:
    """Put the complete folder ``new`` at ``final``, removing what was there only afterwards."""
    if final.exists():
        old = _tmp_sibling(final)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a step not done yet, or
    killed while writing: the caller then redoes that step)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / infinities as None, numpy scalars as Python numbers, tuples as lists."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (never a bare NaN) of ``obj``; see :func:`json_safe`."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json_text(obj, indent=2) + "\n", encoding="utf-8")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (input provenance and shard checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
