"""Real Flower processes on loopback for the tests: free ports, a port to wait for, and a launcher
that stops everything it started, and a loopback federation of a prepared folder
(tests/test_flower.py, tests/test_flower_run.py, tests/test_flower_tls.py).

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

from cmrfed.data.shards import load_manifest
from cmrfed.fed.flower_config import site_node_config

START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0


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


def wait_until(condition, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Until ``condition()`` holds; fails, naming ``what``, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Federation:
    """A SuperLink and one SuperNode per client of ``prepared`` on loopback, kept for several runs."""

    def __init__(self, prepared: Path, root: Path) -> None:
        self.prepared, self.root = prepared, root
        root.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(root)
        self.clients = list(load_manifest(prepared).clients)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.link, link_log = self.processes.start("superlink", [
            "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port)])
        wait_for_port(self.port, self.link, link_log)
        for client in self.clients:
            self.start_node(client)

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    def site_dir(self, client: str) -> Path:
        return self.root / f"site-{client}"

    def start_node(self, client: str) -> subprocess.Popen:
        """A SuperNode for ``client``, always with the same node config (its restart too)."""
        node_config = site_node_config(client, self.prepared, self.site_dir(client), device="cpu")
        self.nodes[client], _ = self.processes.start(f"supernode-{client}-{len(self.processes.started)}", [
            "flower-supernode", "--insecure", "--superlink", self.superlink,
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config,
            "--max-wait-time", str(START_TIMEOUT_S)])
        return self.nodes[client]

    def command(self, out: Path, *options: str) -> list[str]:
        """`cmrfed flower run` of this federation, as the README documents it."""
        return [sys.executable, "-m", "cmrfed.cli", "flower", "run", "--superlink", self.superlink,
                "--insecure", "--sites", str(len(self.clients)), "--data", str(self.prepared),
                "--out", str(out), *options]

    def serverapps(self) -> list[psutil.Process]:
        """The ServerApp processes the SuperLink has started and that are still alive."""
        family = psutil.Process(self.link.pid).children(recursive=True)
        return [p for p in family if is_serverapp(p)]


def is_serverapp(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("flwr-serverapp" in part for part in process.cmdline())
    return False
