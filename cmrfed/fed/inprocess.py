"""The in-process federated engine: rounds, checkpoints, communication accounting.

Each round every client trains from its current state and sends its shared tensors (as real
safetensors bytes) to the server; the server averages them weighted by train-set size and sends
the aggregate back; every client then evaluates its own model (backbone + latest shared tensors +
its private tensors) on its validation split. The loop is written once for every method: what
travels is decided by the method table and :meth:`Client.shared_state`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import load_file, save_file

from cmrfed import paths
from cmrfed.atomic import atomic_dir, atomic_file, write_json
from cmrfed.data.shards import load_manifest
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.metrics import binary_metrics
from cmrfed.fed.accounting import analytic_shared_params
from cmrfed.fed.client import Client, concat_splits
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import HEAD
from cmrfed.fed.strategy import FedAvg, FitResult, TensorState
from cmrfed.fed.task import build_clients, build_run_model, resolve_device
from cmrfed.fed.wire import decode, encode, num_params
from cmrfed.model.classifier import param_group
from cmrfed.provenance import versions

RUN_FORMAT_VERSION = 1
SELECTION_METRIC = "balanced_accuracy"


@dataclass(frozen=True)
class RunSummary:
    """What ``federate`` returns (and prints)."""

    out: Path
    rounds: int
    best_round: int
    best_score: float
    bytes_up: int
    bytes_down: int


@dataclass
class _Progress:
    """What a checkpoint restores: the last completed round and the best one so far."""

    round: int = 0
    best_round: int = 0
    best_score: float = float("-inf")


def _val_metrics(client: Client, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    if client.val is None or len(client.val) == 0:
        return {}
    probs = client.predict(model, client.val, device)
    return binary_metrics(client.val.labels.numpy(), probs)


def _prefixed(states: dict[str, TensorState]) -> TensorState:
    return {f"{owner}/{key}": t for owner, state in states.items() for key, t in state.items()}


def _unprefixed(flat: TensorState) -> dict[str, TensorState]:
    out: dict[str, TensorState] = {}
    for key, tensor in flat.items():
        owner, name = key.split("/", 1)
        out.setdefault(owner, {})[name] = tensor
    return out


def _save_states(path: Path, states: dict[str, TensorState]) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in _prefixed(states).items()}, str(tmp))


def _write_checkpoint(run: Path, clients: list[Client], server: TensorState,
                      progress: _Progress, best: dict[str, TensorState]) -> None:
    """Everything needed to continue after this round, replaced atomically as one folder."""
    with atomic_dir(paths.checkpoint_dir(run), overwrite=True) as tmp:
        states = {f"client:{c.name}": c.state for c in clients}
        states["server"] = server
        _save_states(tmp / "last.safetensors", states)
        _save_states(tmp / "best.safetensors", best)
        write_json(tmp / "progress.json", {
            "round": progress.round, "best_round": progress.best_round,
            "best_score": progress.best_score,
        })


def _read_checkpoint(run: Path) -> tuple[_Progress, dict[str, TensorState], dict[str, TensorState]]:
    folder = paths.checkpoint_dir(run)
    try:
        raw = json.loads((folder / "progress.json").read_text())
        last = _unprefixed(load_file(str(folder / "last.safetensors")))
        best = _unprefixed(load_file(str(folder / "best.safetensors")))
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: unreadable checkpoint ({exc}); start again without --resume") from exc
    progress = _Progress(raw["round"], raw["best_round"], raw["best_score"])
    return progress, last, best


def _snapshot(clients: list[Client], server: TensorState) -> dict[str, TensorState]:
    snap = {f"client:{c.name}": {k: v.clone() for k, v in c.state.items()} for c in clients}
    snap["server"] = {k: v.clone() for k, v in server.items()}
    return snap


def _write_final(run: Path, which: str, snapshot: dict[str, TensorState], clients: list[Client]) -> None:
    """RUN/shared.safetensors and RUN/clients/<c>/private.safetensors (or under RUN/best/)."""
    server = snapshot["server"]
    with atomic_file(paths.shared_tensors_path(run, which)) as tmp:
        save_file({k: v.contiguous() for k, v in server.items()}, str(tmp))
    for client in clients:
        state = snapshot[f"client:{client.name}"]
        private = {k: v.contiguous() for k, v in state.items()
                   if param_group(k) in client.spec.private}
        with atomic_file(paths.private_tensors_path(run, client.name, which)) as tmp:
            save_file(private, str(tmp))


def _check_run_folder(cfg: FederateConfig, out: Path, resume: bool, overwrite: bool) -> None:
    config_file = paths.run_config_path(out)
    if resume:
        if not config_file.exists():
            raise UsageError(f"{out}: no run.json to resume; start the run without --resume")
        recorded = FederateConfig.from_dict(json.loads(config_file.read_text())["config"])
        if recorded != cfg:
            diff = sorted(k for k, v in cfg.to_dict().items() if recorded.to_dict().get(k) != v)
            raise UsageError(f"{out}: --resume with options that differ from the run ({diff})")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} already exists; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --out")
        shutil.rmtree(out)


def _round_line(record: dict[str, Any]) -> str:
    mean_bacc = record["mean_val_balanced_accuracy"]
    loss = np.mean([c["train_loss"] for c in record["clients"].values()])
    up = sum(c["bytes_up"] for c in record["clients"].values())
    down = sum(c["bytes_down"] for c in record["clients"].values())
    return (f"round {record['round']:>3}  loss {loss:.4f}  val bal.acc {mean_bacc:.3f}  "
            f"up {up / 1024:.1f} KiB  down {down / 1024:.1f} KiB  {record['wall_s']:.1f}s")


def federate(
    cfg: FederateConfig,
    out: Path,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> RunSummary:
    """Run ``cfg.rounds`` federated rounds in this process and write the RUN folder."""
    console = console or Console()
    out = Path(out)
    prepared = Path(cfg.data)
    manifest = load_manifest(prepared)
    _check_run_folder(cfg, out, resume, overwrite)
    torch_device = resolve_device(device)
    torch.manual_seed(cfg.seed)  # nothing should draw from it; pinned in case a library does

    run_model = build_run_model(cfg, tuple(manifest.shape))
    model = run_model.model.to(torch_device)
    spec = run_model.spec
    clients, data = build_clients(cfg, prepared, manifest, run_model, torch_device)
    trainers = clients
    if spec.pooled:
        pooled = concat_splits([data[c.name]["train"] for c in clients])
        trainers = [Client("central", len(clients), spec, run_model.initial_state, pooled, None,
                           clients[0].config, cfg.seed)]
    strategy = FedAvg()
    server: TensorState = clients[0].shared_state()

    head_params = sum(int(p.numel()) for n, p in model.named_parameters() if param_group(n) == HEAD)
    analytic = analytic_shared_params(model, spec, cfg, run_model.start_block, head_params)
    if spec.federated and analytic != num_params(server):
        raise AssertionError(f"analytic count {analytic} != shared tensors {num_params(server)}")

    progress = _Progress()
    best = _snapshot(clients, server)
    if resume and paths.checkpoint_dir(out).exists():
        progress, last, best = _read_checkpoint(out)
        server = last["server"]
        for client in clients:
            client.state = last[f"client:{client.name}"]
        for trainer in trainers:
            if trainer not in clients:
                trainer.state = {k: v.clone() for k, v in clients[0].state.items()}
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(paths.run_config_path(out), {
            "format_version": RUN_FORMAT_VERSION,
            "created_by": "cmrfed federate",
            "config": cfg.to_dict(),
            "method": {
                "name": spec.name, "summary": spec.summary, "adapters": list(spec.adapters),
                "trained": sorted(spec.trained), "shared": sorted(spec.shared),
                "private": sorted(spec.private), "frozen": sorted(spec.frozen),
            },
            "data": {"prepared": str(prepared.resolve()), "manifest_sha256": manifest.sha256,
                     "shard_sha256": dict(manifest.shard_sha256)},
            "clients": {c.name: {"n_train": len(c.train), "n_val": len(c.val or [])} for c in clients},
            "backbone": {"spec": cfg.backbone, "fingerprint": run_model.fingerprint,
                         "depth": run_model.depth, "first_adapted_block": run_model.start_block},
            "communication": {"analytic_params_per_message": analytic if spec.federated else 0},
            "versions": versions(),
            "seed": cfg.seed,
            "device": str(torch_device),
        })

    rounds_log = paths.rounds_log_path(out)
    kept = []
    if rounds_log.exists():
        kept = [ln for ln in rounds_log.read_text().splitlines()
                if ln.strip() and json.loads(ln)["round"] <= progress.round]
    with atomic_file(rounds_log) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept))

    total_up = sum(sum(c["bytes_up"] for c in json.loads(ln)["clients"].values()) for ln in kept)
    total_down = sum(sum(c["bytes_down"] for c in json.loads(ln)["clients"].values()) for ln in kept)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{spec.name}: rounds", total=cfg.rounds, completed=progress.round)
        for round_index in range(progress.round + 1, cfg.rounds + 1):
            started = time.perf_counter()
            record: dict[str, Any] = {"round": round_index, "clients": {}}
            results: list[FitResult] = []
            for trainer in trainers:
                bar.update(task, description=f"{spec.name}: round {round_index}, {trainer.name}")
                results.append(trainer.fit(model, round_index, torch_device))
            up: dict[str, int] = dict.fromkeys((c.name for c in clients), 0)
            down: dict[str, int] = dict.fromkeys((c.name for c in clients), 0)
            if spec.federated:
                received = []
                for result in results:
                    payload = encode(result.shared)
                    up[result.client] = len(payload)
                    received.append(FitResult(result.client, decode(payload), result.num_examples,
                                              result.train_loss))
                server = strategy.aggregate(received)
                payload_down = encode(server)
                for client in clients:
                    client.set_shared(decode(payload_down))
                    down[client.name] = len(payload_down)
            elif spec.pooled:
                server = results[0].shared
                for client in clients:
                    client.set_shared(server)
            losses = {r.client: r.train_loss for r in results}
            scores = []
            for client in clients:
                metrics = _val_metrics(client, model, torch_device)
                if SELECTION_METRIC in metrics and np.isfinite(metrics[SELECTION_METRIC]):
                    scores.append(metrics[SELECTION_METRIC])
                n_shared = num_params(client.shared_state()) if spec.federated else 0
                record["clients"][client.name] = {
                    "train_loss": losses.get(client.name, losses.get("central", float("nan"))),
                    "n_train": len(client.train),
                    "val": metrics,
                    "bytes_up": up[client.name],
                    "bytes_down": down[client.name],
                    "params_up": n_shared,
                    "params_down": n_shared,
                }
            record["mean_val_balanced_accuracy"] = float(np.mean(scores)) if scores else float("nan")
            record["wall_s"] = time.perf_counter() - started
            total_up += sum(up.values())
            total_down += sum(down.values())

            progress.round = round_index
            if scores and record["mean_val_balanced_accuracy"] > progress.best_score:
                progress.best_round = round_index
                progress.best_score = record["mean_val_balanced_accuracy"]
                best = _snapshot(clients, server)
            with rounds_log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            _write_checkpoint(out, clients, server, progress, best)
            bar.update(task, advance=1)
            console.print(_round_line(record), highlight=False)

    if progress.best_round == 0:  # no validation data anywhere: the last round is the best we know
        progress.best_round = progress.round
        best = _snapshot(clients, server)
    _write_final(out, "final", _snapshot(clients, server), clients)
    _write_final(out, "best", best, clients)
    run_info = json.loads(paths.run_config_path(out).read_text())
    run_info["result"] = {
        "completed_rounds": progress.round, "best_round": progress.best_round,
        "best_mean_val_balanced_accuracy": progress.best_score,
        "bytes_up_total": total_up, "bytes_down_total": total_down,
    }
    write_json(paths.run_config_path(out), run_info)
    _print_communication(console, rounds_log, clients, analytic if spec.federated else 0)
    return RunSummary(out, progress.round, progress.best_round, progress.best_score, total_up, total_down)


def _print_communication(console: Console, rounds_log: Path, clients: list[Client], analytic: int) -> None:
    records = [json.loads(ln) for ln in rounds_log.read_text().splitlines() if ln.strip()]
    table = Table(title="Communication (bytes actually serialised)")
    for column in ("client", "rounds", "params / message", "analytic", "bytes up", "bytes down"):
        table.add_column(column, justify="right" if column != "client" else "left")
    for client in clients:
        rows = [r["clients"][client.name] for r in records]
        table.add_row(
            client.name, str(len(rows)), f"{rows[-1]['params_up']:,}" if rows else "0",
            f"{analytic:,}", f"{sum(r['bytes_up'] for r in rows):,}",
            f"{sum(r['bytes_down'] for r in rows):,}",
        )
    console.print(table)
