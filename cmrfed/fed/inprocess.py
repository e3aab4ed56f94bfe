"""The in-process transport: every site in this process, one model workspace for all of them.

Each round every asked client trains from its current state and sends its shared tensors (as
real safetensors bytes) to the server; the aggregate goes back the same way; every client then
evaluates its own model (backbone + latest shared tensors + its private tensors) on its
validation split. The round loop itself (who is asked, FedAvg, DP ledger, best round,
checkpoint, RUN folder) is :func:`cmrfed.fed.rounds.run_rounds`; this module only moves tensors
between :class:`Client` objects. Because every client lives here, their states (private tensors
included) are saved in the run's checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cmrfed import paths
from cmrfed.data.shards import load_manifest
from cmrfed.fed.client import Client, concat_splits
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.privacy import SitePlan, check_dp_model, privacy_line, run_privacy
from cmrfed.fed.rounds import Exchange, Opening, RunSummary, Site, run_rounds
from cmrfed.fed.runlog import analytic_params_per_message, open_run_folder, save_tensors, val_metrics
from cmrfed.fed.strategy import FitResult, TensorState
from cmrfed.fed.task import build_clients, build_run_model, resolve_device
from cmrfed.fed.views import concat_views
from cmrfed.fed.wire import decode, encode

POOLED = "central"  # the one trainer of a pooled method


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
    console = console or Console()
    cfg = cfg.resolved(resolve_device(device))  # run.json records the precision this device resolved
    with open_run_folder(Path(out), overwrite=overwrite, resume=resume) as folder:
        transport = InProcess(cfg, device, console)
        summary = run_rounds(cfg, folder.work, transport, resume=folder.resume, console=console)
    return replace(summary, out=folder.final)


def _client_key(name: str) -> str:
    return f"client:{name}"


class InProcess:
    """The :class:`~cmrfed.fed.rounds.Transport` whose sites are :class:`Client` objects here."""

    def __init__(self, cfg: FederateConfig, device: str, console: Console) -> None:
        self.cfg, self.console = cfg, console
        self.device = resolve_device(device)
        self.prepared = Path(cfg.data)
        self.manifest = load_manifest(self.prepared)
        self.run_model = build_run_model(cfg, tuple(self.manifest.shape))
        self.model = self.run_model.model.to(self.device)
        self.spec = self.run_model.spec
        self.clients, data = build_clients(cfg, self.prepared, self.manifest, self.run_model, self.device)
        self.trainers = self.clients
        if self.spec.pooled:  # one trainer on every client's train data
            pooled = concat_splits([data[c.name]["train"] for c in self.clients])
            self.trainers = [Client(POOLED, len(self.clients), self.spec, self.run_model.initial_state,
                                    pooled, None, self.clients[0].config, cfg.seed,
                                    views=concat_views([c.views for c in self.clients]))]
        self.best: dict[str, TensorState] = self._private()
        self.analytic = analytic_params_per_message(self.run_model, cfg)

    def open(self, out: Path, resume: bool, extra: Mapping[str, Any]) -> Opening:
        manifest = self.manifest
        return Opening(
            sites=[Site(c.name, len(c.train), len(c.val or [])) for c in self.clients],
            trainers={t.name: len(t.train) for t in self.trainers},
            server=self.clients[0].shared_state(),
            record={
                "created_by": "cmrfed federate",
                "data": {"prepared": str(self.prepared.resolve()), "manifest_sha256": manifest.sha256,
                         "shard_sha256": dict(manifest.shard_sha256)},
                "backbone": {"spec": self.cfg.backbone, "fingerprint": self.run_model.fingerprint,
                             "depth": self.run_model.depth,
                             "first_adapted_block": self.run_model.start_block},
                "analytic": self.analytic, "device": str(self.device),
            },
        )

    def use_privacy(self, plans: Mapping[str, SitePlan]) -> dict[str, SitePlan]:
        """Each trainer takes its plan and, with class balancing, releases its label counts."""
        check_dp_model(self.model, self.spec.name)
        return {t.name: t.use_privacy(plans[t.name]) for t in self.trainers}

    def train(self, round_index: int, asked: list[str], server: TensorState, exchange: Exchange) -> None:
        for trainer in (t for t in self.trainers if self.spec.pooled or t.name in asked):
            result = trainer.fit(self.model, round_index, self.device)
            if trainer.privacy is not None:
                exchange.dp_steps[trainer.name] = trainer.privacy.steps_per_round
            if self.spec.federated:  # what the server gets is what was serialised
                payload = encode(result.shared)
                exchange.up[trainer.name] = len(payload)
                result = FitResult(result.client, decode(payload), result.num_examples, result.train_loss)
            exchange.results.append(result)
        losses = {r.client: r.train_loss for r in exchange.results}
        for client in self.clients:  # a pooled trainer's loss is every client's
            if client.name in losses or POOLED in losses:
                exchange.losses[client.name] = losses.get(client.name, losses.get(POOLED, float("nan")))

    def evaluate(self, round_index: int, server: TensorState, exchange: Exchange) -> None:
        payload = encode(server) if self.spec.federated else None
        for client in self.clients:
            if payload is not None:
                client.set_shared(decode(payload))
                exchange.down[client.name] = len(payload)
            else:
                client.set_shared(server)
            exchange.val[client.name] = val_metrics(client, self.model, self.device)

    def _private(self) -> dict[str, TensorState]:
        return {_client_key(c.name): c.private_state() for c in self.clients}

    def keep_best(self, round_index: int) -> None:
        self.best = self._private()

    def checkpoint(self) -> tuple[dict[str, TensorState], dict[str, TensorState], dict[str, Any]]:
        return {_client_key(c.name): c.state for c in self.clients}, dict(self.best), {}

    def restore(self, last: Mapping[str, TensorState], best: Mapping[str, TensorState]) -> None:
        for client in self.clients:
            client.state = last[_client_key(client.name)]
        if self.spec.pooled:  # the pooled trainer's state is every client's (all of it is shared)
            self.trainers[0].state = {k: v.clone() for k, v in self.clients[0].state.items()}
        self.best = {_client_key(c.name): best[_client_key(c.name)] for c in self.clients}

    def finalize(self, out: Path, final_round: int, best_round: int) -> dict[str, str]:
        """RUN/clients/<c>/private.safetensors, of the final and of the best round."""
        snapshots = {"final": self._private(), "best": self.best}
        for which, snapshot in snapshots.items():
            for client in self.clients:
                save_tensors(paths.private_tensors_path(out, client.name, which),
                             snapshot[_client_key(client.name)])
        return {}

    def report(self, out: Path) -> None:
        """The communication table (bytes actually serialised), and the DP spend."""
        log = paths.rounds_log_path(out).read_text(encoding="utf-8")
        records = [json.loads(line) for line in log.splitlines() if line.strip()]
        table = Table(title="Communication (bytes actually serialised)")
        for column in ("client", "rounds", "params / message", "analytic", "bytes up", "bytes down"):
            table.add_column(column, justify="right" if column != "client" else "left")
        for client in self.clients:
            rows = [r["clients"][client.name] for r in records]
            table.add_row(
                client.name, str(len(rows)), f"{rows[-1]['params_up']:,}" if rows else "0",
                f"{self.analytic:,}", f"{sum(r['bytes_up'] for r in rows):,}",
                f"{sum(r['bytes_down'] for r in rows):,}",
            )
        self.console.print(table)
        if self.cfg.dp_epsilon is not None:
            self.console.print(privacy_line(run_privacy(out)), highlight=False)

