"""An exclusive lock per output folder, held for the whole command that writes it.

Two commands writing one folder at once (a ``--resume`` of a run that is still running, an
``--overwrite`` of a run in progress, two ``evaluate`` of one run) would interleave their
files; the second one is refused instead, with the holder's pid.

The lock is ``flock`` on a hidden sibling file ``.NAME.lock`` (a sibling, not a file inside, so
it also covers a folder that is being swapped in or out). The kernel drops a ``flock`` when its
process dies, however it dies, so the lock of a killed process is never stale: the next command
simply takes it. The file holds the holder's pid for the message and is removed on release; a
taker checks it still locks the file at that path (not one a releaser just unlinked).

Whoever takes a folder's lock first recovers what a killed writer left beside the folder
(:func:`cmrfed.atomic.clean_stale_temporaries`: its temporaries removed, a replacement it did not
finish rolled back), so a killed command's leftovers never outlive the next command on the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from cmrfed.atomic import clean_stale_temporaries
from cmrfed.errors import UsageError

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): re-entrant within a process
_guard = threading.Lock()


def lock_path(folder: str | os.PathLike[str]) -> Path:
    """Where the lock of ``folder`` lives: ``PARENT/.NAME.lock``."""
    folder = Path(folder).expanduser().absolute()
    return folder.with_name(f".{folder.name}.lock")


def holder_pid(folder: str | os.PathLike[str]) -> int | None:
    """The pid written in ``folder``'s lock file, if there is one (it may be stale)."""
    try:
        text = lock_path(folder).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _open_locked(path: Path, folder: Path) -> int:
    """An fd holding ``flock`` on the file at ``path``; UsageError if another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot lock {folder}: cannot write {path.parent} ({exc.strerror}); "
                             "choose an --out in a folder you can write") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder_pid(folder)
            who = f"pid {pid}" if pid is not None else "another process"
            raise UsageError(f"{folder} is in use by another cmrfed command ({who}, lock file "
                             f"{path}); wait for it to finish or stop it, then retry") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was released and unlinked between our open and flock: retry


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` for the block (re-entrant within one process); on
    taking it, recover the leftovers of killed writers beside ``folder``."""
    path = lock_path(folder)
    with _guard:
        taken = path not in _held
        if not taken:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create {path.parent} ({exc.strerror}); choose an --out "
                                 "in a folder you can write") from exc
            fd = _open_locked(path, Path(folder))
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            _held[path] = (fd, 1)
    try:
        if taken:
            clean_stale_temporaries(Path(folder).expanduser().absolute())
        yield path
    finally:
        with _guard:
            fd, depth = _held[path]
            if depth > 1:
                _held[path] = (fd, depth - 1)
            else:
                del _held[path]
                with contextlib.suppress(OSError):
                    os.unlink(path)  # while still holding it: a waiting taker re-checks the inode
                os.close(fd)
