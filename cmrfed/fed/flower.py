"""The Flower engine: the same Client, FedAvg and task code as the in-process engine, with Flower
(Message API) as the transport between hospitals.

Every site runs a SuperNode next to its own data; its node config names only its client and its
PREPARED folder (plus a site folder for its private tensors). The ServerApp, next to the
SuperLink, never sees an image or a private adapter. Before the first round ``query.identify``
asks each site who it is (client name, counts, backbone fingerprint; it checks its shard) so the
server can refuse sites that would not train the same model. Then each round

1. ``train``: the server asks the sites :func:`participants` draws for the round (every site
   without ``--sites-per-round``); a site replies with the tensors of
   :meth:`Client.shared_state` (an ArrayRecord) and its number of train examples;
2. the server averages those that answered with :class:`FedAvg`, as the in-process engine does;
3. ``evaluate``: the server sends the aggregate to every reachable site, asked or not; a site
   loads it (:meth:`Client.set_shared`), scores its validation split and replies with metrics.

A site that fails or does not reply is recorded in the round's ``failed`` and sent nothing until
it is asked to train again (that message carries the aggregate it missed); fewer answers than
``--min-sites`` stop the run, which keeps its last completed round. After the rounds,
``query.finalize`` tells each site which rounds were final and best so it writes its private
tensors, as the in-process engine does, into its own site folder. A site's full state (shared
and private tensors) lives in its Flower ``context.state``, which stays in its SuperNode.

The server writes the same RUN folder as ``cmrfed federate`` (run.json, rounds.jsonl with the
bytes of the ArrayRecords Flower actually carried, shared.safetensors) plus RUN/wire.jsonl: every
message it sent or received, with the keys and bytes of any tensors, so a reviewer can check that
no private tensor ever reached it.
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
from cmrfed.atomic import json_text, write_json
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
    open_run_folder,
    round_line,
    round_record,
    run_record,
    save_tensors,
    selection_score,
    val_metrics,
    write_result,
)
from cmrfed.fed.sampling import participants
from cmrfed.fed.strategy import FedAvg, FitResult, TensorState
from cmrfed.fed.task import RunModel, build_client, build_run_model, resolve_device
from cmrfed.fed.wire import num_params
from cmrfed.model.classifier import param_group

# Message types as Flower routes them ("<category>" or "<category>.<action>").
IDENTIFY = "query.identify"
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
RUN_OUT, RUN_SITES, RUN_NAME, RUN_OVERWRITE, RUN_TIMEOUT, RUN_MIN_SITES = (
    "out", "sites", "run-name", "overwrite", "node-timeout-s", "min-sites")

REPLY_POLL_S = 0.5


# --- configuration: run config (from the server) and node config (each site's own) -----------------
def run_config_of(cfg: FederateConfig, out: Path, sites: int, overwrite: bool = False,
                  node_timeout_s: float = 600.0,
                  min_sites: int | None = None) -> dict[str, str | int | float | bool]:
    """A Flower run config (flat TOML scalars) carrying the full FederateConfig and the server's
    options; both apps rebuild the same FederateConfig from it with :func:`federate_config_of`."""
    if sites < 1:
        raise UsageError(f"--sites must be at least 1, got {sites}")
    check_min_sites(min_sites, sites, cfg.sites_per_round)
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
    if min_sites is not None:
        flat[RUN_MIN_SITES] = int(min_sites)
    return flat


def check_min_sites(min_sites: int | None, sites: int, per_round: int | None) -> None:
    """``--min-sites`` must be reachable: at least 1, at most the sites asked each round."""
    if min_sites is None:
        return
    asked = sites if per_round is None else min(per_round, sites)
    if not 1 <= min_sites <= asked:
        raise UsageError(f"--min-sites must lie between 1 and the {asked} sites asked per round, "
                         f"got {min_sites}")


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
    min_sites: int | None = None  # None: every site asked must answer

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> ServerOptions:
        missing = [k for k in (RUN_OUT, RUN_SITES) if k not in run_config]
        if missing:
            raise UsageError(f"the Flower run config lacks {missing}; start runs with `cmrfed flower run`")
        out = Path(str(run_config[RUN_OUT]))
        return cls(out=out, sites=int(run_config[RUN_SITES]),
                   run_name=str(run_config.get(RUN_NAME, out.name)),
                   overwrite=bool(run_config.get(RUN_OVERWRITE, False)),
                   node_timeout_s=float(run_config.get(RUN_TIMEOUT, 600.0)),
                   min_sites=int(run_config[RUN_MIN_SITES]) if RUN_MIN_SITES in run_config else None)


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
    if cfg.holdout == site.client:  # before anything of its data is opened
        raise UsageError(f"site {site.client!r} is held out of this run (--holdout {site.client}); "
                         "stop its SuperNode")
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


@client_app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Before the first round: check this site's shard and say who it is (no data, no tensors)."""
    site = _open_site(context)
    verify_shard(site.config.prepared, site.manifest, site.client.name)
    _keep(context, site.client)
    return Message(RecordDict({SITE: _identity(site)}), reply_to=message)


