"""The site side of a Flower run: a ClientApp over the same :class:`Client` as the in-process engine.

Every site runs a SuperNode next to its own data; its node config names only its client, its
PREPARED folder and a site folder. Flower starts a fresh ClientApp process per message, so a site
rebuilds its model workspace from the run seed for each message and keeps its state in its own
site folder (:class:`SiteState`): one file, replaced atomically after every message, holding its
full state (shared and private tensors) at the end of each round it still needs. A SuperNode that
is killed and restarted with the same node config therefore finds its state and continues from it,
and a ServerApp that is killed and resumed finds every site able to redo the round it was in.

The server's instruction travels in the ``round`` ConfigRecord of every message: the round, the
run's FederateConfig, the run's token (a site's state belongs to one run), the best round so far
(what a site must keep) and, under DP, the site's DP-SGD plan. A message older than its TTL is
refused rather than executed: the server stopped waiting for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cmrfed import paths
from cmrfed.atomic import atomic_file
from cmrfed.data.shards import Manifest, load_manifest, verify_shard
from cmrfed.errors import DataError, UsageError
from cmrfed.faults import fault_point
from cmrfed.fed.client import Client
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import METRICS, ROUND, SHARED, SITE, SiteConfig, config_from_text
from cmrfed.fed.methods import resolve_method
from cmrfed.fed.mixing import state_group
from cmrfed.fed.privacy import SitePlan, check_dp_model
from cmrfed.fed.runlog import analytic_params_per_message, save_tensors, val_metrics
from cmrfed.fed.strategy import TensorState
from cmrfed.fed.task import RunModel, build_client, build_run_model, resolve_device

SITE_STATE_FORMAT_VERSION = 1


def to_record(state: TensorState) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict(dict(state))


def to_state(record: ArrayRecord) -> TensorState:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


# --- a site's own checkpoint ---------------------------------------------------------------------
@dataclass
class SiteState:
    """A site's states at the end of rounds, kept in its site folder as ONE atomically replaced file.

    ``rounds[r] = (complete, state)``: the full state after round ``r``; ``complete`` False when
    the site trained in round ``r`` but has not yet taken that round's aggregate. A site trains
    round ``k`` from its latest state before ``k`` and takes an aggregate over its latest state up
    to that round, so a round the server redoes (after a resume) starts from the same state. The
    states before the best round the server has announced are dropped.
    """

    token: str
    rounds: dict[int, tuple[bool, TensorState]] = field(default_factory=dict)
    epoch: int = 0  # the newest server start this site has heard from (see :meth:`admit`)

    @classmethod
    def load(cls, path: Path, token: str) -> SiteState:
        """The state of the run ``token`` (empty when the file is absent or of another run)."""
        if not path.exists():
            return cls(token)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            if metadata.get("format_version") != str(SITE_STATE_FORMAT_VERSION):
                raise ValueError(f"format {metadata.get('format_version')!r}")
            if metadata.get("token") != token:  # a state left by an earlier run of the same name
                return cls(token)
            rounds: dict[int, tuple[bool, TensorState]] = {
                int(r): (bool(complete), {}) for r, complete in json.loads(metadata["rounds"]).items()}
            epoch = int(metadata["epoch"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise DataError(f"{path}: unreadable site state ({exc}); delete it to rejoin the run as a "
                            "new site, or start a new run") from exc
        for key, tensor in tensors.items():
            index, name = key.split("/", 1)
            rounds[int(index)][1][name] = tensor
        return cls(token, rounds, epoch)

    def save(self, path: Path) -> None:
        tensors = {f"{r}/{key}": tensor.contiguous() for r, (_, state) in self.rounds.items()
                   for key, tensor in state.items()}
        metadata = {"format_version": str(SITE_STATE_FORMAT_VERSION), "token": self.token,
                    "epoch": str(self.epoch),
                    "rounds": json.dumps({str(r): done for r, (done, _) in self.rounds.items()})}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def admit(self, epoch: int) -> None:
        """Refuse an instruction of a server that was since restarted: a killed ServerApp's last
        messages may still reach the site while the resumed one redoes the round."""
        if epoch < self.epoch:
            raise DataError("an instruction of a server that has since been restarted; not executed")
        self.epoch = epoch

    def latest(self, upto: int) -> tuple[int, bool, TensorState] | None:
        """The latest state at or before round ``upto`` (None: the site has none, it starts fresh)."""
        known = [r for r in self.rounds if r <= upto]
        if not known:
            return None
        index = max(known)
        complete, state = self.rounds[index]
        return index, complete, {k: v.clone() for k, v in state.items()}

    def keep(self, round_index: int, complete: bool, state: TensorState, best_round: int) -> None:
        """Record the state after ``round_index``; drop what neither the best round nor a later
        round can need."""
        self.rounds[round_index] = (complete, {k: v.clone() for k, v in state.items()})
        floor = max([r for r in self.rounds if r <= best_round], default=0)
        self.rounds = {r: entry for r, entry in self.rounds.items() if r >= floor}


# --- one message: the site's workspace -----------------------------------------------------------
@dataclass
class _Site:
    """A site's model workspace, its Client and its own checkpoint, for one message."""

    config: SiteConfig
    cfg: FederateConfig
    manifest: Manifest
    run_model: RunModel
    client: Client
    device: torch.device
    state: SiteState
    state_path: Path


def _instruction(message: Message) -> ConfigRecord:
    """The server's instruction, refused when the message outlived its TTL: the server stopped
    waiting for its reply, so executing it now could only spend a site's data (and budget) on a
    round that has moved on."""
    metadata = message.metadata
    if metadata.ttl and time.time() > metadata.created_at + metadata.ttl:
        raise DataError(f"{metadata.message_type} of round {message.content.config_records[ROUND]['round']}"
                        f" arrived after its TTL ({metadata.ttl:g} s); not executed")
    return message.content.config_records[ROUND]


