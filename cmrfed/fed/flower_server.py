"""The server side of a Flower run: a ServerApp whose rounds are :func:`cmrfed.fed.rounds.run_rounds`,
with Flower's Message API as the transport to the sites.

Before the first round ``query.identify`` asks each connected SuperNode who it is (client name,
counts, backbone fingerprint; it checks its shard) so the server can refuse sites that would not
train the same model. Sites are known by their client name, never by Flower's node id, which
changes when a SuperNode restarts: a node the server has not met is identified when it appears
and, if it is a site that was down, takes that site's place. Each round

1. ``train``: the asked sites train from their own state (a site that missed an aggregate gets it
   with this message) and reply with :meth:`Client.shared_state`, counts, loss and DP steps;
2. the loop averages those that answered with FedAvg;
3. ``evaluate``: every reachable site, asked or not, takes the aggregate and validates.

A site that fails or does not reply within ``--node-timeout`` is recorded in the round's ``failed``
and sent nothing until it is asked to train again. Every message carries a TTL of
``--node-timeout``: an instruction the server stopped waiting for expires at the SuperLink and is
never executed. After the rounds, ``query.finalize`` tells each site which rounds were final and
best so it writes its private tensors into its own site folder.

The server writes the same RUN folder as ``cmrfed federate`` plus RUN/wire.jsonl: every message it
sent or received, with the keys and bytes of any tensors, so a reviewer can check that no private
tensor ever reached it. Its checkpoint holds only what the server knows (the shared state, the
rounds, the ledger, which aggregate each site holds); each site checkpoints its own tensors.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from cmrfed import paths
from cmrfed.atomic import json_text
from cmrfed.errors import DataError, UsageError
from cmrfed.faults import ENV as FAULT_ENV
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_client import to_record, to_state
from cmrfed.fed.flower_config import (
    EVALUATE,
    FINALIZE,
    IDENTIFY,
    METRICS,
    PRIVACY,
    ROUND,
    SHARED,
    SITE,
    TRAIN,
    ServerOptions,
    check_min_sites,
    config_text,
    federate_config_of,
)
from cmrfed.fed.methods import MethodSpec, resolve_method
from cmrfed.fed.privacy import SitePlan
from cmrfed.fed.rounds import Exchange, Opening, RunSummary, Site, run_rounds
from cmrfed.fed.runlog import open_run_folder, resume_options
from cmrfed.fed.strategy import FitResult, TensorState
from cmrfed.model.classifier import param_group

REPLY_POLL_S = 0.5


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
    and the keys and bytes of any tensors it carried (appended to when a run is resumed)."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.path = paths.wire_log_path(out)
        if not resume or not self.path.exists():
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


def message(content: RecordDict, node: int, message_type: str, round_index: int, ttl_s: float) -> Message:
    """A message to one node that expires after ``ttl_s`` (the server's --node-timeout)."""
    return Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_index),
                   ttl=ttl_s)


def _exchange(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, round_index: int,
              timeout_s: float) -> tuple[dict[int, Message], dict[int, str]]:
    """Send each node its content; the replies that came back, and why each other node failed:
    an error reply (its ClientApp failed, the message expired, or the SuperLink found the node
    offline) or no reply within ``timeout_s``.

    Replies are matched to nodes by the message they answer: the SuperLink's own error replies
    come from the SuperLink, not from the node."""
    nodes = list(contents)
    messages = [message(contents[node], node, message_type, round_index, timeout_s) for node in nodes]
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


def _site_infos(replies: Mapping[int, Message]) -> list[SiteInfo]:
    return [SiteInfo(node, str(info["client"]), int(info["index"]), info)
            for node, reply in replies.items()
            for info in [dict(reply.content.config_records[SITE])]]


def _check_same_model(sites: list[SiteInfo]) -> None:
    names = [s.client for s in sites]
    if len(set(names)) != len(names):
        raise UsageError(f"two SuperNodes claim the same client ({sorted(names)}); give each site its own")
    for key in ("fingerprint", "depth", "start_block", "analytic_params", "precision"):
        values = {s.client: s.info[key] for s in sites}
        if len(set(values.values())) != 1:
            raise DataError(f"sites disagree on the model ({key}: {values}); every site needs the same "
                            "backbone, input shape, precision (give --precision fp32 or bf16 when their "
                            "devices resolve auto differently) and cmrfed version")


