"""``cmrfed`` commands in real child processes that do not import torch again.

A test that kills a command at a fault point (``CMRFED_FAULT``), or reads its exit code and its
stderr, needs a real process: SIGKILL must land on one, and nothing of the test may run inside it.
``python -m cmrfed.cli`` is such a process, but each one spends about 1.3 s of CPU importing torch
and cmrfed before it does anything, and the kill chains start dozens of them (42 in the resume
matrix alone). Here each command runs in a process forked from a multiprocessing forkserver that
imported ``cmrfed.cli`` once. The forkserver is single-threaded, so forking it is safe. The child
takes its own argv, environment, working folder and output files, then runs the console entry
point :func:`cmrfed.cli.main`, as the installed ``cmrfed`` script does. A fault kills it exactly
as it kills a fresh interpreter, and its exit code is the command's.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
PRELOAD = ("cmrfed.cli", "cmrfed.fed.inprocess", "cmrfed.study.runner", "cmrfed.pretrain",
           "cmrfed.eval.evaluate_run", "cmrfed.data.prepare")
"""Imported once by the forkserver: the entry point and what its commands import when they run."""
_CONTEXT.set_forkserver_preload(list(PRELOAD))


@dataclass(frozen=True)
class Finished:
    """A finished command: its exit code (negative: killed by that signal) and its output."""

    returncode: int
    stdout: str
    stderr: str


def _child(args: Sequence[str], env: Mapping[str, str], cwd: str | None, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.argv = ["cmrfed", *args]
    from cmrfed.cli import main

    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_cmrfed(args: Sequence[str | Path], env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None,
               timeout: float = 600) -> Finished:
    """``cmrfed ARGS`` in a child process, with ``env`` as its whole environment (default: this
    process's) and ``cwd`` as its working folder; waits at most ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="cmrfed-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        process = _CONTEXT.Process(target=_child, args=(
            [str(a) for a in args], dict(os.environ if env is None else env),
            None if cwd is None else str(cwd), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise TimeoutError(f"cmrfed {' '.join(map(str, args))} did not finish within {timeout} s")
        return Finished(process.exitcode, out.read_text(encoding="utf-8", errors="replace"),
                        err.read_text(encoding="utf-8", errors="replace"))
