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
from cmrfed.fed.privacy import (
    BUDGET_RTOL,
    SitePlan,
    class_balance_line,
    plan_run,
    recorded_plans,
    run_privacy_record,
)
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
    ``record``: the engine's own run.json fields (:func:`cmrfed.fed.runlog.run_record` keywords);
    ``precision``: what the sites resolved ``--precision`` to, which run.json records.
    """

    sites: list[Site]
    trainers: dict[str, int]
    server: TensorState
    record: dict[str, Any]
    precision: str | None = None  # the forward pass's precision as the sites resolved ``auto``


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

    def use_privacy(self, plans: Mapping[str, SitePlan]) -> dict[str, SitePlan]:
        """Every trainer runs DP-SGD with its plan from now on; returns the plans as far as the
        server knows them (with the released label counts when the sites are here)."""

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
    run = _Run(cfg, Path(out), transport, resume, min_sites, console or Console())
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=run.console, transient=True) as bar:
        task = bar.add_task(f"{run.spec.name}: rounds", total=run.cfg.rounds, completed=run.progress.round)
        for round_index in range(run.progress.round + 1, run.cfg.rounds + 1):
            bar.update(task, description=f"{run.spec.name}: round {round_index}")
            if not run.play(round_index):
                break
            bar.update(task, advance=1)
    return run.finish()


def _check_resumable(out: Path, cfg: FederateConfig) -> dict[str, Any]:
    """The run.json of the run ``--resume`` continues, refused when its options differ from
    ``cfg`` or its checkpoint is of a format this version cannot continue."""
    if not paths.run_config_path(out).exists():
        raise UsageError(f"{out}: no run.json to resume; start the run without --resume")
    if (paths.checkpoint_dir(out) / "progress.json").exists():
        raise DataError(f"{paths.checkpoint_dir(out)}: a checkpoint of an older cmrfed (format 1) "
                        "that this version cannot continue; start again with --overwrite")
    recorded = json.loads(paths.run_config_path(out).read_text(encoding="utf-8"))
    ours, theirs = cfg.to_dict(), FederateConfig.from_dict(recorded["config"]).to_dict()
    differ = sorted(k for k, v in ours.items() if theirs.get(k) != v)
    if differ:
        raise UsageError(f"{out}: --resume with options that differ from the run ({differ})")
    return recorded


class _Run:
    """One run's state between rounds: what the checkpoint holds, the DP ledger, byte totals."""

    def __init__(self, cfg: FederateConfig, out: Path, transport: Transport, resume: bool,
                 min_sites: int | None, console: Console) -> None:
        self.out, self.transport, self.min_sites, self.console = out, transport, min_sites, console
        self.spec = resolve_method(cfg.method, cfg.head)
        self.progress, last, best = _Progress(), {}, {}
        if resume and paths.checkpoint_path(out).exists():
            progress, last, best = read_checkpoint(out)
            self.progress = progress
        opening = transport.open(out, resume, self.progress.transport)
        self.cfg = cfg if opening.precision is None else cfg.in_precision(opening.precision)
        recorded = _check_resumable(out, self.cfg) if resume else {}
        self.sites, self.trainers = opening.sites, opening.trainers
        self.analytic = int(opening.record["analytic"])
        self.server = self.best_server = opening.server
        self.plans: dict[str, SitePlan] = {}
        if self.cfg.dp_epsilon is not None:  # a resumed run keeps the noise it recorded
            self.plans = transport.use_privacy(recorded_plans(recorded) or plan_run(self.cfg, self.trainers))
            console.print(class_balance_line(self.plans), highlight=False)
        self.ledger = _Ledger(self.plans, dict(self.progress.dp_steps))
        if last:
            self.server, self.best_server = last.pop(SERVER), best.pop(SERVER)
            transport.restore(last, best)
        elif not resume:
            write_json(paths.run_config_path(out), run_record(
                self.cfg, self.spec,
                clients={s.name: {"n_train": s.n_train, "n_val": s.n_val} for s in self.sites},
                privacy=run_privacy_record(self.plans) if self.plans else None, **opening.record))
        kept = _truncate_rounds_log(out, self.progress.round)
        self.total_up = sum(c["bytes_up"] for r in kept for c in r["clients"].values())
        self.total_down = sum(c["bytes_down"] for r in kept for c in r["clients"].values())
        self.stopped: dict[str, Any] | None = None

    def _stop(self, round_index: int, reason: str) -> bool:
        self.stopped = {"round": round_index, "reason": reason}
        return False

    def play(self, round_index: int) -> bool:
        """One round: ask, collect, aggregate, validate, record. False: the run stops here."""
        cfg, spec = self.cfg, self.spec
        asked = participants([s.name for s in self.sites], cfg.sites_per_round, cfg.seed, round_index)
        if self.plans and not self.ledger.fits(list(self.trainers) if spec.pooled else asked):
            return self._stop(round_index, f"privacy budget: round {round_index} would take a site past "
                                           f"epsilon {cfg.dp_epsilon:g}; the run ends at round "
                                           f"{self.progress.round}")
        started = time.perf_counter()
        exchange = Exchange()
        self.transport.train(round_index, asked, self.server, exchange)
        fault_point("federate.trained")  # the sites have trained, nothing of the round is kept
        needed = len(asked) if self.min_sites is None else self.min_sites
        if len(exchange.results) < needed and not spec.pooled:
            failures = "; ".join(f"{k}: {v}" for k, v in exchange.failed.items())
            return self._stop(round_index, f"round {round_index}: {len(exchange.results)} of {len(asked)} "
                                           f"sites asked answered, --min-sites is {needed} ({failures})")
        self.server = _aggregate(spec, cfg.aggregate, exchange.results, self.server)
        if spec.federated and num_params(self.server) != self.analytic:
            raise DataError(f"the aggregate has {num_params(self.server)} values, the analytic count "
                            f"{self.analytic}")
        self.transport.evaluate(round_index, self.server, exchange)
        self.ledger.add(exchange.dp_steps)
        record = round_record(round_index, _entries(self.sites, exchange, spec, self.server),
                              time.perf_counter() - started, cfg.select, participants=asked,
                              failed=exchange.failed)
        if self.plans:
            record["privacy"] = self.ledger.record()
        self._record(round_index, record, exchange)
        return True

    def _record(self, round_index: int, record: dict[str, Any], exchange: Exchange) -> None:
        """Byte totals, the best round, rounds.jsonl and the checkpoint of a completed round."""
        progress = self.progress
        self.total_up += sum(exchange.up.values())
        self.total_down += sum(exchange.down.values())
        progress.round = round_index
        if has_score(record) and selection_score(record) > progress.best_score:
            progress.best_round, progress.best_score = round_index, selection_score(record)
            self.best_server = {k: v.clone() for k, v in self.server.items()}
            self.transport.keep_best(round_index)
        append_round(self.out, record)
        fault_point("federate.round-logged")
        progress.dp_steps = dict(self.ledger.steps)
        site_last, site_best, progress.transport = self.transport.checkpoint()
        _write_checkpoint(self.out, progress, {**site_last, SERVER: self.server},
                          {**site_best, SERVER: self.best_server})
        self.console.print(round_line(record), highlight=False)
        for site, reason in exchange.failed.items():
            self.console.print(f"round {round_index}: {site} failed ({reason})", highlight=False)

    def finish(self) -> RunSummary:
        """The final writes: shared tensors of the final and best rounds, the sites' private ones,
        and run.json's ``result``."""
        progress, out = self.progress, self.out
        if progress.round == 0 and self.stopped is not None:
            raise DataError(f"the run stopped before any round completed: {self.stopped['reason']}")
        if progress.best_round == 0:  # no validation data anywhere: the last round is the best we know
            progress.best_round, self.best_server = progress.round, self.server
            self.transport.keep_best(progress.round)
        save_tensors(paths.shared_tensors_path(out, "final"), self.server)
        fault_point("federate.final-write")
        save_tensors(paths.shared_tensors_path(out, "best"), self.best_server)
        for site, reason in self.transport.finalize(out, progress.round, progress.best_round).items():
            self.console.print(f"{site} could not write its private tensors: {reason}", highlight=False)
        write_result(out, progress.round, progress.best_round, progress.best_score, self.total_up,
                     self.total_down, self.cfg.select, privacy=self.ledger.record() if self.plans else None,
                     stopped=self.stopped)
        if self.stopped is not None:
            self.console.print(f"stopped: {self.stopped['reason']}; the run keeps round {progress.round}, "
                               "the last completed one", highlight=False)
        self.transport.report(out)
        return RunSummary(out, progress.round, progress.best_round, progress.best_score, self.total_up,
                          self.total_down)


def _aggregate(spec: MethodSpec, rule: str, results: list[FitResult], server: TensorState) -> TensorState:
    """The new shared state: FedAvg of what the sites sent (client weights by ``--aggregate``
    ``rule``); the pooled trainer's own tensors (``central``); unchanged when nothing travels
    (``local``)."""
    if spec.federated:
        return FedAvg(rule).aggregate(results)
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