def train_site(context: Context, round_index: int, aggregate: TensorState | None) -> tuple[_Site, FitResult]:
    """A site's local training of one round, from its own state in ``context`` (after taking
    ``aggregate`` first, when the server sends one it missed)."""
    site = _open_site(context)
    if aggregate is not None:
        site.client.set_shared(aggregate)
    result = site.client.fit(site.run_model.model, round_index, site.device)
    _keep(context, site.client)
    return site, result


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training; the reply carries :meth:`Client.shared_state`, the train loss and example
    count, and the site's identity: nothing else. A site that missed an aggregate (it was
    offline) receives the latest one with the train message and takes it first."""
    round_index = int(message.content.config_records[ROUND]["round"])
    missed = message.content.array_records.get(SHARED)
    site, result = train_site(context, round_index, to_state(missed) if missed is not None else None)
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
    """RUN/wire.jsonl: every message the server sent or received: its records by name and kind,
    and the keys and bytes of any tensors it carried."""

    def __init__(self, out: Path) -> None:
        self.path = paths.wire_log_path(out)
        self.path.write_text("", encoding="utf-8")

    def log(self, round_index: int, client: str, direction: str, message_type: str,
            content: RecordDict) -> int:
        """Append one message; returns the bytes of its tensors (what communication counts)."""
        arrays = content.array_records
        size = sum(record.count_bytes() for record in arrays.values())
        records = {**{name: "arrays" for name in arrays},
                   **{name: "config" for name in content.config_records},
                   **{name: "metrics" for name in content.metric_records}}
        entry = {"round": round_index, "client": client, "direction": direction,
                 "message_type": message_type, "records": records,
                 "keys": sorted(k for record in arrays.values() for k in record), "bytes": size}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json_text(entry) + "\n")
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


def _exchange(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, round_index: int,
              timeout_s: float) -> tuple[dict[int, Message], dict[int, str]]:
    """Send each node its content; the replies that came back, and why each other node failed:
    an error reply (its ClientApp failed, or the SuperLink found the node offline: a SuperNode
    that died stops sending heartbeats) or no reply within ``timeout_s``.

    Replies are matched to nodes by the message they answer: the SuperLink's own error replies
    come from the SuperLink, not from the node."""
    nodes = list(contents)
    messages = [Message(contents[node], dst_node_id=node, message_type=message_type,
                        group_id=str(round_index)) for node in nodes]
    ids = list(grid.push_messages(messages)) if messages else []
    failures: dict[int, str] = {}
    pending: dict[str, int] = {}
    for node, message_id in zip(nodes, ids, strict=False):
        if message_id is None:
            failures[node] = f"{message_type} could not be pushed to the SuperLink"
        else:
            pending[message_id] = node
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:  # Grid.send_and_receive polls every 3 s
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                failures[node] = f"{message_type} failed: {reply.error.reason}"
            else:
                replies[node] = reply
        if pending:
            time.sleep(REPLY_POLL_S)
    for node in nodes:
        if node not in replies and node not in failures:
            failures[node] = f"no {message_type} reply within {timeout_s:.0f} s"
    return replies, failures


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


def _run_json(cfg: FederateConfig, spec: MethodSpec, sites: list[SiteInfo],
              options: ServerOptions) -> dict[str, Any]:
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
        engine={"name": "flower", "flwr": flwr_version, "min_sites": options.min_sites,
                "node_timeout_s": options.node_timeout_s,
                "sites": {s.client: {"node_id": str(s.node_id), "device": s.info["device"]} for s in sites}},
    )


@dataclass
class _RoundOutcome:
    """One round as the server saw it."""

    results: list[FitResult]
    up: dict[str, int]
    down: dict[str, int]
    val: dict[str, dict]
    failed: dict[str, str]


class _Server:
    """One Flower run seen from the server: the sites, who is reachable, the wire log, RUN.

    A site whose last message failed (an error, or no reply within --node-timeout) is *down*: it
    is sent nothing more until it is asked to train again (partial participation draws from every
    site); that train message then carries the latest aggregate, which it missed.
    """

    def __init__(self, grid: Grid, cfg: FederateConfig, options: ServerOptions, out: Path,
                 console: Console) -> None:
        self.grid, self.cfg, self.options, self.console = grid, cfg, options, console
        self.spec = resolve_method(cfg.method, cfg.head)
        self.out = out  # RUN, or the folder beside it an --overwrite is built in
        self.wire = WireLog(self.out)
        nodes = _wait_for_nodes(grid, options.sites, options.node_timeout_s)
        self.names = {node: f"node {node}" for node in nodes}  # until the sites say who they are
        self.sites: list[SiteInfo] = []
        self.down: set[str] = set()
        self.synced: dict[str, int] = {}  # the last round whose aggregate each site holds

    def exchange(self, message_type: str, round_index: int, contents: Mapping[int, RecordDict],
                 ) -> tuple[dict[int, Message], dict[str, str], dict[str, int]]:
        """Send, collect, log both ways; replies by node, failures and bytes sent by site name."""
        sent = {self.names[node]: self.wire.log(round_index, self.names[node], "down", message_type, content)
                for node, content in contents.items()}
        replies, failures = _exchange(self.grid, contents, message_type, round_index,
                                      self.options.node_timeout_s)
        for node, reply in replies.items():
            self.wire.log(round_index, self.names[node], "up", message_type, reply.content)
            self.down.discard(self.names[node])
        failed = {self.names[node]: reason for node, reason in failures.items()}
        self.down |= set(failed)
        return replies, failed, sent

    def meet(self) -> None:
        """Before round 1: who the sites are (each checks its shard); run.json, as in-process."""
        content = RecordDict({ROUND: ConfigRecord({"round": 0})})
        replies, failed, _ = self.exchange(IDENTIFY, 0, dict.fromkeys(self.names, content))
        if failed:
            raise DataError("sites could not join the run: "
                            + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        self.sites = _identify(replies)
        self.names = {s.node_id: s.client for s in self.sites}
        self.synced = dict.fromkeys(self.names.values(), 0)
        write_json(paths.run_config_path(self.out), _run_json(self.cfg, self.spec, self.sites, self.options))
        self.console.print(f"{self.spec.name}: {len(self.sites)} sites ({', '.join(self.names.values())}),"
                           f" {self.cfg.rounds} rounds", highlight=False)

    def train(self, round_index: int, asked: list[SiteInfo], server: TensorState) -> _RoundOutcome:
        """The asked sites' shared tensors after local training, checked; who failed."""
        contents = {}
        for site in asked:
            records: dict[str, Any] = {ROUND: ConfigRecord({"round": round_index})}
            if self.synced[site.client] < round_index - 1:  # it missed an aggregate: send the latest
                records[SHARED] = to_record(server)
            contents[site.node_id] = RecordDict(records)
        replies, failed, sent = self.exchange(TRAIN, round_index, contents)
        outcome = _RoundOutcome([], {}, dict(sent), {}, {s: f"train: {r}" for s, r in failed.items()})
        for site in asked:
            if site.node_id not in replies:
                continue
            content = replies[site.node_id].content
            if content.config_records[SITE]["client"] != site.client:
                raise DataError(f"node {site.node_id} was {site.client!r} and now says "
                                f"{content.config_records[SITE]['client']!r}; restart the run")
            record = content.array_records[SHARED]
            check_shared_keys(list(record.keys()), self.spec, site.client)
            outcome.up[site.client] = record.count_bytes()
            fit = content.metric_records[METRICS]
            outcome.results.append(FitResult(site.client, to_state(record), int(fit["num_examples"]),
                                             float(fit["train_loss"])))
            self.synced[site.client] = round_index - 1
        return outcome

    def evaluate(self, round_index: int, server: TensorState, outcome: _RoundOutcome) -> None:
        """Send the aggregate to every site that is up; their validation metrics."""
        aggregate = to_record(server)
        content = RecordDict({SHARED: aggregate, ROUND: ConfigRecord({"round": round_index})})
        targets = {s.node_id: content for s in self.sites if s.client not in self.down}
        replies, failed, sent = self.exchange(EVALUATE, round_index, targets)
        for name, size in sent.items():
            outcome.down[name] = outcome.down.get(name, 0) + size
        outcome.failed.update({s: f"evaluate: {r}" for s, r in failed.items()})
        for node, reply in replies.items():
            outcome.val[self.names[node]] = dict(reply.content.metric_records[METRICS])
            self.synced[self.names[node]] = round_index

    def finalize(self, final_round: int, best_round: int) -> dict[str, str]:
        """Tell every site that is up which rounds to write its private tensors of."""
        rounds = ConfigRecord({"final_round": final_round, "best_round": best_round,
                               "run_name": self.options.run_name})
        targets = {s.node_id: RecordDict({ROUND: rounds}) for s in self.sites if s.client not in self.down}
        _, failed, _ = self.exchange(FINALIZE, final_round, targets)
        return failed


