"""The work of one study cell, in this process or in worker processes (``cmrfed study --jobs N``).

A cell's work is a pure function of its configuration and its inputs (train, evaluate, and for
a participation cell score its held-out site), written into the cell's own run and newcomer
folders, so cells can run in any order and at once: the report, built afterwards from the
folders, is the same as a serial study's. What must not happen at once is building the
frozen-trunk cache (two workers would compute the same file), so the study builds every cache
file its cells read before any cell starts (:func:`build_caches`).

Workers are separate processes (``spawn``: a fresh interpreter, no inherited threads or locks),
each with ``max(1, cores // N)`` torch threads, so N workers use the machine's cores once. A
worker kills itself when the study process dies (a watchdog thread), so a killed study never
leaves workers writing into folders the resumed study will use. With ``--devices 0,1`` cell k
runs on ``cuda:<devices[k mod len(devices)]>``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from cmrfed.data.augment import augment_spec
from cmrfed.data.shards import Manifest
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.faults import fault_point
from cmrfed.fed.cache import CacheKey, precompute
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.task import RunModel, build_client, build_run_model, cache_key, resolve_device, uses_cache
from cmrfed.fed.views import CachedViews
from cmrfed.study.config import StudyConfig
from cmrfed.study.newcomers import Newcomer, score_newcomer
from cmrfed.study.plan import Cell
from cmrfed.study.timing import PhaseTimes

PENDING, TRAINING, TRAINED, COMPLETE = "pending", "training", "trained", "complete"


@dataclass(frozen=True)
class CellJob:
    """What one cell still needs: train (or continue) from ``state``, evaluate, score its
    newcomer; a COMPLETE participation cell only has its newcomer folders checked."""

    cell: Cell
    run: Path
    state: str
    device: str
    study: StudyConfig
    prepared: Path
    newcomer: Newcomer | None = None


@dataclass
class CellDone:
    """A cell's outcome: its phase times, and the worker's whole CPU time so far (the parent
    counts what the phases do not cover, the worker's start-up, once per worker)."""

    name: str
    trained: bool
    wall_s: float
    times: PhaseTimes
    pid: int = field(default_factory=os.getpid)
    process_cpu_s: float = field(default_factory=time.process_time)


def run_cell(job: CellJob, console: Console,
             on_trained: Callable[[], None] = lambda: None) -> CellDone:
    """Train, evaluate and score one cell (``on_trained`` runs between training and evaluating)."""
    times, started, trained = PhaseTimes(), time.monotonic(), False
    if job.state in (PENDING, TRAINING):
        resuming = job.state == TRAINING
        with times.phase("federate"):
            federate(job.cell.config, job.run, device=job.device, resume=resuming, overwrite=not resuming,
                     console=console)
        trained = True
        fault_point("study.cell-trained")
        on_trained()
    if job.state != COMPLETE:
        with times.phase("evaluate"):
            evaluate_run(job.run, device=job.device, console=Console(quiet=True), **job.study.evaluate)
        fault_point("study.cell-evaluated")
    if job.newcomer is not None:
        score_newcomer(job.newcomer, job.run, job.prepared, job.study, job.device, console, times)
    return CellDone(job.cell.name, trained, time.monotonic() - started, times)


# --- the frozen-trunk cache, built once before any cell --------------------------------------


def build_caches(cells: tuple[Cell, ...], prepared: Path, manifest: Manifest, device: str) -> int:
    """Compute every trunk cache file (plain features and augmented views) the cells will read,
    for every site of the manifest (a held-out site reads its features when it adapts); return
    how many distinct caches there are. Files already valid are only read.

    Plain features whose keys differ only in the start block (a blocks ablation) are computed in
    one pass of the trunk per site (:func:`cmrfed.fed.cache.precompute`), with the run model that
    adapts the fewest blocks."""
    torch_device = resolve_device(device)
    plain: dict[CacheKey, dict[CacheKey, RunModel]] = {}  # keys alike but for the start block
    views: dict[tuple[Any, ...], tuple[FederateConfig, RunModel]] = {}
    for cell in cells:
        cfg = replace(cell.config, holdout=None).resolved(torch_device)
        run_model = build_run_model(cfg, tuple(manifest.shape))
        if not uses_cache(cfg, run_model):
            continue
        key = cache_key(cfg, run_model, manifest, torch_device)
        plain.setdefault(replace(key, start_block=0), {})[key] = run_model
        if augment_spec(cfg.augment) is not None:
            identity = (key.digest(), cfg.augment, cfg.augment_views, cfg.augment_seed)
            views.setdefault(identity, (cfg, run_model))
    for group in plain.values():
        deepest = max(group, key=lambda k: k.start_block)
        encoder = group[deepest].model.to(torch_device).backbone
        for site in manifest.clients:
            precompute(prepared, site, manifest.shard_sha256[site], encoder, tuple(group), torch_device)
    for cfg, run_model in views.values():
        run_model.model.to(torch_device)
        for site in manifest.clients:
            client, _ = build_client(cfg, prepared, manifest, site, run_model, torch_device)
            if isinstance(client.views, CachedViews):
                client.views.tensors  # noqa: B018 (builds the views file)
    return sum(len(group) for group in plain.values()) + len(views)


# --- worker processes ------------------------------------------------------------------------


def cell_device(device: str, devices: tuple[int, ...], position: int) -> str:
    """The device of the ``position``-th cell: ``cuda:<d>`` round robin over ``devices``."""
    return f"cuda:{devices[position % len(devices)]}" if devices else device


def worker_threads(jobs: int) -> int:
    """Each of ``jobs`` workers' share of this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)  # the study died: stop writing into its folders


def _start_worker(threads: int, parent: int) -> None:
    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _run_in_worker(job: CellJob) -> CellDone:
    return run_cell(job, Console(quiet=True))


class CellPool:
    """``jobs`` worker processes running :func:`run_cell`; results in completion order."""

    def __init__(self, jobs: int) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(worker_threads(jobs), os.getpid()))

    def run(self, jobs: list[CellJob]) -> Iterator[CellDone]:
        pending: set[Future[CellDone]] = {self.executor.submit(_run_in_worker, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()
            self.executor.shutdown(wait=True, cancel_futures=True)


def startup_cpu(results: list[CellDone]) -> float:
    """CPU seconds the workers spent outside the cells' phases (interpreter and torch start-up):
    per worker, its last recorded process CPU time minus the phases it ran."""
    last: dict[int, float] = {}
    phases: dict[int, float] = {}
    for result in results:
        last[result.pid] = max(last.get(result.pid, 0.0), result.process_cpu_s)
        phases[result.pid] = phases.get(result.pid, 0.0) + sum(result.times.cpu.values())
    return sum(max(0.0, last[pid] - phases[pid]) for pid in last)
