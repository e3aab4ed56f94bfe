"""The round loop, written once for every engine: a transport only moves tensors and replies.

Each round the loop

1. draws the sites asked to train (:func:`participants`; every site without ``--sites-per-round``)
   and, under DP, stops first if a round would take a site past its budget;
2. asks the transport to have them train from the current shared state; the replies are their
   shared tensors, example counts, train losses and DP steps;
3. aggregates what came back with :class:`FedAvg` (fewer answers than ``--min-sites`` stop the run);
4. asks the transport to have the sites take the aggregate and validate;
5. records the round (rounds.jsonl), the best round so far and a checkpoint.

Everything that decides the result lives here, once: participants, ``--min-sites``, the DP
ledger, stopping, best-round tracking, byte totals, the checkpoint, the final writes and the
``result`` block of run.json. The two transports are :mod:`cmrfed.fed.inprocess` (every site in
this process) and :mod:`cmrfed.fed.flower_server` (one Flower SuperNode per site). The loop has no
random state of its own: every draw is a pure function of (run seed, round), so a checkpoint
needs no RNG state to continue exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cmrfed import paths
from cmrfed.atomic import atomic_file, json_text, write_json
from cmrfed.errors import DataError, UsageError
from cmrfed.faults import fault_point
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import MethodSpec, resolve_method
from cmrfed.fed.privacy import BUDGET_RTOL, SitePlan, plan_run, recorded_plans, run_privacy_record
from cmrfed.fed.runlog import (
    append_round,
    client_round_record,
    has_score,
    round_line,
    round_record,
    run_record,
    save_tensors,
    selection_score,
    write_result,
)
from cmrfed.fed.sampling import participants
from cmrfed.fed.strategy import FedAvg, FitResult, TensorState
from cmrfed.fed.wire import num_params

CHECKPOINT_FORMAT_VERSION = 3
SERVER = "server"  # the owner of the shared state in a checkpoint


@dataclass(frozen=True)
class RunSummary:
    """What a federated run returns (and prints)."""

    out: Path
    rounds: int
    best_round: int
    best_score: float
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class Site:
    """A site as the loop knows it: its name and split sizes (rounds.jsonl, run.json)."""

    name: str
    n_train: int
    n_val: int


@dataclass(frozen=True)
class Opening:
    """What a transport reports before round 1.

    ``trainers``: who trains and on how many subjects (the sites, or the one pooled trainer of
    ``central``), which the DP plans are made for; ``server``: the shared state before round 1;
    ``record``: the engine's own run.json fields (:func:`cmrfed.fed.runlog.run_record` keywords).
    """

    sites: list[Site]
    trainers: dict[str, int]
    server: TensorState
    record: dict[str, Any]


@dataclass
class Exchange:
    """One round as the transport saw it; every mapping is keyed by site (or trainer) name."""

    results: list[FitResult] = field(default_factory=list)  # the replies FedAvg averages
    losses: dict[str, float] = field(default_factory=dict)  # train loss of each site that trained
    dp_steps: dict[str, int] = field(default_factory=dict)  # DP-SGD steps each trainer reports
    up: dict[str, int] = field(default_factory=dict)  # bytes received from each site
    down: dict[str, int] = field(default_factory=dict)  # bytes sent to each site
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # site -> why it did not answer


class Transport(Protocol):
    """How the loop reaches the sites. A transport holds no bookkeeping of the run."""

    def open(self, out: Path, resume: bool, extra: Mapping[str, Any]) -> Opening:
        """Meet the sites (``extra``: the transport's own checkpointed state, empty when new)."""

    def use_privacy(self, plans: Mapping[str, SitePlan]) -> None:
        """Every trainer runs DP-SGD with its plan from now on."""

    def train(self, round_index: int, asked: list[str], server: TensorState, exchange: Exchange) -> None:
        """The asked sites train from ``server``; fills results, losses, dp_steps, up, down, failed."""

    def evaluate(self, round_index: int, server: TensorState, exchange: Exchange) -> None:
        """Every reachable site takes ``server`` and validates; fills val, down, failed."""

    def keep_best(self, round_index: int) -> None:
        """The round just evaluated is the best so far: keep the sites' private tensors of it."""

    def checkpoint(self) -> tuple[dict[str, TensorState], dict[str, TensorState], dict[str, Any]]:
        """Site tensors the server holds (``last`` and ``best``, by owner) and the transport's own
        state, all saved with the loop's checkpoint (a transport whose sites keep their own
        tensors returns none)."""

    def restore(self, last: Mapping[str, TensorState], best: Mapping[str, TensorState]) -> None:
        """Take back what :meth:`checkpoint` returned."""

    def finalize(self, out: Path, final_round: int, best_round: int) -> dict[str, str]:
        """Have the sites' private tensors of the final and best rounds written; who failed."""

    def report(self, out: Path) -> None:
        """Print what the engine has to say at the end (communication, where files went)."""


@dataclass
class _Progress:
    """What a checkpoint restores besides tensors."""

    round: int = 0
    best_round: int = 0
    best_score: float = float("-inf")
    dp_steps: dict[str, int] = field(default_factory=dict)  # the DP ledger: steps each trainer ran
    transport: dict[str, Any] = field(default_factory=dict)


# --- the checkpoint: one file, replaced atomically every round ------------------------------------
def _write_checkpoint(run: Path, progress: _Progress, last: Mapping[str, TensorState],
                      best: Mapping[str, TensorState]) -> None:
    """Everything needed to continue after this round, in ONE file replaced atomically.

    The file holds two snapshots, ``last`` and ``best``, each a mapping owner -> tensors (the
    server's shared state, and whatever site tensors the transport holds). The owners are listed
    in the metadata, so an owner with no tensors comes back as an empty entry.
    """
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


# --- the DP ledger -------------------------------------------------------------------------------
@dataclass
class _Ledger:
    """Each trainer's DP spend, from the steps it reports it ran (the plans say at what noise)."""

    plans: dict[str, SitePlan]
    steps: dict[str, int]

    def fits(self, trainers: list[str]) -> bool:
        """Whether one more round keeps every one of ``trainers`` within its budget."""
        return all(plan.epsilon(self.steps.get(name, 0) + plan.steps_per_round)
                   <= plan.target_epsilon * (1 + BUDGET_RTOL)
                   for name, plan in self.plans.items() if name in trainers)

    def add(self, reported: Mapping[str, int]) -> None:
        for name, steps in reported.items():
            if name not in self.plans:
                raise DataError(f"{name!r} reported DP-SGD steps but has no DP plan in this run")
            self.steps[name] = self.steps.get(name, 0) + int(steps)

    def record(self) -> dict[str, dict[str, Any]]:
        """Per trainer, what it has spent so far (rounds.jsonl, run.json)."""
        return {name: plan.spent_steps(self.steps.get(name, 0)) for name, plan in self.plans.items()}


# --- the loop ------------------------------------------------------------------------------------
def run_rounds(cfg: FederateConfig, out: Path, transport: Transport, *, resume: bool,
               min_sites: int | None = None, console: Console | None = None) -> RunSummary:
    """Run ``cfg.rounds`` rounds (those after the checkpoint when ``resume``) into RUN ``out``.

    ``min_sites``: a round goes on when at least this many of the sites asked answered (None:
    every one); fewer stop the run, which keeps its last completed round.
    """
    console = console or Console()
    out = Path(out)
    spec = resolve_method(cfg.method, cfg.head)
    progress, last, best = _Progress(), {}, {}
    if resume and not paths.run_config_path(out).exists():
        raise UsageError(f"{out}: no run.json to resume; start the run without --resume")
    if resume and (paths.checkpoint_dir(out) / "progress.json").exists():
        raise DataError(f"{paths.checkpoint_dir(out)}: a checkpoint of an older cmrfed (format 1) "
                        "that this version cannot continue; start again with --overwrite")
    if resume and paths.checkpoint_path(out).exists():
        progress, last, best = read_checkpoint(out)
    opening = transport.open(out, resume, progress.transport)
    server = opening.server
    best_server = server

    recorded = json.loads(paths.run_config_path(out).read_text(encoding="utf-8")) if resume else {}
    plans = None
    if cfg.dp_epsilon is not None:  # a resumed run keeps the noise it recorded
        plans = recorded_plans(recorded) or plan_run(cfg, opening.trainers)
        transport.use_privacy(plans)
    ledger = _Ledger(plans or {}, dict(progress.dp_steps))
    if last:
        server, best_server = last.pop(SERVER), best.pop(SERVER)
        transport.restore(last, best)
    elif not resume:
        write_json(paths.run_config_path(out), run_record(
            cfg, spec, clients={s.name: {"n_train": s.n_train, "n_val": s.n_val} for s in opening.sites},
            privacy=run_privacy_record(plans) if plans else None, **opening.record))
    kept = _truncate_rounds_log(out, progress.round)
    total_up = sum(c["bytes_up"] for r in kept for c in r["clients"].values())
    total_down = sum(c["bytes_down"] for r in kept for c in r["clients"].values())
    names = [s.name for s in opening.sites]
    analytic = int(opening.record["analytic"])
    stopped: dict[str, Any] | None = None

    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{spec.name}: rounds", total=cfg.rounds, completed=progress.round)
        for round_index in range(progress.round + 1, cfg.rounds + 1):
            asked = participants(names, cfg.sites_per_round, cfg.seed, round_index)
            if plans and not ledger.fits(list(opening.trainers) if spec.pooled else asked):
                stopped = {"round": round_index,
                           "reason": f"privacy budget: round {round_index} would take a site past "
                                     f"epsilon {cfg.dp_epsilon:g}; the run ends at round {progress.round}"}
                break
            started = time.perf_counter()
            bar.update(task, description=f"{spec.name}: round {round_index}")
            exchange = Exchange()
            transport.train(round_index, asked, server, exchange)
            fault_point("federate.trained")  # the sites have trained, nothing of the round is kept
            needed = len(asked) if min_sites is None else min_sites
            if len(exchange.results) < needed and not spec.pooled:
                failures = "; ".join(f"{k}: {v}" for k, v in exchange.failed.items())
                stopped = {"round": round_index,
                           "reason": f"round {round_index}: {len(exchange.results)} of {len(asked)} sites "
                                     f"asked answered, --min-sites is {needed} ({failures})"}
                break
            server = _aggregate(spec, exchange.results, server)
            if spec.federated and num_params(server) != analytic:
                raise DataError(f"the aggregate has {num_params(server)} values, the analytic count "
                                f"{analytic}")
            transport.evaluate(round_index, server, exchange)
            ledger.add(exchange.dp_steps)
            record = round_record(round_index, _entries(opening.sites, exchange, spec, server),
                                  time.perf_counter() - started, cfg.select, participants=asked,
                                  failed=exchange.failed)
            if plans:
                record["privacy"] = ledger.record()
            total_up += sum(exchange.up.values())
            total_down += sum(exchange.down.values())
            progress.round = round_index
            if has_score(record) and selection_score(record) > progress.best_score:
                progress.best_round, progress.best_score = round_index, selection_score(record)
                best_server = {k: v.clone() for k, v in server.items()}
                transport.keep_best(round_index)
            append_round(out, record)
            fault_point("federate.round-logged")
            progress.dp_steps = dict(ledger.steps)
            site_last, site_best, progress.transport = transport.checkpoint()
            _write_checkpoint(out, progress, {**site_last, SERVER: server},
                              {**site_best, SERVER: best_server})
            bar.update(task, advance=1)
            console.print(round_line(record), highlight=False)
            for site, reason in exchange.failed.items():
                console.print(f"round {round_index}: {site} failed ({reason})", highlight=False)

    if progress.round == 0 and stopped is not None:
        raise DataError(f"the run stopped before any round completed: {stopped['reason']}")
    if progress.best_round == 0:  # no validation data anywhere: the last round is the best we know
        progress.best_round, best_server = progress.round, server
        transport.keep_best(progress.round)
    save_tensors(paths.shared_tensors_path(out, "final"), server)
    fault_point("federate.final-write")
    save_tensors(paths.shared_tensors_path(out, "best"), best_server)
    for site, reason in transport.finalize(out, progress.round, progress.best_round).items():
        console.print(f"{site} could not write its private tensors: {reason}", highlight=False)
    write_result(out, progress.round, progress.best_round, progress.best_score, total_up, total_down,
                 cfg.select, privacy=ledger.record() if plans else None, stopped=stopped)
    if stopped is not None:
        console.print(f"stopped: {stopped['reason']}; the run keeps round {progress.round}, the last "
                      "completed one", highlight=False)
    transport.report(out)
    return RunSummary(out, progress.round, progress.best_round, progress.best_score, total_up, total_down)


def _aggregate(spec: MethodSpec, results: list[FitResult], server: TensorState) -> TensorState:
    """The new shared state: FedAvg of what the sites sent; the pooled trainer's own tensors
    (``central``); unchanged when nothing travels (``local``)."""
    if spec.federated:
        return FedAvg().aggregate(results)
    if spec.pooled:
        return {k: v.clone() for k, v in results[0].shared.items()}
    return server


def _entries(sites: list[Site], exchange: Exchange, spec: MethodSpec,
             server: TensorState) -> dict[str, dict[str, Any]]:
    """A rounds.jsonl entry for every site: NaN train loss for those that did not train."""
    params = num_params(server) if spec.federated else 0
    return {
        site.name: client_round_record(
            train_loss=exchange.losses.get(site.name, math.nan), n_train=site.n_train,
            val=exchange.val.get(site.name, {}), bytes_up=exchange.up.get(site.name, 0),
            bytes_down=exchange.down.get(site.name, 0), params=params)
        for site in sites
    }