def _round_entries(run: _Server, outcome: _RoundOutcome, params: int) -> dict[str, dict[str, Any]]:
    """A rounds.jsonl entry for every site: NaN train loss for those that did not train."""
    trained = {r.client: r for r in outcome.results}
    entries = {}
    for site in run.sites:
        fit = trained.get(site.client)
        entries[site.client] = client_round_record(
            train_loss=fit.train_loss if fit else float("nan"),
            n_train=fit.num_examples if fit else int(site.info["n_train"]),
            val=outcome.val.get(site.client, {}), bytes_up=outcome.up.get(site.client, 0),
            bytes_down=outcome.down.get(site.client, 0), params=params)
    return entries


def _mark_stopped(out: Path, round_index: int, reason: str) -> None:
    """Add to run.json's result why and where the run stopped early."""
    info = json.loads(paths.run_config_path(out).read_text(encoding="utf-8"))
    info["result"]["stopped"] = {"round": round_index, "reason": reason}
    write_json(paths.run_config_path(out), info)


def serve(grid: Grid, run_config: Mapping[str, Any], console: Console | None = None) -> RunSummary:
    """The server side of a Flower run: rounds of train / FedAvg / evaluate, the RUN folder.

    Each round asks the sites :func:`participants` draws; FedAvg is over those that answered.
    Fewer answers than ``--min-sites`` (default: every site asked) stop the run: RUN then holds
    the last completed round as its final one, run.json's result says why it stopped.

    RUN is locked while the server runs. ``--overwrite`` of a finished RUN builds the new one
    beside it and swaps it in when the server is done (:func:`cmrfed.fed.runlog.open_run_folder`,
    as ``federate`` does), so a server that crashes or is killed leaves the old RUN as it was.
    """
    console = console or Console()
    cfg = federate_config_of(run_config)
    options = ServerOptions.of(run_config)
    if not resolve_method(cfg.method, cfg.head).federated:
        raise UsageError(f"--method {cfg.method} sends nothing to a server; run it with `cmrfed federate`")
    check_min_sites(options.min_sites, options.sites, cfg.sites_per_round)
    with open_run_folder(options.out, overwrite=options.overwrite, resume=False) as folder:
        summary = _serve(grid, cfg, options, folder.work, console)
    console.print(f"wrote {options.out}; each site wrote its private tensors under "
                  f"<site-dir>/{options.run_name}", highlight=False)
    return replace(summary, out=options.out)


