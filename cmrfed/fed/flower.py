"""The Flower engine: the same Client, FedAvg and task code as the in-process engine, with Flower
(Message API) as the transport between hospitals.

Every site runs a SuperNode next to its own data; its node config names only its client and its
PREPARED folder (plus a site folder for its private tensors). The ServerApp, next to the
SuperLink, never sees an image or a private adapter: each round

1. ``train``: the server asks every site to train; a site replies with the tensors of
   :meth:`Client.shared_state` (an ArrayRecord) and its number of train examples;
2. the server averages them with :class:`FedAvg`, exactly as the in-process engine does;
3. ``evaluate``: the server sends the aggregate; a site loads it (:meth:`Client.set_shared`),
   scores its validation split and replies with metrics only.

With its first train reply each site says who it is (client name, counts, backbone fingerprint)
so the server can refuse sites that would not train the same model; after the rounds,
``query.finalize`` tells each site which round was best so it writes its private tensors, as
the in-process engine does, into its own site folder. A site's full state (shared and private
tensors) lives in its Flower ``context.state``, which stays in its SuperNode.

The server writes the same RUN folder as ``cmrfed federate`` (run.json, rounds.jsonl with the
bytes of the ArrayRecords Flower actually carried, shared.safetensors) plus RUN/wire.jsonl: the
keys and bytes of every tensor record it sent or received, so a reviewer can check that no
private tensor ever reached it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from cmrfed import paths
from cmrfed.atomic import write_json
from cmrfed.data.shards import Manifest, load_manifest, verify_shard
from cmrfed.errors import DataError, UsageError
from cmrfed.fed.client import Client
from cmrfed.fed.config import FederateConfig, parse_blocks
from cmrfed.fed.inprocess import RunSummary
from cmrfed.fed.methods import MethodSpec, resolve_method
from cmrfed.fed.runlog import (
    analytic_params_per_message,
    append_round,
    client_round_record,
    has_score,
    round_line,
    round_record,
    run_record,
    save_tensors,
    start_run_folder,
    val_metrics,
    write_result,
)
from cmrfed.fed.strategy import FedAvg, FitResult, TensorState
from cmrfed.fed.task import RunModel, build_client, build_run_model, resolve_device
from cmrfed.fed.wire import num_params
from cmrfed.model.classifier import param_group

# Message types as Flower routes them ("<category>" or "<category>.<action>").
TRAIN = "train"
EVALUATE = "evaluate"
FINALIZE = "query.finalize"

# Record names inside a message's RecordDict, and inside a site's context.state.
SHARED = "shared"  # ArrayRecord: shared tensors, the only tensors that travel
ROUND = "round"  # ConfigRecord: round index, or final and best round
SITE = "site"  # ConfigRecord: what a site says about itself
METRICS = "metrics"  # MetricRecord: train loss and example count, or validation metrics
STATE = "cmrfed.state"  # context.state ArrayRecord: the site's full state, never sent
SNAPSHOT = "cmrfed.private.round{}"  # context.state ArrayRecord: private tensors after a round

# Node config keys of a SuperNode (one per site) and run config keys beyond FederateConfig's.
NODE_CLIENT, NODE_PREPARED, NODE_SITE_DIR, NODE_DEVICE = "client", "prepared", "site-dir", "device"
RUN_OUT, RUN_SITES, RUN_NAME, RUN_OVERWRITE, RUN_TIMEOUT = (
    "out", "sites", "run-name", "overwrite", "node-timeout-s")

REPLY_POLL_S = 0.5


# --- configuration: run config (from the server) and node config (each site's own) -----------------
def run_config_of(cfg: FederateConfig, out: Path, sites: int, overwrite: bool = False,
                  node_timeout_s: float = 600.0) -> dict[str, str | int | float | bool]:
    """A Flower run config (flat TOML scalars) carrying the full FederateConfig and the server's
    options; both apps rebuild the same FederateConfig from it with :func:`federate_config_of`."""
    if sites < 1:
        raise UsageError(f"--sites must be at least 1, got {sites}")
    if cfg.dp_epsilon is not None:
        raise UsageError("--dp-epsilon runs with `cmrfed federate` (the in-process engine) only: "
                         "the Flower engine does not yet record or enforce each site's budget")
    flat: dict[str, str | int | float | bool] = {}
    for key, value in cfg.to_dict().items():
        if value is None:  # TOML has no null: an absent key means the dataclass default
            continue
        if key == "targets":
            value = ",".join(value)
        elif key == "blocks":
            value = str(value)
        flat[key] = value
    out = Path(out).expanduser().resolve()
    flat.update({RUN_OUT: str(out), RUN_SITES: int(sites), RUN_NAME: out.name,
                 RUN_OVERWRITE: bool(overwrite), RUN_TIMEOUT: float(node_timeout_s)})
    return flat


def federate_config_of(run_config: Mapping[str, Any]) -> FederateConfig:
    raw = dict(run_config)
    if "blocks" in raw:
        raw["blocks"] = parse_blocks(str(raw["blocks"]))
    if "targets" in raw:
        raw["targets"] = tuple(t for t in str(raw["targets"]).split(",") if t)
    raw.setdefault("data", "")
    return FederateConfig.from_dict(raw)


@dataclass(frozen=True)
class ServerOptions:
    """What the ServerApp needs beyond the FederateConfig."""

    out: Path
    sites: int
    run_name: str
    overwrite: bool
    node_timeout_s: float

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> ServerOptions:
        missing = [k for k in (RUN_OUT, RUN_SITES) if k not in run_config]
        if missing:
            raise UsageError(f"the Flower run config lacks {missing}; start runs with `cmrfed flower run`")
        out = Path(str(run_config[RUN_OUT]))
        return cls(out=out, sites=int(run_config[RUN_SITES]),
                   run_name=str(run_config.get(RUN_NAME, out.name)),
                   overwrite=bool(run_config.get(RUN_OVERWRITE, False)),
                   node_timeout_s=float(run_config.get(RUN_TIMEOUT, 600.0)))


@dataclass(frozen=True)
class SiteConfig:
    """A SuperNode's node config: which client it is, where its data and its private files are."""

    client: str
    prepared: Path
    site_dir: Path
    device: str = "auto"

    @classmethod
    def of(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        missing = [k for k in (NODE_CLIENT, NODE_PREPARED, NODE_SITE_DIR) if k not in node_config]
        if missing:
            raise UsageError(
                f"this SuperNode's --node-config lacks {missing}; start it with the line "
                "`cmrfed flower site-config` prints for this site"
            )
        return cls(client=str(node_config[NODE_CLIENT]), prepared=Path(str(node_config[NODE_PREPARED])),
                   site_dir=Path(str(node_config[NODE_SITE_DIR])),
                   device=str(node_config.get(NODE_DEVICE, "auto")))

    def node_config(self) -> str:
        """The ``--node-config`` argument of ``flower-supernode`` for this site."""
        values = {NODE_CLIENT: self.client, NODE_PREPARED: str(self.prepared),
                  NODE_SITE_DIR: str(self.site_dir), NODE_DEVICE: self.device}
        for key, value in values.items():
            if '"' in value or "'" in value:
                raise UsageError(f"{key} {value!r}: quotes cannot pass through Flower's --node-config")
        return " ".join(f'{key}="{value}"' for key, value in values.items())


def site_node_config(client: str, prepared: Path, site_dir: Path, device: str = "auto") -> str:
    """Check that ``prepared`` holds ``client``'s shard, intact, and return the site's node config."""
    prepared = Path(prepared).expanduser().resolve()
    manifest = load_manifest(prepared)
    if client not in manifest.clients:
        raise UsageError(f"--client {client!r} is not in {paths.manifest_path(prepared)}; "
                         f"choose one of {', '.join(manifest.clients)}")
    verify_shard(prepared, manifest, client)
    return SiteConfig(client, prepared, Path(site_dir).expanduser().resolve(), device).node_config()


# --- the site: a ClientApp over the same Client as the in-process engine ------------------------
def to_record(state: TensorState) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict(dict(state))


def to_state(record: ArrayRecord) -> TensorState:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


@dataclass
class _Site:
    """A site's model workspace and its Client, rebuilt for each message from the run seed and
    the site's context.state (Flower starts a fresh ClientApp process per message)."""

    config: SiteConfig
    cfg: FederateConfig
    manifest: Manifest
    run_model: RunModel
    client: Client
    device: torch.device


def _open_site(context: Context) -> _Site:
    site = SiteConfig.of(context.node_config)
    cfg = replace(federate_config_of(context.run_config), data=str(site.prepared))
    manifest = load_manifest(site.prepared)
    if site.client not in manifest.clients:
        raise DataError(f"node config client {site.client!r} is not in {paths.manifest_path(site.prepared)}"
                        f" (it has {', '.join(manifest.clients)})")
    device = resolve_device(site.device)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    run_model.model.to(device)
    client, _ = build_client(cfg, site.prepared, manifest, site.client, run_model, device,
                             splits=("train", "val"))
    if STATE in context.state.array_records:
        client.state = to_state(context.state.array_records[STATE])
    return _Site(site, cfg, manifest, run_model, client, device)


def _keep(context: Context, client: Client) -> None:
    context.state[STATE] = to_record(client.state)


client_app = ClientApp()


def _identity(site: _Site) -> ConfigRecord:
    """Who a site is: its name, counts and model identity (no data), so the server can refuse
    sites that would not train the same model and record the run like the in-process engine."""
    return ConfigRecord({
        "client": site.client.name,
        "index": site.client.index,
        "n_train": len(site.client.train),
        "n_val": len(site.client.val or []),
        "fingerprint": site.run_model.fingerprint,
        "depth": site.run_model.depth,
        "start_block": site.run_model.start_block,
        "analytic_params": analytic_params_per_message(site.run_model, site.cfg),
        "manifest_sha256": site.manifest.sha256,
        "shard_sha256": site.manifest.shard_sha256[site.client.name],
        "device": str(site.device),
    })


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training; the reply carries :meth:`Client.shared_state`, the train loss and example
    count, and the site's identity: nothing else."""
    site = _open_site(context)
    round_index = int(message.content.config_records[ROUND]["round"])
    if round_index == 1:
        verify_shard(site.config.prepared, site.manifest, site.client.name)
    result = site.client.fit(site.run_model.model, round_index, site.device)
    _keep(context, site.client)
    metrics = MetricRecord({"num_examples": result.num_examples, "train_loss": result.train_loss})
    content = RecordDict({SHARED: to_record(result.shared), METRICS: metrics, SITE: _identity(site)})
    return Message(content, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Take the aggregate, score the site's own model on its validation split, keep a snapshot."""
    site = _open_site(context)
    round_index = int(message.content.config_records[ROUND]["round"])
    site.client.set_shared(to_state(message.content.array_records[SHARED]))
    metrics = val_metrics(site.client, site.run_model.model, site.device)
    _keep(context, site.client)
    context.state[SNAPSHOT.format(round_index)] = to_record(site.client.private_state())
    return Message(RecordDict({METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})}),
                   reply_to=message)


