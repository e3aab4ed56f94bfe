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
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run.json of a run before its first round (``result`` is added when it finishes);
    ``privacy`` is the DP plan of every site (cmrfed/fed/privacy.py), absent without DP."""
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
    if privacy is not None:
        record["privacy"] = dict(privacy)
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


def round_record(round_index: int, clients: Mapping[str, Mapping[str, Any]], wall_s: float,
                 participants: list[str] | None = None,
                 failed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A rounds.jsonl line; the mean is over clients whose selection metric is defined.

    ``participants``: the sites asked to train this round (every site without
    ``--sites-per-round``); ``failed``: site -> why it did not answer (Flower engine).
    """
    scores = [c["val"][SELECTION_METRIC] for c in clients.values()
              if SELECTION_METRIC in c["val"] and np.isfinite(c["val"][SELECTION_METRIC])]
    return {
        "round": round_index,
        "clients": {name: dict(entry) for name, entry in clients.items()},
        "participants": list(participants) if participants is not None else list(clients),
        "failed": dict(failed or {}),
        "mean_val_balanced_accuracy": float(np.mean(scores)) if scores else float("nan"),
        "wall_s": wall_s,
    }


def has_score(record: Mapping[str, Any]) -> bool:
    return bool(np.isfinite(record["mean_val_balanced_accuracy"]))


def append_round(out: Path, record: Mapping[str, Any]) -> None:
    with paths.rounds_log_path(out).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def save_tensors(path: Path, state: TensorState) -> None:
    """A safetensors file of adapter/head tensors, written atomically."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def write_result(out: Path, completed_rounds: int, best_round: int, best_score: float,
                 bytes_up: int, bytes_down: int, privacy: Mapping[str, Any] | None = None,
                 stopped: str | None = None) -> None:
    """Add ``result`` to run.json: the mark ``evaluate`` checks for a finished run. ``privacy``:
    what each site spent (DP runs); ``stopped``: why the run ended before its last round."""
    run_info = json.loads(paths.run_config_path(out).read_text(encoding="utf-8"))
    run_info["result"] = {
        "completed_rounds": completed_rounds, "best_round": best_round,
        "best_mean_val_balanced_accuracy": best_score,
        "bytes_up_total": bytes_up, "bytes_down_total": bytes_down,
    }
    if privacy is not None:
        run_info["result"]["privacy"] = dict(privacy)
    if stopped is not None:
        run_info["result"]["stopped"] = stopped
    write_json(paths.run_config_path(out), run_info)


def round_line(record: Mapping[str, Any]) -> str:
    """The one line a round prints."""
    clients = record["clients"].values()
    losses = [c["train_loss"] for c in clients if np.isfinite(c["train_loss"])]  # those that trained
    loss = float(np.mean(losses)) if losses else float("nan")
    up = sum(c["bytes_up"] for c in clients)
    down = sum(c["bytes_down"] for c in clients)
    return (f"round {record['round']:>3}  loss {loss:.4f}  val bal.acc "
            f"{record['mean_val_balanced_accuracy']:.3f}  up {up / 1024:.1f} KiB  "
            f"down {down / 1024:.1f} KiB  {record['wall_s']:.1f}s")
