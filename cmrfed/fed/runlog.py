"""The RUN folder of a federated run, written the same way whichever engine drives the rounds.

The in-process engine and the Flower ServerApp record the same run.json, the same rounds.jsonl
lines and the same tensor files, so ``evaluate`` and ``compare`` cannot tell the engines apart.
Everything here is a plain function of records the engine already holds; no engine logic.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from cmrfed import paths
from cmrfed.atomic import atomic_file, write_json
from cmrfed.errors import UsageError
from cmrfed.eval.metrics import binary_metrics
from cmrfed.fed.accounting import analytic_shared_params
from cmrfed.fed.client import Client
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import HEAD, MethodSpec
from cmrfed.fed.strategy import TensorState
from cmrfed.fed.task import RunModel
from cmrfed.model.classifier import param_group
from cmrfed.provenance import versions

RUN_FORMAT_VERSION = 1
SELECTION_METRIC = "balanced_accuracy"


def start_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing, non-empty RUN folder unless told to replace it."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def val_metrics(client: Client, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """A client's own model on its own validation split (empty when it has none)."""
    if client.val is None or len(client.val) == 0:
        return {}
    probs = client.predict(model, client.val, device)
    return binary_metrics(client.val.labels.numpy(), probs)


def analytic_params_per_message(run_model: RunModel, cfg: FederateConfig) -> int:
    """Scalars one client sends per round, counted from layer shapes (0 when nothing travels)."""
    if not run_model.spec.federated:
        return 0
    model = run_model.model
    head_params = sum(int(p.numel()) for n, p in model.named_parameters() if param_group(n) == HEAD)
    return analytic_shared_params(model, run_model.spec, cfg, run_model.start_block, head_params)


def method_record(spec: MethodSpec) -> dict[str, Any]:
    return {
        "name": spec.name, "summary": spec.summary, "adapters": list(spec.adapters),
        "trained": sorted(spec.trained), "shared": sorted(spec.shared),
        "private": sorted(spec.private), "frozen": sorted(spec.frozen), "adapted": sorted(spec.adapted),
    }


def run_record(
    cfg: FederateConfig,
    spec: MethodSpec,
    *,
    created_by: str,
    data: Mapping[str, Any],
    clients: Mapping[str, Mapping[str, int]],
    backbone: Mapping[str, Any],
    analytic: int,
    device: str,
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run.json of a run before its first round (``result`` is added when it finishes)."""
    record = {
        "format_version": RUN_FORMAT_VERSION,
        "created_by": created_by,
        "config": cfg.to_dict(),
        "method": method_record(spec),
        "data": dict(data),
        "clients": {name: dict(counts) for name, counts in clients.items()},
        "backbone": dict(backbone),
        "communication": {"analytic_params_per_message": analytic},
        "versions": versions(),
        "seed": cfg.seed,
        "device": device,
    }
    if engine is not None:
        record["engine"] = dict(engine)
    return record


def client_round_record(
    train_loss: float, n_train: int, val: Mapping[str, float], bytes_up: int, bytes_down: int,
    params: int,
) -> dict[str, Any]:
    """One client's entry of a rounds.jsonl line."""
    return {
        "train_loss": train_loss, "n_train": n_train, "val": dict(val),
        "bytes_up": bytes_up, "bytes_down": bytes_down, "params_up": params, "params_down": params,
    }


def _mean_val(clients: Mapping[str, Mapping[str, Any]], metric: str) -> float:
    """Mean over clients whose ``metric`` is defined (NaN when it is nowhere). An undefined MCC (a
    model that predicts one class for every subject) counts as 0, chance level, as scikit-learn
    and so CineMA's early stopping count it; otherwise such a round would be ranked by its other
    sites alone."""
    values = [c["val"][metric] for c in clients.values() if metric in c["val"]]
    if metric == "mcc":
        values = [v if np.isfinite(v) else 0.0 for v in values]
    scores = [v for v in values if np.isfinite(v)]
    return float(np.mean(scores)) if scores else float("nan")


def round_record(round_index: int, clients: Mapping[str, Mapping[str, Any]], wall_s: float,
                 select: str = SELECTION_METRIC, participants: list[str] | None = None,
                 failed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A rounds.jsonl line: always the mean val balanced accuracy, plus the mean of the ``select``
    metric the best round is chosen by (``--select``), and which metric that is.

    ``participants``: the sites asked to train this round (every site without
    ``--sites-per-round``); ``failed``: site -> why it did not answer (Flower engine).
    """
    record = {
        "round": round_index,
        "clients": {name: dict(entry) for name, entry in clients.items()},
        "participants": list(participants) if participants is not None else list(clients),
        "failed": dict(failed or {}),
        "mean_val_balanced_accuracy": _mean_val(clients, SELECTION_METRIC),
        "wall_s": wall_s,
    }
    record[f"mean_val_{select}"] = _mean_val(clients, select)
    record["select"] = select
    return record


def selection_score(record: Mapping[str, Any]) -> float:
    """The mean val metric a round is ranked by (balanced accuracy for lines without ``select``)."""
    return float(record[f"mean_val_{record.get('select', SELECTION_METRIC)}"])


def has_score(record: Mapping[str, Any]) -> bool:
    return bool(np.isfinite(selection_score(record)))


def append_round(out: Path, record: Mapping[str, Any]) -> None:
    with paths.rounds_log_path(out).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def save_tensors(path: Path, state: TensorState) -> None:
    """A safetensors file of adapter/head tensors, written atomically."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def write_result(out: Path, completed_rounds: int, best_round: int, best_score: float,
                 bytes_up: int, bytes_down: int, select: str = SELECTION_METRIC) -> None:
    """Add ``result`` to run.json: the mark ``evaluate`` checks for a finished run. The best round's
    mean val balanced accuracy is always there (read from rounds.jsonl when it was selected by
    another metric), with the selected metric's value next to it."""
    run_info = json.loads(paths.run_config_path(out).read_text(encoding="utf-8"))
    best_balanced = best_score
    if select != SELECTION_METRIC:
        log = paths.rounds_log_path(out)
        lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        rows = [json.loads(ln) for ln in lines if ln.strip()]
        best_balanced = next((r["mean_val_balanced_accuracy"] for r in rows if r["round"] == best_round),
                             float("nan"))
    run_info["result"] = {
        "completed_rounds": completed_rounds, "best_round": best_round,
        "best_mean_val_balanced_accuracy": best_balanced,
        "selected_by": select, f"best_mean_val_{select}": best_score,
        "bytes_up_total": bytes_up, "bytes_down_total": bytes_down,
    }
    write_json(paths.run_config_path(out), run_info)


def round_line(record: Mapping[str, Any]) -> str:
    """The one line a round prints."""
    clients = record["clients"].values()
    losses = [c["train_loss"] for c in clients if np.isfinite(c["train_loss"])]  # those that trained
    loss = float(np.mean(losses)) if losses else float("nan")
    up = sum(c["bytes_up"] for c in clients)
    down = sum(c["bytes_down"] for c in clients)
    select = record.get("select", SELECTION_METRIC)
    selected = "" if select == SELECTION_METRIC else f"  val {select} {record[f'mean_val_{select}']:.3f}"
    return (f"round {record['round']:>3}  loss {loss:.4f}  val bal.acc "
            f"{record['mean_val_balanced_accuracy']:.3f}{selected}  up {up / 1024:.1f} KiB  "
            f"down {down / 1024:.1f} KiB  {record['wall_s']:.1f}s")
