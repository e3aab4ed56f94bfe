"""Real Flower processes on loopback for the tests: free ports, a port to wait for, and a launcher
that stops everything it started (tests/test_flower.py, tests/test_flower_tls.py).

Each process runs in a session of its own with its own FLWR_HOME and log file, from the test's
environment (so the ServerApp and ClientApp import this checkout's cmrfed), with telemetry off,
one thread per process, and Flower's SuperExec polling for apps to start every 0.1 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, log: Path,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    """Until something listens on 127.0.0.1:``port``; fails early, with its log, if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited early:\n{log.read_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{log.stem} did not listen on {port} within {timeout_s} s")


class Processes:
    """Flower processes a test started, each in its own process group, all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                        FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1",
                        # Flower's SuperExec looks for a new app to start every second by default
                        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        env = dict(self.env, FLWR_HOME=str(self.root / f"home-{name}"))
        with log.open("wb") as handle:
            process = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append(process)
        return process, log

    def stop(self) -> None:
        """SIGTERM every started process and its descendants (Flower starts its SuperExec in a
        session of its own), then SIGKILL whatever is left after a grace period."""
        family = []
        for process in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                family.extend(psutil.Process(process.pid).children(recursive=True))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        _, alive = psutil.wait_procs(family, timeout=15)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def logs(self) -> str:
        logs = sorted(self.root.glob("*.log"))
        return "\n".join(f"== {log.name}\n{log.read_text()[-2000:]}" for log in logs)