@client_app.query("finalize")
def finalize(message: Message, context: Context) -> Message:
    """Write the private tensors of the final and the best round into this site's own folder."""
    site = SiteConfig.of(context.node_config)
    rounds = message.content.config_records[ROUND]
    site_run = paths.site_run_dir(site.site_dir, str(rounds["run_name"]))
    for which in ("final", "best"):
        snapshot = SNAPSHOT.format(int(rounds[f"{which}_round"]))
        if snapshot not in context.state.array_records:
            raise DataError(f"site {site.client!r} has no private state of round {rounds[f'{which}_round']};"
                            " was its SuperNode restarted during the run?")
        state = to_state(context.state.array_records[snapshot])
        save_tensors(paths.private_tensors_path(site_run, site.client, which), state)
    return Message(RecordDict(), reply_to=message)


# --- the server: a ServerApp over the same FedAvg and RUN folder as the in-process engine --------
def check_shared_keys(keys: list[str], spec: MethodSpec, client: str) -> None:
    """Refuse a reply carrying any tensor outside the method's shared groups (a private adapter,
    the backbone): the server must never hold one, so it stops the run instead."""
    foreign = sorted(k for k in keys if param_group(k) not in spec.shared)
    if foreign:
        raise DataError(f"site {client!r} sent tensors outside the shared groups of {spec.name} "
                        f"({foreign[:5]}); stopping the run")


