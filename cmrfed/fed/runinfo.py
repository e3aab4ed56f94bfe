"""A finished RUN folder read back: its configuration and its final or best tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.errors import DataError, UsageError
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.strategy import TensorState

ROUND_CHOICES = {"best": "best", "last": "final"}


@dataclass(frozen=True)
class RunInfo:
    """What run.json says about a run."""

    path: Path
    config: FederateConfig
    method: str
    seed: int
    manifest_sha256: str
    clients: tuple[str, ...]
    raw: dict[str, Any]

    @property
    def prepared(self) -> Path:
        return Path(self.config.data)


def load_run(run: str | Path) -> RunInfo:
    """Read RUN/run.json; refuse a folder that is not a finished cmrfed run."""
    folder = Path(run)
    config_file = paths.run_config_path(folder)
    if not config_file.exists():
        raise DataError(f"{folder}: no run.json; run `cmrfed federate --out {folder}` first")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = FederateConfig.from_dict(raw["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{config_file}: not a cmrfed run.json ({exc})") from exc
    if "result" not in raw:
        raise DataError(f"{folder}: the run did not finish; continue it with "
                        f"`cmrfed federate --out {folder} --resume`")
    if not paths.shared_tensors_path(folder).exists():
        raise DataError(f"{folder}: the run finished but {paths.shared_tensors_path(folder)} is "
                        "missing (deleted or not copied); restore it, or run federate again with "
                        "--overwrite")
    return RunInfo(
        path=folder, config=config, method=config.method, seed=config.seed,
        manifest_sha256=raw["data"]["manifest_sha256"], clients=tuple(raw["clients"]), raw=raw,
    )


def load_states(info: RunInfo, which: str) -> tuple[TensorState, dict[str, TensorState]]:
    """(shared tensors, private tensors per client) of the ``best`` or ``last`` round."""
    if which not in ROUND_CHOICES:
        raise UsageError(f"--round must be one of {', '.join(ROUND_CHOICES)}, not {which!r}")
    folder = ROUND_CHOICES[which]
    shared = load_shared(info, which)
    private = {c: _read_tensors(paths.private_tensors_path(info.path, c, folder), which)
               for c in info.clients}
    return shared, private


def _read_tensors(path: Path, which: str) -> TensorState:
    """A safetensors file of the run; missing or corrupt is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: missing (the {which} tensors of the run); restore it, or run "
                        "federate again with --overwrite")
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc}); the file is corrupt: "
                        "restore it, or run federate again with --overwrite") from exc


def shared_path(info: RunInfo, which: str) -> Path:
    """The run's shared tensors file of the ``best`` or ``last`` round."""
    if which not in ROUND_CHOICES:
        raise UsageError(f"--round must be one of {', '.join(ROUND_CHOICES)}, not {which!r}")
    return paths.shared_tensors_path(info.path, ROUND_CHOICES[which])


def load_shared(info: RunInfo, which: str) -> TensorState:
    """The shared tensors of the ``best`` or ``last`` round (all a site needs from the run)."""
    return _read_tensors(shared_path(info, which), which)


def round_index(info: RunInfo, which: str) -> int:
    """The round whose tensors ``which`` (best or last) names."""
    return int(info.raw["result"]["best_round" if which == "best" else "completed_rounds"])
