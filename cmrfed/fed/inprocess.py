"""The in-process federated engine: rounds, checkpoints, communication accounting.

Each round every client trains from its current state and sends its shared tensors (as real
safetensors bytes) to the server; the server averages them weighted by train-set size and sends
the aggregate back; every client then evaluates its own model (backbone + latest shared tensors +
its private tensors) on its validation split. The loop is written once for every method: what
travels is decided by the method table and :meth:`Client.shared_state`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cmrfed import paths
from cmrfed.atomic import atomic_file, json_text, write_json
from cmrfed.data.shards import load_manifest
from cmrfed.errors import DataError, UsageError
from cmrfed.faults import fault_point
from cmrfed.fed.client import Client, concat_splits
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.privacy import (
    check_dp_model,
    plan_run,
    privacy_line,
    privacy_summary,
    recorded_plans,
    round_fits,
    run_privacy_record,
    spent_record,
)
from cmrfed.fed.runlog import (
    analytic_params_per_message,
    append_round,
    client_round_record,
    has_score,
    open_run_folder,
    round_line,
    round_record,
    run_record,
    save_tensors,
    selection_score,
    start_run_folder,
    val_metrics,
    write_result,
)
from cmrfed.fed.sampling import participants
from cmrfed.fed.strategy import FedAvg, FitResult, TensorState
from cmrfed.fed.task import build_clients, build_run_model, resolve_device
from cmrfed.fed.views import concat_views
from cmrfed.fed.wire import decode, encode, num_params


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


CHECKPOINT_FORMAT_VERSION = 2


def _write_checkpoint(run: Path, clients: list[Client], server: TensorState,
                      progress: _Progress, best: dict[str, TensorState]) -> None:
    """Everything needed to continue after this round, in ONE file replaced atomically.

    The file holds two snapshots, ``last`` (every client's whole state and the server's) and
    ``best``, each a mapping owner -> tensors. The owners are listed in the metadata, so an owner
    with no tensors (a client of a method without private tensors, the server of ``local``)
    comes back as an empty entry rather than disappearing.
    """
    last = {f"client:{c.name}": c.state for c in clients}
    last["server"] = server
    parts = {"last": last, "best": best}
    tensors = {f"{part}/{owner}/{key}": tensor.contiguous()
               for part, snapshot in parts.items()
               for owner, state in snapshot.items() for key, tensor in state.items()}
    metadata = {
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
        "progress": json.dumps(asdict(progress)),
        "owners": json.dumps({part: sorted(snapshot) for part, snapshot in parts.items()}),
    }
    with atomic_file(paths.checkpoint_path(run)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        fault_point("federate.checkpoint-write")


def read_checkpoint(run: Path) -> tuple[_Progress, dict[str, TensorState], dict[str, TensorState]]:
    """The progress and the ``last`` and ``best`` snapshots of a run's checkpoint."""
    path = paths.checkpoint_path(run)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if metadata.get("format_version") != str(CHECKPOINT_FORMAT_VERSION):
            raise ValueError(f"checkpoint format {metadata.get('format_version')!r}, "
                             f"expected {CHECKPOINT_FORMAT_VERSION}")
        progress = _Progress(**json.loads(metadata["progress"]))
        parts: dict[str, dict[str, TensorState]] = {
            part: {owner: {} for owner in owners}
            for part, owners in json.loads(metadata["owners"]).items()
        }
        for key, tensor in tensors.items():
            part, owner, name = key.split("/", 2)
            parts[part][owner][name] = tensor
        return progress, parts["last"], parts["best"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise DataError(f"{path}: unreadable checkpoint ({exc}); start the run again without "
                        "--resume (with --overwrite)") from exc


def _snapshot(clients: list[Client], server: TensorState) -> dict[str, TensorState]:
    """What the final artefacts of a round hold: the server's shared tensors and each client's
    private tensors (as :meth:`Client.private_state` decides)."""
    snap = {f"client:{c.name}": c.private_state() for c in clients}
    snap["server"] = {k: v.clone() for k, v in server.items()}
    return snap


def _write_final(run: Path, which: str, snapshot: dict[str, TensorState], clients: list[Client]) -> None:
    """RUN/shared.safetensors and RUN/clients/<c>/private.safetensors (or under RUN/best/)."""
    save_tensors(paths.shared_tensors_path(run, which), snapshot["server"])
    fault_point("federate.final-write")
    for client in clients:
        save_tensors(paths.private_tensors_path(run, client.name, which),
                     snapshot[f"client:{client.name}"])


def _check_resume(cfg: FederateConfig, out: Path) -> None:
    config_file = paths.run_config_path(out)
    if not config_file.exists():
        raise UsageError(f"{out}: no run.json to resume; start the run without --resume")
    recorded = FederateConfig.from_dict(json.loads(config_file.read_text())["config"])
    if recorded != cfg:
        diff = sorted(k for k, v in cfg.to_dict().items() if recorded.to_dict().get(k) != v)
        raise UsageError(f"{out}: --resume with options that differ from the run ({diff})")


def federate(
    cfg: FederateConfig,
    out: Path,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> RunSummary:
    """Run ``cfg.rounds`` federated rounds in this process and write the RUN folder.

    RUN is locked for the whole run; an ``--overwrite`` is built beside RUN and swapped in at the
    end (:func:`cmrfed.fed.runlog.open_run_folder`)."""
    with open_run_folder(Path(out), overwrite=overwrite, resume=resume) as folder:
        summary = _federate_into(cfg, folder.work, device, resume=folder.resume, console=console)
    return replace(summary, out=folder.final)


def _federate_into(
    cfg: FederateConfig,
    out: Path,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> RunSummary:
    """The rounds, written into the work folder ``out`` that :func:`federate` chose."""
    console = console or Console()
    out = Path(out)
    prepared = Path(cfg.data)
    manifest = load_manifest(prepared)
    if resume:
        _check_resume(cfg, out)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --out")
    torch_device = resolve_device(device)

    run_model = build_run_model(cfg, tuple(manifest.shape))
    model = run_model.model.to(torch_device)
    spec = run_model.spec
    clients, data = build_clients(cfg, prepared, manifest, run_model, torch_device)
    trainers = clients
    if spec.pooled:
        pooled = concat_splits([data[c.name]["train"] for c in clients])
        trainers = [Client("central", len(clients), spec, run_model.initial_state, pooled, None,
                           clients[0].config, cfg.seed, views=concat_views([c.views for c in clients]))]
    strategy = FedAvg()
    server: TensorState = clients[0].shared_state()
    analytic = analytic_params_per_message(run_model, cfg)
    if spec.federated and analytic != num_params(server):
        raise AssertionError(f"analytic count {analytic} != shared tensors {num_params(server)}")

    plans = None
    if cfg.dp_epsilon is not None:  # DP-SGD at every trainer; a resumed run keeps its recorded noise
        check_dp_model(model, spec.name)
        recorded = json.loads(paths.run_config_path(out).read_text()) if resume else {}
        plans = recorded_plans(recorded) or plan_run(cfg, {t.name: len(t.train) for t in trainers})
        for trainer in trainers:
            trainer.privacy = plans[trainer.name]
    stopped = None

    progress = _Progress()
    best = _snapshot(clients, server)
    if resume and (paths.checkpoint_dir(out) / "progress.json").exists():
        raise DataError(f"{paths.checkpoint_dir(out)}: a checkpoint of an older cmrfed (format 1) "
                        "that this version cannot continue; start again with --overwrite")
    if resume and paths.checkpoint_path(out).exists():
        progress, last, best = read_checkpoint(out)
        server = last["server"]
        for client in clients:
            client.state = last[f"client:{client.name}"]
        if spec.pooled:  # the pooled trainer's state is every client's (all of it is shared)
            trainers[0].state = {k: v.clone() for k, v in clients[0].state.items()}
    elif not resume:
        start_run_folder(out, overwrite)
        write_json(paths.run_config_path(out), run_record(
            cfg, spec, created_by="cmrfed federate",
            data={"prepared": str(prepared.resolve()), "manifest_sha256": manifest.sha256,
                  "shard_sha256": dict(manifest.shard_sha256)},
            clients={c.name: {"n_train": len(c.train), "n_val": len(c.val or [])} for c in clients},
            backbone={"spec": cfg.backbone, "fingerprint": run_model.fingerprint,
                      "depth": run_model.depth, "first_adapted_block": run_model.start_block},
            analytic=analytic, device=str(torch_device),
            privacy=run_privacy_record(plans) if plans else None,
        ))
    kept = _truncate_rounds_log(out, progress.round)
    total_up = sum(c["bytes_up"] for r in kept for c in r["clients"].values())
    total_down = sum(c["bytes_down"] for r in kept for c in r["clients"].values())

    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{spec.name}: rounds", total=cfg.rounds, completed=progress.round)
        for round_index in range(progress.round + 1, cfg.rounds + 1):
            if plans and not round_fits(plans, round_index):  # stop rather than overspend
                stopped = (f"privacy budget: round {round_index} would take a site past epsilon "
                           f"{cfg.dp_epsilon:g}; the run ends at round {progress.round}")
                console.print(stopped, highlight=False)
                break
            started = time.perf_counter()
            results: list[FitResult] = []
            asked = participants([c.name for c in clients], cfg.sites_per_round, cfg.seed, round_index)
            for trainer in (t for t in trainers if spec.pooled or t.name in asked):
                bar.update(task, description=f"{spec.name}: round {round_index}, {trainer.name}")
                results.append(trainer.fit(model, round_index, torch_device))
            up = dict.fromkeys((c.name for c in clients), 0)
            down = dict.fromkeys((c.name for c in clients), 0)
            if spec.federated:
                received = []
                for result in results:  # what the server gets is what was serialised
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
            entries = {
                client.name: client_round_record(
                    train_loss=losses.get(client.name, losses.get("central", float("nan"))),
                    n_train=len(client.train), val=val_metrics(client, model, torch_device),
                    bytes_up=up[client.name], bytes_down=down[client.name],
                    params=num_params(server) if spec.federated else 0,
                )
                for client in clients
            }
            record = round_record(round_index, entries, time.perf_counter() - started, cfg.select,
                                  participants=asked)
            if plans:  # every site's whole plan counts, asked this round or not (an upper bound)
                record["privacy"] = spent_record(plans, round_index)
            total_up += sum(up.values())
            total_down += sum(down.values())
            progress.round = round_index
            if has_score(record) and selection_score(record) > progress.best_score:
                progress.best_round = round_index
                progress.best_score = selection_score(record)
                best = _snapshot(clients, server)
            append_round(out, record)
            fault_point("federate.round-logged")
            _write_checkpoint(out, clients, server, progress, best)
            bar.update(task, advance=1)
            console.print(round_line(record), highlight=False)

    if progress.best_round == 0:  # no validation data anywhere: the last round is the best we know
        progress.best_round = progress.round
        best = _snapshot(clients, server)
    _write_final(out, "final", _snapshot(clients, server), clients)
    _write_final(out, "best", best, clients)
    write_result(out, progress.round, progress.best_round, progress.best_score, total_up, total_down,
                 cfg.select, privacy=spent_record(plans, progress.round) if plans else None,
                 stopped=stopped)
    _print_communication(console, out, clients, analytic)
    if plans:
        console.print(privacy_line(privacy_summary(json.loads(paths.run_config_path(out).read_text()))),
                      highlight=False)
    return RunSummary(out, progress.round, progress.best_round, progress.best_score, total_up,
                      total_down)


def _truncate_rounds_log(out: Path, completed: int) -> list[dict[str, Any]]:
    """Keep the rounds.jsonl lines of completed (checkpointed) rounds; drop any later ones."""
    log = paths.rounds_log_path(out)
    records = []
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill: its round was never checkpointed
            continue
        if record["round"] <= completed:
            records.append(record)
    with atomic_file(log) as tmp:
        tmp.write_text("".join(json_text(r) + "\n" for r in records), encoding="utf-8")
    return records


def _print_communication(console: Console, out: Path, clients: list[Client], analytic: int) -> None:
    log = paths.rounds_log_path(out)
    records = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
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