@dataclass(frozen=True)
class SiteInfo:
    node_id: int
    client: str
    index: int
    info: dict[str, Any]


class WireLog:
    """RUN/wire.jsonl: every tensor record the server sent or received, by key and size."""

    def __init__(self, out: Path) -> None:
        self.path = paths.wire_log_path(out)
        self.path.write_text("", encoding="utf-8")

    def log(self, round_index: int, client: str, direction: str, message_type: str,
            record: ArrayRecord) -> int:
        size = record.count_bytes()
        entry = {"round": round_index, "client": client, "direction": direction,
                 "message_type": message_type, "keys": sorted(record.keys()), "bytes": size}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        return size


def _wait_for_nodes(grid: Grid, sites: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < sites:
        if time.monotonic() > deadline:
            raise DataError(f"only {len(nodes)} of {sites} sites' SuperNodes connected within {timeout_s:.0f}"
                            " s; start one `flower-supernode` per site (see `cmrfed flower site-config`)")
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) > sites:
        raise UsageError(f"{len(nodes)} SuperNodes are connected but --sites is {sites}; stop the extra "
                         "ones or pass the right --sites")
    return nodes


def _exchange(grid: Grid, node_ids: Mapping[int, str], message_type: str, round_index: int,
              content: RecordDict, timeout_s: float) -> dict[int, Message]:
    """Send ``content`` to every node and collect every reply, or stop naming the sites that failed."""
    messages = [Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_index))
                for node in node_ids]
    pending = set(grid.push_messages(messages))
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:  # Grid.send_and_receive polls every 3 s
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies[reply.metadata.src_node_id] = reply
        if pending:
            time.sleep(REPLY_POLL_S)
    silent = [node_ids[n] for n in node_ids if n not in replies]
    if silent:
        raise DataError(f"no {message_type} reply within {timeout_s:.0f} s from {silent}")
    for node, reply in replies.items():
        if reply.has_error():
            raise DataError(f"site {node_ids[node]} failed {message_type} in round {round_index}: "
                            f"{reply.error.reason}")
    return replies


