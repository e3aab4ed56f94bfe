"""Atomic writes and the one way a folder is replaced: a crash never leaves a half-written
artefact that a later stage would trust, nor loses the one it was replacing.

One naming scheme for everything a writer puts beside its target NAME:

- ``.NAME.tmp-PID-XXXXXXXX``: new content being written by process PID; renamed onto NAME only
  once complete (``os.replace`` is atomic on one filesystem);
- ``.NAME.old-PID-XXXXXXXX``: the previous NAME, set aside by PID while it is being replaced
  (:func:`set_aside`); deleted once the replacement is in place, put back if it fails.

One more sibling outlives its process on purpose: ``.RUN.overwrite``, where ``federate
--overwrite`` builds a replacement run that ``--overwrite --resume`` can continue after a crash
(:func:`cmrfed.fed.runlog.open_run_folder`); it is swapped in by the same :func:`swap_in`, and
``--overwrite`` alone discards it.

The pid in the name lets the next writer of the same place recover what a killed process left
behind (:func:`clean_stale_temporaries`): a dead writer's new content is removed and a replacement
it did not finish is rolled back (the old NAME put back). Files get the modes the umask gives any
new file (libraries that write through :mod:`tempfile` would otherwise leave 0600), and JSON is
always valid JSON: NaN and infinities are written as ``null`` (:func:`json_safe`).

This module imports nothing else of cmrfed: it is the floor everything else stands on. Which
folders ``--overwrite`` may replace is :mod:`cmrfed.outputs`' decision.
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
from typing import Any

import numpy as np

NEW, OLD = "tmp", "old"  # the roles of a sibling: new content being written, the old content set aside
_SIBLING = re.compile(rf"^\.(?P<name>.+)\.(?P<role>{NEW}|{OLD})-(?P<pid>\d+)-[0-9a-f]{{8}}$")


def sibling(path: Path, role: str = NEW) -> Path:
    """A fresh name beside ``path`` for this process, in the one naming scheme (module docstring)."""
    return path.with_name(f".{path.name}.{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


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
    """Recover what dead writers left beside ``path``; return the siblings removed or put back.

    A ``kill -9`` during a write leaves a ``.NAME.tmp-PID-*`` sibling: it is removed. A kill during
    a replacement leaves the old content as ``.NAME.old-PID-*``: the replacement did not finish,
    so it is rolled back as a failed one would be (whatever stands at ``path`` is removed and the
    old content put back). Siblings of live processes (another writer at work) are left alone.
    """
    final = Path(path)
    recovered: list[Path] = []
    try:
        entries = sorted(os.scandir(final.parent), key=lambda e: e.name)
    except OSError:
        return recovered
    for entry in entries:
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != final.name:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        target = Path(entry.path)
        if match["role"] == OLD:
            roll_back(target, final)
        else:
            _remove(target)
        recovered.append(target)
    return recovered


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
    tmp = sibling(final)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` only if the block succeeds.

    Whatever was at ``path`` is replaced only after the new folder is complete (:func:`swap_in`),
    so a failed run leaves it untouched. Whether it may be replaced at all is the caller's
    decision (:func:`cmrfed.outputs.check_replaceable` for a command's ``--out``).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def set_aside(final: Path) -> Iterator[None]:
    """Replace ``final`` by what the block puts at its place: the old content waits as
    ``.NAME.old-PID-*`` and is deleted when the block succeeds, put back when it fails (and, when
    the process is killed, by the next :func:`clean_stale_temporaries` of the same place)."""
    aside = sibling(final, OLD) if final.exists() or final.is_symlink() else None
    if aside is not None:
        os.replace(final, aside)
    try:
        yield
    except BaseException:
        if aside is not None:
            roll_back(aside, final)
        raise
    if aside is not None:
        _remove(aside)


def roll_back(aside: Path, final: Path) -> None:
    """Put the content set aside back at ``final``, removing what a failed replacement left there."""
    if final.exists() or final.is_symlink():
        _remove(final)
    os.replace(aside, final)


def swap_in(new: Path, final: Path) -> None:
    """Put the complete folder ``new`` at ``final``, removing what was there only afterwards."""
    with set_aside(final):
        os.replace(new, final)


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a step not done yet, or
    killed while writing: the caller then redoes that step)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def json_safe(obj: Any) -> Any:
    """``obj`` as JSON holds it: NaN / infinities (undefined numbers) as None, numpy scalars as
    Python numbers, tuples as lists, mapping keys as strings. The one scrubber every JSON file
    and in-memory document goes through; :func:`nan_for_null` is its inverse."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
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


def number(value: Any) -> float:
    """A number read back from JSON: null (an undefined number, see :func:`json_safe`) is NaN."""
    return float("nan") if value is None else float(value)


def nan_for_null(obj: Any) -> Any:
    """JSON read back with every null as NaN, so numbers read back equal the ones written."""
    if isinstance(obj, Mapping):
        return {k: nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_for_null(v) for v in obj]
    return float("nan") if obj is None else obj


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
