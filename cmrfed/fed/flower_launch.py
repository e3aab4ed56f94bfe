"""Submitting a Flower run from the command line: ``cmrfed flower run``.

A Flower app is a folder with a pyproject.toml naming its ServerApp and ClientApp; ``flwr run``
bundles it and hands it to a SuperLink. cmrfed's apps live in :mod:`cmrfed.fed.flower_server` and
:mod:`cmrfed.fed.flower_client`, so the app folder is only that pyproject.toml, carrying the run's
options as its run config; it is written to a temporary folder for each run. ``--resume`` submits
a new Flower run that continues RUN from its checkpoint (the ServerApp reads the recorded options
from RUN/run.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

import cmrfed
from cmrfed import paths
from cmrfed.errors import DataError, UsageError
from cmrfed.faults import ENV as FAULT_ENV
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import run_config_of
from cmrfed.fed.methods import resolve_method
from cmrfed.fed.rounds import RunSummary

APP_PUBLISHER = "cmrfed"
CONNECTION = "cmrfed"  # the SuperLink connection in the throw-away Flower config of `--superlink`
COMPONENTS = {"serverapp": "cmrfed.fed.flower_server:server_app",
              "clientapp": "cmrfed.fed.flower_client:client_app"}


def write_app(folder: Path, run_config: Mapping[str, Any]) -> Path:
    """A Flower app folder (just a pyproject.toml) whose components are cmrfed's apps and whose
    run config is ``run_config``; ``flwr run FOLDER <connection>`` submits it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "cmrfed-flower", "version": cmrfed.__version__,
                    "description": "cmrfed federated LoRA fine-tuning over Flower",
                    "license": "MIT", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": APP_PUBLISHER, "components": dict(COMPONENTS),
                                  "config": dict(run_config)}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return folder


def _flwr_executable() -> str:
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise UsageError("the `flwr` command is not installed; pip install 'cmrfed[flower]'")
    return found


def write_connection(home: Path, superlink: str, insecure: bool, root_certificates: Path | None) -> None:
    """A Flower config (FLWR_HOME/config.toml) with one SuperLink connection named ``cmrfed``."""
    if insecure == (root_certificates is not None):
        raise UsageError("pass exactly one of --insecure (plain HTTP, for loopback tests) or "
                         "--root-certificates CA.pem (TLS)")
    connection: dict[str, Any] = {"address": superlink}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).expanduser().resolve())  # type: ignore[arg-type]
    home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def run_flower(
    cfg: FederateConfig,
    out: Path,
    sites: int,
    superlink: str | None = None,
    connection: str | None = None,
    insecure: bool = False,
    root_certificates: Path | None = None,
    overwrite: bool = False,
    node_timeout_s: float = 600.0,
    min_sites: int | None = None,
    wait_s: float | None = None,
    resume: bool = False,
    typed: frozenset[str] = frozenset(),
    console: Console | None = None,
) -> RunSummary:
    """Submit a run to a running SuperLink with ``flwr run --stream`` and wait for it to finish.

    ``superlink`` (host:port) uses a throw-away Flower config; ``connection`` names one in the
    user's own Flower config instead (needed for SuperLinks with account login). ``wait_s``
    bounds the whole run (None: wait for as long as it takes). ``resume``: continue RUN after a
    killed ServerApp or SuperLink; ``typed``: the options the user gave, which must then equal
    the recorded ones. A ``CMRFED_FAULT`` in this environment travels to the ServerApp.
    """
    console = console or Console()
    if (superlink is None) == (connection is None):
        raise UsageError("pass exactly one of --superlink HOST:PORT or --connection NAME")
    spec = resolve_method(cfg.method, cfg.head)
    if not spec.federated:
        raise UsageError(f"--method {cfg.method} sends nothing to a server; run it with `cmrfed federate`")
    out = Path(out).expanduser().resolve()
    run_config = run_config_of(cfg, out, sites, overwrite, node_timeout_s, min_sites, resume=resume,
                               typed=typed, fault=os.environ.get(FAULT_ENV))
    flwr = _flwr_executable()
    with tempfile.TemporaryDirectory(prefix="cmrfed-flower-") as tmp:
        app = write_app(Path(tmp) / "app", run_config)
        env = dict(os.environ)
        if superlink is not None:
            write_connection(Path(tmp) / "home", superlink, insecure, root_certificates)
            env["FLWR_HOME"] = str(Path(tmp) / "home")
        command = [flwr, "run", str(app), connection or CONNECTION, "--stream"]
        try:
            finished = subprocess.run(command, env=env, check=False, timeout=wait_s)
        except subprocess.TimeoutExpired as exc:
            raise DataError(f"the Flower run of {out} did not finish within {wait_s} s") from exc
    config_file = paths.run_config_path(out)
    run_info = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    result = run_info.get("result")
    if result is None:
        raise DataError(f"the Flower run did not finish {out} (flwr exit code {finished.returncode}); "
                        "see its log above and the SuperLink's and SuperNodes' logs")
    if "stopped" in result:
        raise DataError(f"the Flower run stopped early, {result['stopped']['reason']}; {out} keeps round "
                        f"{result['completed_rounds']}, the last completed one (evaluate it as it is, or "
                        "start a new run once enough sites are back)")
    console.print(f"{out}: {result['completed_rounds']} rounds, best round {result['best_round']}; "
                  "evaluate it site by site (see README)", highlight=False)
    return RunSummary(out, result["completed_rounds"], result["best_round"],
                      result["best_mean_val_balanced_accuracy"], result["bytes_up_total"],
                      result["bytes_down_total"])