def _identify(replies: Mapping[int, Message]) -> list[SiteInfo]:
    """The sites behind the nodes, in manifest order, once they agree on the model."""
    sites = []
    for node, reply in replies.items():
        info = dict(reply.content.config_records[SITE])
        sites.append(SiteInfo(node, str(info["client"]), int(info["index"]), info))
    names = [s.client for s in sites]
    if len(set(names)) != len(names):
        raise UsageError(f"two SuperNodes claim the same client ({sorted(names)}); give each site its own")
    for key in ("fingerprint", "depth", "start_block", "analytic_params"):
        values = {s.client: s.info[key] for s in sites}
        if len(set(values.values())) != 1:
            raise DataError(f"sites disagree on the model ({key}: {values}); every site needs the same "
                            "backbone, input shape and cmrfed version")
    return sorted(sites, key=lambda s: (s.index, s.client))


def _run_json(cfg: FederateConfig, spec: MethodSpec, sites: list[SiteInfo]) -> dict[str, Any]:
    first = sites[0].info
    manifests = {s.info["manifest_sha256"] for s in sites}
    try:
        flwr_version = metadata.version("flwr")
    except metadata.PackageNotFoundError:  # pragma: no cover - the ServerApp runs under Flower
        flwr_version = "unknown"
    return run_record(
        cfg, spec,
        created_by="cmrfed flower run",
        data={"prepared": cfg.data, "manifest_sha256": manifests.pop() if len(manifests) == 1 else None,
              "shard_sha256": {s.client: s.info["shard_sha256"] for s in sites}},
        clients={s.client: {"n_train": int(s.info["n_train"]), "n_val": int(s.info["n_val"])} for s in sites},
        backbone={"spec": cfg.backbone, "fingerprint": first["fingerprint"], "depth": int(first["depth"]),
                  "first_adapted_block": int(first["start_block"])},
        analytic=int(first["analytic_params"]),
        device=",".join(sorted({str(s.info["device"]) for s in sites})),
        engine={"name": "flower", "flwr": flwr_version,
                "sites": {s.client: {"node_id": str(s.node_id), "device": s.info["device"]} for s in sites}},
    )