def _open_site(context: Context, instruction: ConfigRecord) -> _Site:
    site = SiteConfig.of(context.node_config)
    cfg = replace(config_from_text(str(instruction["config"])), data=str(site.prepared))
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
    state_path = paths.site_state_path(site.site_dir, str(instruction["run_name"]))
    state = SiteState.load(state_path, str(instruction["token"]))
    state.admit(int(instruction["epoch"]))
    return _Site(site, cfg, manifest, run_model, client, device, state, state_path)


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
        "precision": site.cfg.resolved(site.device).precision,  # `auto` as this site resolves it
        "manifest_sha256": site.manifest.sha256,
        "shard_sha256": site.manifest.shard_sha256[site.client.name],
        "device": str(site.device),
    })


client_app = ClientApp()


@client_app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Before the first round (and when a restarted site reconnects): check this site's shard and
    say who it is (no data, no tensors)."""
    site = _open_site(context, _instruction(message))
    verify_shard(site.config.prepared, site.manifest, site.client.name)
    site.state.save(site.state_path)  # the server's epoch, from now on
    return Message(RecordDict({SITE: _identity(site)}), reply_to=message)


def train_site(site: _Site, round_index: int, aggregate: TensorState | None, best_round: int,
               plan: SitePlan | None = None) -> tuple[TensorState, float, int]:
    """A site's local training of one round from its state at the end of the previous round
    (taking ``aggregate`` first, when the server sends one the site missed); the state is kept in
    the site folder before anything is sent. Returns the shared tensors, train loss and DP steps."""
    latest = site.state.latest(round_index - 1)
    if latest is not None:
        site.client.state = latest[2]
    if aggregate is not None:
        site.client.set_shared(aggregate)
    elif latest is not None and (latest[0] != round_index - 1 or not latest[1]):
        raise DataError(f"site {site.client.name!r} holds round {latest[0]} but was asked to train round "
                        f"{round_index} without the aggregate it missed; restart the run with --resume")
    if plan is not None:
        check_dp_model(site.run_model.model, site.cfg.method)
        site.client.use_privacy(plan)  # with class balancing, its label counts are released here
    result = site.client.fit(site.run_model.model, round_index, site.device)
    site.state.keep(round_index, False, site.client.state, best_round)
    site.state.save(site.state_path)
    fault_point("flower.site-trained")
    return result.shared, result.train_loss, plan.steps_per_round if plan is not None else 0


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training; the reply carries :meth:`Client.shared_state`, the train loss, example
    count and DP steps, and the site's identity: nothing else."""
    instruction = _instruction(message)
    site = _open_site(context, instruction)
    missed = message.content.array_records.get(SHARED)
    plan = SitePlan.from_dict(json.loads(str(instruction["privacy"]))) if "privacy" in instruction else None
    shared, loss, steps = train_site(site, int(instruction["round"]), to_state(missed) if missed else None,
                                     int(instruction["best_round"]), plan)
    metrics = MetricRecord({"num_examples": len(site.client.train), "train_loss": loss, "dp_steps": steps})
    content = RecordDict({SHARED: to_record(shared), METRICS: metrics, SITE: _identity(site)})
    return Message(content, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Take the aggregate over this site's latest state, score the site's own model on its
    validation split, and keep the state of the round."""
    instruction = _instruction(message)
    site = _open_site(context, instruction)
    round_index = int(instruction["round"])
    latest = site.state.latest(round_index)
    if latest is not None:
        site.client.state = latest[2]
    site.client.set_shared(to_state(message.content.array_records[SHARED]))
    metrics = val_metrics(site.client, site.run_model.model, site.device)
    site.state.keep(round_index, True, site.client.state, int(instruction["best_round"]))
    site.state.save(site.state_path)
    return Message(RecordDict({METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})}),
                   reply_to=message)


@client_app.query("privacy")
def privacy(message: Message, context: Context) -> Message:
    """Take this run's DP plan and release the site's label counts under it (class balancing):
    the reply is the plan with the released counts, nothing else of the labels."""
    instruction = _instruction(message)
    site = _open_site(context, instruction)
    check_dp_model(site.run_model.model, site.cfg.method)
    plan = site.client.use_privacy(SitePlan.from_dict(json.loads(str(instruction["privacy"]))))
    reply = ConfigRecord({"privacy": json.dumps(plan.to_dict())})
    return Message(RecordDict({SITE: reply}), reply_to=message)


@client_app.query("finalize")
def finalize(message: Message, context: Context) -> Message:
    """Write the private tensors of the final and the best round into this site's own folder."""
    instruction = _instruction(message)
    site = SiteConfig.of(context.node_config)
    run_name = str(instruction["run_name"])
    state = SiteState.load(paths.site_state_path(site.site_dir, run_name), str(instruction["token"]))
    cfg = config_from_text(str(instruction["config"]))
    private = resolve_method(cfg.method, cfg.head).private
    site_run = paths.site_run_dir(site.site_dir, run_name)
    for which in ("final", "best"):
        round_index = int(instruction[f"{which}_round"])
        latest = state.latest(round_index)
        if latest is None:
            raise DataError(f"site {site.client!r} has no state of round {round_index} in "
                            f"{paths.site_state_path(site.site_dir, run_name)}")
        tensors = {k: v for k, v in latest[2].items() if state_group(k) in private}
        save_tensors(paths.private_tensors_path(site_run, site.client, which), tensors)
    return Message(RecordDict(), reply_to=message)