class FlowerTransport:
    """The :class:`~cmrfed.fed.rounds.Transport` whose sites are SuperNodes behind a Grid.

    A site whose last message failed is *down*: it is sent nothing more until it is asked to train
    again, and its train message then carries the latest aggregate, which it missed. A site that
    comes back under a new node id is met again (``identify``) before it is sent anything.
    """

    def __init__(self, grid: Grid, cfg: FederateConfig, options: ServerOptions, console: Console) -> None:
        self.grid, self.cfg, self.options, self.console = grid, cfg, options, console
        self.spec = resolve_method(cfg.method, cfg.head)
        self.config = config_text(cfg)
        self.sites: list[SiteInfo] = []
        self.down: set[str] = set()
        self.synced: dict[str, int] = {}  # the last round whose aggregate each site holds
        self.best_round = 0
        self.token = ""
        self.epoch = time.time_ns()  # this server's start: sites refuse an earlier server's messages
        self.plans: dict[str, SitePlan] = {}

    # --- messages ------------------------------------------------------------------------------
    def _instruction(self, round_index: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"round": round_index, "config": self.config, "token": self.token,
                             "epoch": self.epoch,
                             "run_name": self.options.run_name, "best_round": self.best_round, **extra})

    @property
    def _nodes(self) -> dict[str, int]:
        return {s.client: s.node_id for s in self.sites}

    def _send(self, message_type: str, round_index: int, contents: Mapping[str, RecordDict],
              ) -> tuple[dict[str, Message], dict[str, str], dict[str, int]]:
        """Send to sites by name, collect, log both ways; replies, failures and bytes sent by name."""
        nodes = self._nodes
        sent = {name: self.wire.log(round_index, name, "down", message_type, content)
                for name, content in contents.items()}
        replies, failures = _exchange(self.grid, {nodes[name]: c for name, c in contents.items()},
                                      message_type, round_index, self.options.node_timeout_s)
        names = {node: name for name, node in nodes.items()}
        by_name = {names[node]: reply for node, reply in replies.items()}
        for name, reply in by_name.items():
            self.wire.log(round_index, name, "up", message_type, reply.content)
            self.down.discard(name)
        failed = {names[node]: reason for node, reason in failures.items()}
        self.down |= set(failed)
        return by_name, failed, sent

    def _identify(self, nodes: list[int], round_index: int) -> tuple[list[SiteInfo], dict[int, str]]:
        content = RecordDict({ROUND: self._instruction(round_index)})
        for node in nodes:
            self.wire.log(round_index, f"node {node}", "down", IDENTIFY, content)
        replies, failures = _exchange(self.grid, dict.fromkeys(nodes, content), IDENTIFY, round_index,
                                      self.options.node_timeout_s)
        infos = _site_infos(replies)
        for info in infos:
            self.wire.log(round_index, info.client, "up", IDENTIFY, replies[info.node_id].content)
        return infos, failures

    # --- the transport -------------------------------------------------------------------------
    def open(self, out: Path, resume: bool, extra: Mapping[str, Any]) -> Opening:
        """Meet the sites; a resumed run keeps its token (the sites' states belong to it)."""
        self.wire = WireLog(out, resume)
        recorded = json.loads(paths.run_config_path(out).read_text(encoding="utf-8")) if resume else {}
        self.token = recorded.get("engine", {}).get("run_token") or secrets.token_hex(8)
        nodes = _wait_for_nodes(self.grid, self.options.sites, self.options.node_timeout_s)
        infos, failed = self._identify(nodes, 0)
        if failed:
            raise DataError("sites could not join the run: "
                            + "; ".join(f"node {k}: {v}" for k, v in failed.items()))
        _check_same_model(infos)
        self.sites = sorted(infos, key=lambda s: (s.index, s.client))
        names = [s.client for s in self.sites]
        if recorded and sorted(names) != sorted(recorded.get("clients", names)):
            raise DataError(f"the sites {names} are not those of the run {sorted(recorded['clients'])}")
        self.synced = {name: int(extra.get("synced", {}).get(name, 0)) for name in names}
        self.best_round = int(extra.get("best_round", 0))
        self.console.print(f"{self.spec.name}: {len(self.sites)} sites ({', '.join(names)}), "
                           f"{self.cfg.rounds} rounds", highlight=False)
        return Opening(
            sites=[Site(s.client, int(s.info["n_train"]), int(s.info["n_val"])) for s in self.sites],
            trainers={s.client: int(s.info["n_train"]) for s in self.sites},
            server={},
            record=self._record(),
            precision=str(self.sites[0].info["precision"]),
        )

    def _record(self) -> dict[str, Any]:
        first = self.sites[0].info
        manifests = {s.info["manifest_sha256"] for s in self.sites}
        try:
            flwr_version = metadata.version("flwr")
        except metadata.PackageNotFoundError:  # pragma: no cover - the ServerApp runs under Flower
            flwr_version = "unknown"
        return {
            "created_by": "cmrfed flower run",
            "data": {"prepared": self.cfg.data,
                     "manifest_sha256": manifests.pop() if len(manifests) == 1 else None,
                     "shard_sha256": {s.client: s.info["shard_sha256"] for s in self.sites}},
            "backbone": {"spec": self.cfg.backbone, "fingerprint": first["fingerprint"],
                         "depth": int(first["depth"]), "first_adapted_block": int(first["start_block"])},
            "analytic": int(first["analytic_params"]),
            "device": ",".join(sorted({str(s.info["device"]) for s in self.sites})),
            "engine": {"name": "flower", "flwr": flwr_version, "min_sites": self.options.min_sites,
                       "node_timeout_s": self.options.node_timeout_s, "run_token": self.token,
                       "sites": {s.client: {"device": s.info["device"]} for s in self.sites}},
        }

    def use_privacy(self, plans: Mapping[str, SitePlan]) -> dict[str, SitePlan]:
        """Each site takes its plan and, with class balancing, releases its label counts (the
        only thing about its labels that leaves it, recorded in run.json as in-process); the plans
        then go out with every train instruction. A resumed run's recorded plans hold the counts."""
        self.plans = dict(plans)
        if all(p.count_noise_multiplier is None or p.released_counts is not None for p in plans.values()):
            return self.plans
        contents = {name: RecordDict({ROUND: self._instruction(0, privacy=json.dumps(plan.to_dict()))})
                    for name, plan in self.plans.items()}
        replies, failed, _ = self._send(PRIVACY, 0, contents)
        if failed:
            raise DataError("sites could not take their DP plans: "
                            + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        for name, reply in replies.items():
            released = reply.content.config_records[SITE]["privacy"]
            self.plans[name] = SitePlan.from_dict(json.loads(str(released)))
        return self.plans

    def _rejoin(self, round_index: int) -> None:
        """Meet the nodes that appeared since the run started: a site that was down and restarted
        (under a new node id) takes its place again; anything else is ignored."""
        if not self.down:
            return
        known = set(self._nodes.values())
        new = sorted(set(self.grid.get_node_ids()) - known)
        if not new:
            return
        infos, _ = self._identify(new, round_index)
        for info in infos:
            if info.client in self.down:
                _check_same_model([*(s for s in self.sites if s.client != info.client), info])
                self.sites = [info if s.client == info.client else s for s in self.sites]
                self.down.discard(info.client)
                self.console.print(f"round {round_index}: {info.client} is back (node {info.node_id})",
                                   highlight=False)

    def train(self, round_index: int, asked: list[str], server: TensorState, exchange: Exchange) -> None:
        self._rejoin(round_index)
        contents = {}
        for name in asked:
            extra = {"privacy": json.dumps(self.plans[name].to_dict())} if name in self.plans else {}
            records: dict[str, Any] = {ROUND: self._instruction(round_index, **extra)}
            if self.synced[name] < round_index - 1:  # it missed an aggregate: send the latest
                records[SHARED] = to_record(server)
            contents[name] = RecordDict(records)
        replies, failed, sent = self._send(TRAIN, round_index, contents)
        exchange.down.update(sent)
        exchange.failed.update({s: f"train: {r}" for s, r in failed.items()})
        for name in asked:
            if name not in replies:
                continue
            content = replies[name].content
            if content.config_records[SITE]["client"] != name:
                raise DataError(f"the node of {name!r} now says it is "
                                f"{content.config_records[SITE]['client']!r}; restart the run")
            record = content.array_records[SHARED]
            check_shared_keys(list(record.keys()), self.spec, name)
            exchange.up[name] = record.count_bytes()
            fit = content.metric_records[METRICS]
            exchange.results.append(FitResult(name, to_state(record), int(fit["num_examples"]),
                                              float(fit["train_loss"])))
            exchange.losses[name] = float(fit["train_loss"])
            if name in self.plans:
                exchange.dp_steps[name] = int(fit["dp_steps"])
            self.synced[name] = round_index - 1

    def evaluate(self, round_index: int, server: TensorState, exchange: Exchange) -> None:
        self._rejoin(round_index)
        content = RecordDict({SHARED: to_record(server), ROUND: self._instruction(round_index)})
        targets = {s.client: content for s in self.sites if s.client not in self.down}
        replies, failed, sent = self._send(EVALUATE, round_index, targets)
        for name, size in sent.items():
            exchange.down[name] = exchange.down.get(name, 0) + size
        exchange.failed.update({s: f"evaluate: {r}" for s, r in failed.items()})
        for name, reply in replies.items():
            exchange.val[name] = dict(reply.content.metric_records[METRICS])
            self.synced[name] = round_index

    def keep_best(self, round_index: int) -> None:
        self.best_round = round_index  # the sites hear of it with the next message

    def checkpoint(self) -> tuple[dict[str, TensorState], dict[str, TensorState], dict[str, Any]]:
        return {}, {}, {"synced": dict(self.synced), "best_round": self.best_round}

    def restore(self, last: Mapping[str, TensorState], best: Mapping[str, TensorState]) -> None:
        if last or best:
            raise DataError("this checkpoint holds site tensors: it is not a Flower run's")

    def finalize(self, out: Path, final_round: int, best_round: int) -> dict[str, str]:
        """Tell every site that is up which rounds to write its private tensors of."""
        self.best_round = best_round
        instruction = self._instruction(final_round, final_round=final_round)
        targets = {s.client: RecordDict({ROUND: instruction})
                   for s in self.sites if s.client not in self.down}
        _, failed, _ = self._send(FINALIZE, final_round, targets)
        return failed

    def report(self, out: Path) -> None:
        self.console.print(f"wrote {self.options.out}; each site wrote its private tensors under "
                           f"<site-dir>/{self.options.run_name}", highlight=False)


def serve(grid: Grid, run_config: Mapping[str, Any], console: Console | None = None) -> RunSummary:
    """The server side of a Flower run: the round loop over :class:`FlowerTransport`, into RUN.

    RUN is locked while the server runs. ``--overwrite`` of a finished RUN builds the new one
    beside it and swaps it in when the server is done (:func:`cmrfed.fed.runlog.open_run_folder`,
    as ``federate`` does), so a server that crashes or is killed leaves the old RUN as it was.
    ``--resume`` continues RUN from its checkpoint with the options recorded in its run.json.
    """
    console = console or Console()
    cfg = federate_config_of(run_config)
    options = ServerOptions.of(run_config)
    if options.fault:  # a crash test's fault points, for this process (cmrfed/faults.py)
        os.environ[FAULT_ENV] = options.fault
    if not resolve_method(cfg.method, cfg.head).federated:
        raise UsageError(f"--method {cfg.method} sends nothing to a server; run it with `cmrfed federate`")
    check_min_sites(options.min_sites, options.sites, cfg.sites_per_round)
    if options.resume:
        given = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        cfg = FederateConfig(**resume_options(options.out, options.overwrite, given, set(options.typed)))
    with open_run_folder(options.out, overwrite=options.overwrite, resume=options.resume) as folder:
        transport = FlowerTransport(grid, cfg, options, console)
        summary = run_rounds(cfg, folder.work, transport, resume=folder.resume,
                             min_sites=options.min_sites, console=console)
    return replace(summary, out=options.out)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context.run_config)