def _serve(grid: Grid, cfg: FederateConfig, options: ServerOptions, out: Path,
           console: Console) -> RunSummary:
    """The rounds of :func:`serve`, writing the run into ``out``."""
    paths.rounds_log_path(out).write_text("", encoding="utf-8")
    run = _Server(grid, cfg, options, out, console)
    run.meet()
    strategy = FedAvg()
    by_name = {s.client: s for s in run.sites}
    analytic = int(run.sites[0].info["analytic_params"])

    server: TensorState = {}
    completed, best_round, best_score, best_server = 0, 0, float("-inf"), server
    total_up = total_down = 0
    stopped: str | None = None
    for round_index in range(1, cfg.rounds + 1):
        started = time.perf_counter()
        asked = participants(list(by_name), cfg.sites_per_round, cfg.seed, round_index)
        outcome = run.train(round_index, [by_name[name] for name in asked], server)
        needed = len(asked) if options.min_sites is None else options.min_sites
        if len(outcome.results) < needed:
            failures = "; ".join(f"{k}: {v}" for k, v in outcome.failed.items())
            stopped = (f"round {round_index}: {len(outcome.results)} of {len(asked)} sites asked answered, "
                       f"--min-sites is {needed} ({failures})")
            break
        server = strategy.aggregate(outcome.results)
        if num_params(server) != analytic:
            raise DataError(f"the aggregate has {num_params(server)} values, the analytic count {analytic}")
        run.evaluate(round_index, server, outcome)
        entries = _round_entries(run, outcome, num_params(server))
        record = round_record(round_index, entries, time.perf_counter() - started, cfg.select,
                              participants=asked, failed=outcome.failed)
        total_up += sum(outcome.up.values())
        total_down += sum(outcome.down.values())
        completed = round_index
        if has_score(record) and selection_score(record) > best_score:
            best_round, best_score, best_server = round_index, selection_score(record), server
        append_round(out, record)
        console.print(round_line(record), highlight=False)
        for site, reason in outcome.failed.items():
            console.print(f"round {round_index}: {site} failed ({reason})", highlight=False)

    if completed == 0:
        raise DataError(f"the run stopped before any round completed: {stopped}")
    if best_round == 0:  # no validation data anywhere: the last round is the best we know
        best_round, best_server = completed, server
    for site, reason in run.finalize(completed, best_round).items():
        console.print(f"{site} could not write its private tensors: {reason}", highlight=False)
    save_tensors(paths.shared_tensors_path(out, "final"), server)
    save_tensors(paths.shared_tensors_path(out, "best"), best_server)
    write_result(out, completed, best_round, best_score, total_up, total_down, cfg.select)
    if stopped is not None:
        _mark_stopped(out, completed + 1, stopped)
        console.print(f"stopped: {stopped}; {options.out} keeps round {completed}, the last completed one",
                      highlight=False)
    return RunSummary(out, completed, best_round, best_score, total_up, total_down)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context.run_config)