class _Server:
    """One Flower run seen from the server: the sites, the wire log and the RUN folder."""

    def __init__(self, grid: Grid, cfg: FederateConfig, options: ServerOptions, console: Console) -> None:
        self.grid, self.cfg, self.options, self.console = grid, cfg, options, console
        self.spec = resolve_method(cfg.method, cfg.head)
        self.out = options.out
        self.wire = WireLog(self.out)
        nodes = _wait_for_nodes(grid, options.sites, options.node_timeout_s)
        self.names = {node: f"node {node}" for node in nodes}  # until the sites say who they are
        self.sites: list[SiteInfo] = []

    def exchange(self, message_type: str, round_index: int, content: RecordDict) -> dict[int, Message]:
        return _exchange(self.grid, self.names, message_type, round_index, content,
                         self.options.node_timeout_s)

    def _meet(self, replies: Mapping[int, Message]) -> None:
        """After the first train replies: who the sites are; run.json, as the in-process engine."""
        self.sites = _identify(replies)
        self.names = {s.node_id: s.client for s in self.sites}
        write_json(paths.run_config_path(self.out), _run_json(self.cfg, self.spec, self.sites))
        self.console.print(f"{self.spec.name}: {len(self.sites)} sites ({', '.join(self.names.values())}),"
                           f" {self.cfg.rounds} rounds", highlight=False)

    def train(self, round_index: int) -> tuple[list[FitResult], dict[str, int]]:
        """Every site's shared tensors after local training, checked, and the bytes they took."""
        replies = self.exchange(TRAIN, round_index, RecordDict({ROUND: ConfigRecord({"round": round_index})}))
        if round_index == 1:
            self._meet(replies)
        results, up = [], {}
        for site in self.sites:
            content = replies[site.node_id].content
            if content.config_records[SITE]["client"] != site.client:
                raise DataError(f"node {site.node_id} was {site.client!r} and now says "
                                f"{content.config_records[SITE]['client']!r}; restart the run")
            record = content.array_records[SHARED]
            up[site.client] = self.wire.log(round_index, site.client, "up", TRAIN, record)
            check_shared_keys(list(record.keys()), self.spec, site.client)
            fit = content.metric_records[METRICS]
            results.append(FitResult(site.client, to_state(record), int(fit["num_examples"]),
                                     float(fit["train_loss"])))
        return results, up

    def evaluate(self, round_index: int, server: TensorState) -> tuple[dict[str, dict], dict[str, int]]:
        """Send the aggregate; every site's validation metrics and the bytes it took."""
        aggregate = to_record(server)
        content = RecordDict({SHARED: aggregate, ROUND: ConfigRecord({"round": round_index})})
        replies = self.exchange(EVALUATE, round_index, content)
        down = {s.client: self.wire.log(round_index, s.client, "down", EVALUATE, aggregate)
                for s in self.sites}
        val = {s.client: dict(replies[s.node_id].content.metric_records[METRICS]) for s in self.sites}
        return val, down

    def finalize(self, best_round: int) -> None:
        """Tell every site which rounds to write its private tensors of."""
        rounds = ConfigRecord({"final_round": self.cfg.rounds, "best_round": best_round,
                               "run_name": self.options.run_name})
        self.exchange(FINALIZE, self.cfg.rounds, RecordDict({ROUND: rounds}))


def serve(grid: Grid, run_config: Mapping[str, Any], console: Console | None = None) -> RunSummary:
    """The server side of a Flower run: rounds of train / FedAvg / evaluate, the RUN folder."""
    console = console or Console()
    cfg = federate_config_of(run_config)
    options = ServerOptions.of(run_config)
    if not resolve_method(cfg.method, cfg.head).federated:
        raise UsageError(f"--method {cfg.method} sends nothing to a server; run it with `cmrfed federate`")
    out = options.out
    start_run_folder(out, options.overwrite)
    paths.rounds_log_path(out).write_text("", encoding="utf-8")
    run = _Server(grid, cfg, options, console)
    strategy = FedAvg()

    server: TensorState = {}
    best_round, best_score, best_server = 0, float("-inf"), server
    total_up = total_down = 0
    for round_index in range(1, cfg.rounds + 1):
        started = time.perf_counter()
        results, up = run.train(round_index)
        server = strategy.aggregate(results)
        analytic = int(run.sites[0].info["analytic_params"])
        if num_params(server) != analytic:
            raise DataError(f"the aggregate has {num_params(server)} values, the analytic count {analytic}")
        val, down = run.evaluate(round_index, server)
        clients = {r.client: client_round_record(r.train_loss, r.num_examples, val[r.client], up[r.client],
                                                 down[r.client], num_params(server)) for r in results}
        record = round_record(round_index, clients, time.perf_counter() - started)
        total_up += sum(up.values())
        total_down += sum(down.values())
        if has_score(record) and record["mean_val_balanced_accuracy"] > best_score:
            best_round, best_score, best_server = round_index, record["mean_val_balanced_accuracy"], server
        append_round(out, record)
        console.print(round_line(record), highlight=False)

    if best_round == 0:  # no validation data anywhere: the last round is the best we know
        best_round, best_server = cfg.rounds, server
    run.finalize(best_round)
    save_tensors(paths.shared_tensors_path(out, "final"), server)
    save_tensors(paths.shared_tensors_path(out, "best"), best_server)
    write_result(out, cfg.rounds, best_round, best_score, total_up, total_down)
    console.print(f"wrote {out}; each site wrote its private tensors under <site-dir>/{options.run_name}",
                  highlight=False)
    return RunSummary(out, cfg.rounds, best_round, best_score, total_up, total_down)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context.run_config)
