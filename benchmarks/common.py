"""Shared pieces of the benchmark suite: the machine header, synthetic cohorts, a timing probe
around ``federate`` and markdown tables.

The engine records one wall time per round. The benchmarks also need CPU time per round, the
moment set-up ends and the time spent building or reading the frozen-trunk cache; rather than
add benchmark hooks to the engine, :func:`timed_federate` wraps three of the functions it calls
(``build_clients``, ``append_round``, ``load_or_compute``) for the duration of one run.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console

import cmrfed
from cmrfed import paths
from cmrfed.atomic import atomic_file
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.shards import load_manifest
from cmrfed.data.synth import write_synthetic_cohort
from cmrfed.fed import inprocess, rounds, task
from cmrfed.fed.config import FederateConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- the machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


@dataclass
class Machine:
    """What a reader needs to compare these numbers with theirs (and nothing that names a path)."""

    started: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    load_at_start: str = field(default_factory=load_average)
    load_at_end: str = ""

    def finish(self) -> None:
        self.load_at_end = load_average()

    def header(self, title: str) -> str:
        cores = os.cpu_count()
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
        lines = [
            f"# {title}",
            "",
            f"- CPU: {cpu_model()}, {cores} logical cores ({usable} usable by this process)",
            f"- GPU: {gpu_name() or 'none'}",
            f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
            f"Python {platform.python_version()}; cmrfed {cmrfed.__version__}",
            f"- date: {self.started}",
            f"- load average (1 / 5 / 15 min) at start: {self.load_at_start}; at end: "
            f"{self.load_at_end or load_average()}",
            "",
            "",
        ]
        return "\n".join(lines)


# --- synthetic cohorts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortSpec:
    """A synthetic cohort and how it is prepared (every benchmark states the one it used)."""

    subjects: int = 16  # per dataset (ACDC, M&Ms-1, M&Ms-2)
    shape: tuple[int, int, int] = (64, 64, 8)  # prepared input, X, Y, Z
    spacing: tuple[float, float, float] = (2.0, 2.0, 10.0)
    synth_shape: tuple[int, int, int] = (80, 80, 8)  # nominal matrix of the synthetic scans
    frames: int = 8
    seed: int = 0

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape))
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        return (f"synthetic cohort, {self.subjects} subjects per dataset (3 datasets), prepared at "
                f"{shape} voxels of {spacing} mm (seed {self.seed})")


def make_cohort(root: Path, spec: CohortSpec, tables: Path | None = None) -> Path:
    """synth -> prepare under ``root``; returns the prepared folder. ``tables`` remaps vendors to
    clients (the clients-scaling benchmark)."""
    raw = root / "raw"
    if not raw.exists():
        write_synthetic_cohort(raw, seed=spec.seed, subjects=spec.subjects, shape=spec.synth_shape,
                               frames=spec.frames)
    prepared = root / "prepared"
    prepare(PrepareOptions(out=prepared, acdc=raw / "acdc", mnms=raw / "mnms", mnms2=raw / "mnms2",
                           spacing=spec.spacing, shape=spec.shape, seed=spec.seed, tables=tables,
                           overwrite=True), console=Console(quiet=True))
    return prepared


def drop_cache(prepared: Path) -> None:
    """Delete every frozen-trunk cache of a prepared folder (the next cached run builds it)."""
    shutil.rmtree(paths.feature_cache_dir(prepared), ignore_errors=True)


# --- timing one federate run ---------------------------------------------------------------------
@dataclass(frozen=True)
class Stamp:
    wall: float
    cpu: float

    @staticmethod
    def now() -> Stamp:
        return Stamp(time.perf_counter(), time.process_time())

    def __sub__(self, other: Stamp) -> Stamp:
        return Stamp(self.wall - other.wall, self.cpu - other.cpu)


@dataclass
class RunTiming:
    """Wall and CPU seconds of one ``federate`` run, split into phases.

    ``setup`` is from the call to the end of ``build_clients`` (model build, data load and the
    cache build or read); round i spans the round lines i - 1 to i, so it includes the previous
    round's checkpoint write, which every round pays.
    """

    setup: Stamp | None = None
    cache: Stamp = Stamp(0.0, 0.0)
    rounds: list[Stamp] = field(default_factory=list)
    total: Stamp | None = None

    @property
    def steady_rounds(self) -> list[Stamp]:
        """Rounds after the first (which pays one-off warm-up), or the only one."""
        return self.rounds[1:] or self.rounds


@contextmanager
def _wrapped(module: ModuleType, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
             ) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def timed_federate(cfg: FederateConfig, out: Path, device: str = "cpu",
                   on_round: Callable[[int], None] | None = None) -> RunTiming:
    """Run ``federate`` once (replacing ``out``) and time its phases; ``on_round(i)`` is called
    when set-up ends (i = 0) and after each round i is logged (the profiler starts and stops there)."""
    timing = RunTiming()
    notify = on_round or (lambda _: None)
    start = Stamp.now()
    marks = [start]

    def after_setup(build: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            result = build(*args, **kwargs)
            marks[0] = Stamp.now()
            timing.setup = marks[0] - start
            notify(0)
            marks[0] = Stamp.now()
            return result
        return run

    def round_logged(append: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            timing.rounds.append(Stamp.now() - marks[0])
            notify(len(timing.rounds))
            marks[0] = Stamp.now()
            return append(*args, **kwargs)
        return run

    def cache_timer(load: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            begin = Stamp.now()
            result = load(*args, **kwargs)
            spent = Stamp.now() - begin
            timing.cache = Stamp(timing.cache.wall + spent.wall, timing.cache.cpu + spent.cpu)
            return result
        return run

    with (_wrapped(inprocess, "build_clients", after_setup),
          _wrapped(rounds, "append_round", round_logged),
          _wrapped(task, "load_or_compute", cache_timer)):
        inprocess.federate(cfg, out, device=device, overwrite=True, console=Console(quiet=True))
    timing.total = Stamp.now() - start
    return timing


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (a pool's or a study's
    workers): unlike wall time, it does not depend on what else the machine is running."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- tables --------------------------------------------------------------------------------------
def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    def align(index: int) -> str:
        sample = rows[0][index] if rows else ""
        return "---:" if isinstance(sample, int | float) or _numeric(str(sample)) else "---"

    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join(align(i) for i in range(len(columns))) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("x", "").replace("%", "").strip()
    try:
        float(stripped)
    except ValueError:
        return False
    return True


THREADS_NOTE = (
    "Threads: every timing here uses {threads} intra-op thread(s) (``--threads``). On a shared "
    "machine, torch's threads wait at every op's barrier for a sibling the scheduler has taken "
    "away, which slows the many small ops of a cached step far more than the big ops of a plain "
    "one; one thread per process keeps the comparison about the arithmetic (see cache.md)."
)


def write_results(out_dir: Path, name: str, machine: Machine, title: str, body: str) -> Path:
    """``out_dir/name.md``: the machine header, then the body; written atomically."""
    machine.finish()
    path = out_dir / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        note = THREADS_NOTE.format(threads=torch.get_num_threads())
        tmp.write_text(machine.header(title) + note + "\n\n" + body.rstrip() + "\n", encoding="utf-8")
    return path


# --- one run of the suite ------------------------------------------------------------------------
@dataclass
class Suite:
    """What every benchmark module gets: the mode, a scratch folder, the console and the main
    cohort (prepared once and shared, so its frozen-trunk caches are too)."""

    quick: bool
    scratch: Path
    console: Console
    threads: int = 1
    cohort: CohortSpec = CohortSpec()
    _prepared: Path | None = None

    def __post_init__(self) -> None:
        torch.set_num_threads(self.threads)

    @property
    def results(self) -> Path:
        """Where this mode's results go (quick runs never overwrite the full results)."""
        return RESULTS_DIR / "quick" if self.quick else RESULTS_DIR

    @property
    def prepared(self) -> Path:
        if self._prepared is None:
            self._prepared = make_cohort(self.scratch / "main-cohort", self.cohort)
        return self._prepared

    def sizes(self) -> tuple[str, ...]:
        return ("small",) if self.quick else ("small", "base")


def split_counts(prepared: Path) -> tuple[int, int]:
    """(train, val) subjects over all clients of a prepared folder."""
    subjects = load_manifest(prepared).subjects
    return (sum(1 for s in subjects if s.split == "train"), sum(1 for s in subjects if s.split == "val"))


def show(console: Console, body: str, path: Path) -> None:
    """Print the markdown source (copyable as is) and where it was written."""
    console.print(body, markup=False, highlight=False, soft_wrap=True)
    console.print(f"written: benchmarks/results/{path.relative_to(RESULTS_DIR)}")


def standalone(name: str, title: str, run: Callable[[Suite], str], description: str) -> None:
    """The ``main`` of a benchmark module run on its own."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small size only, fewer rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    console = Console()
    machine = Machine()
    with tempfile.TemporaryDirectory() as scratch:
        suite = Suite(args.quick, Path(scratch), console, threads=args.threads)
        body = run(suite)
    show(console, body, write_results(suite.results, name, machine, title, body))
