"""An evaluated RUN folder read back as one frozen record: what ``cmrfed compare`` works on.

Everything ``compare`` needs from a run (its method and seed, the data it was trained on, each
site's own-model predictions, the metrics ``evaluate`` reported, the per-round log and the
communication totals) is read here, once, so the comparison itself is a pure function over
these records and never touches a file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cmrfed import paths
from cmrfed.atomic import sha256_file
from cmrfed.errors import DataError
from cmrfed.fed.runinfo import load_run

PREDICTION_COLUMNS = ("subject", "client", "model", "split", "label", "probability", "prediction",
                      "threshold")


@dataclass(frozen=True, eq=False)
class ClientPredictions:
    """One site's own model on its own evaluated split, rows sorted by subject id."""

    subjects: tuple[str, ...]
    labels: NDArray[np.int8]
    probabilities: NDArray[np.float64]
    predictions: NDArray[np.int8]
    threshold: float

    @property
    def correct(self) -> NDArray[np.bool_]:
        return self.predictions == self.labels


@dataclass(frozen=True)
class RoundRecord:
    """One line of rounds.jsonl, reduced to what a comparison plots and totals."""

    round: int
    mean_val_balanced_accuracy: float
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]


@dataclass(frozen=True, eq=False)
class RunEvaluation:
    """An evaluated run: configuration, per-site predictions and metrics, rounds, communication.

    ``metrics[client]`` is the ``per_client`` block of metrics.json (NaN where evaluate wrote
    null); ``inputs`` maps each file read to its sha256, for the report's provenance.
    """

    run: Path
    method: str
    seed: int
    manifest_sha256: str
    split: str
    round_choice: str
    round_index: int
    threshold_mode: str
    clients: tuple[str, ...]
    own: dict[str, ClientPredictions]
    metrics: dict[str, dict[str, Any]]
    macro: dict[str, float]
    rounds: tuple[RoundRecord, ...]
    bytes_up_total: int
    bytes_down_total: int
    inputs: dict[str, str]

    @property
    def label(self) -> str:
        """How messages name this run: its folder, method and seed."""
        return f"{self.run} ({self.method}, seed {self.seed})"


def _nan_for_null(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _read_predictions(path: Path, run: Path) -> dict[str, ClientPredictions]:
    """Own-model rows (model == client) of predictions.csv, grouped by client."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = set(PREDICTION_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: missing columns {sorted(missing)}; re-run "
                                f"`cmrfed evaluate {run}`")
            rows = [r for r in reader if r["model"] == r["client"]]
        grouped: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            grouped.setdefault(row["client"], []).append(row)
        own = {}
        for client, client_rows in sorted(grouped.items()):
            client_rows.sort(key=lambda r: r["subject"])
            own[client] = ClientPredictions(
                subjects=tuple(r["subject"] for r in client_rows),
                labels=np.array([int(r["label"]) for r in client_rows], dtype=np.int8),
                probabilities=np.array([float(r["probability"]) for r in client_rows]),
                predictions=np.array([int(r["prediction"]) for r in client_rows], dtype=np.int8),
                threshold=float(client_rows[0]["threshold"]),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable predictions ({exc}); re-run `cmrfed evaluate {run}`") from exc
    return own


def _read_rounds(path: Path) -> tuple[RoundRecord, ...]:
    if not path.exists():
        raise DataError(f"{path}: missing; the run folder is incomplete")
    records = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            raw = json.loads(line)
            records.append(RoundRecord(
                round=int(raw["round"]),
                mean_val_balanced_accuracy=_nan_for_null(raw.get("mean_val_balanced_accuracy")),
                bytes_up={c: int(v["bytes_up"]) for c, v in raw["clients"].items()},
                bytes_down={c: int(v["bytes_down"]) for c, v in raw["clients"].items()},
            ))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a cmrfed rounds log ({exc})") from exc
    return tuple(records)


def load_evaluation(run: str | Path) -> RunEvaluation:
    """Read an evaluated RUN folder; refuse one that ``cmrfed evaluate`` has not processed."""
    info = load_run(run)
    metrics_file, predictions_file = paths.metrics_path(info.path), paths.predictions_path(info.path)
    if not metrics_file.exists() or not predictions_file.exists():
        raise DataError(f"{info.path} ({info.method}, seed {info.seed}) is not evaluated yet; "
                        f"run `cmrfed evaluate {info.path}` first")
    try:
        doc = json.loads(metrics_file.read_text(encoding="utf-8"))
        per_client = {
            client: {key: (_nan_for_null(value) if not isinstance(value, dict) else value)
                     for key, value in block.items()}
            for client, block in doc["per_client"].items()
        }
        # ``macro`` also names the clients it covers (``clients``): only metrics are numbers
        macro = {k: _nan_for_null(v) for k, v in doc["macro"].items() if k != "clients"}
        split, round_choice = str(doc["split"]), str(doc["round"])
        round_index, threshold_mode = int(doc["round_index"]), str(doc["threshold"]["mode"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{metrics_file}: not a cmrfed metrics.json ({exc}); re-run "
                        f"`cmrfed evaluate {info.path}`") from exc
    own = _read_predictions(predictions_file, info.path)
    metrics_only = sorted(c for c, how in doc.get("sources", {}).items() if how == "metrics")
    if metrics_only:
        raise DataError(f"{info.path}: sites {metrics_only} sent metrics only; compare pairs per-subject "
                        "predictions of every site, so it needs their predictions")
    if set(own) != set(per_client):
        raise DataError(f"{info.path}: predictions.csv and metrics.json name different clients "
                        f"({sorted(own)} vs {sorted(per_client)}); re-run `cmrfed evaluate {info.path}`")
    rounds_file = paths.rounds_log_path(info.path)
    result = info.raw["result"]
    return RunEvaluation(
        run=info.path,
        method=info.method,
        seed=info.seed,
        manifest_sha256=info.manifest_sha256,
        split=split,
        round_choice=round_choice,
        round_index=round_index,
        threshold_mode=threshold_mode,
        clients=tuple(sorted(own)),
        own=own,
        metrics=per_client,
        macro=macro,
        rounds=_read_rounds(rounds_file),
        bytes_up_total=int(result.get("bytes_up_total", 0)),
        bytes_down_total=int(result.get("bytes_down_total", 0)),
        inputs={str(f): sha256_file(f) for f in (paths.run_config_path(info.path), metrics_file,
                                                  predictions_file, rounds_file)},
    )
