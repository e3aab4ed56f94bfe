"""Where a study's time goes: wall and CPU seconds per phase (synth, prepare, cache, federate,
evaluate, adapt, compare, report).

CPU time is the process's user + system time (``time.process_time``), summed over the worker
processes of ``--jobs N``: on a machine shared with other work it measures this study's own
cost, where wall time also measures the neighbours. study.json records the table of each
invocation (``timings``); it never enters the report, which is identical whatever the timings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.table import Table

PHASES = ("synth", "prepare", "cache", "federate", "evaluate", "adapt", "compare", "report")


@dataclass
class PhaseTimes:
    """Seconds per phase; ``wall`` sums each phase's intervals (over workers too, so with
    ``--jobs N`` it can exceed the study's elapsed time)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as one interval of phase ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - wall, time.process_time() - cpu)

    def add(self, name: str, wall: float, cpu: float, count: int = 1) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu
        self.count[name] = self.count.get(name, 0) + count

    def merge(self, other: PhaseTimes) -> None:
        for name in other.wall:
            self.add(name, other.wall[name], other.cpu[name], other.count[name])

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"wall_s": round(self.wall[name], 3), "cpu_s": round(self.cpu[name], 3),
                       "count": self.count[name]} for name in self.ordered()}

    def ordered(self) -> list[str]:
        return sorted(self.wall, key=lambda n: (PHASES.index(n) if n in PHASES else len(PHASES), n))

    def table(self, title: str, elapsed: float | None = None) -> Table:
        """Phase, intervals, CPU seconds and share of the CPU total, wall seconds."""
        table = Table(title=title)
        for column in ("phase", "intervals", "CPU s", "CPU share", "wall s"):
            table.add_column(column, justify="left" if column == "phase" else "right")
        total = sum(self.cpu.values()) or 1.0
        for name in self.ordered():
            table.add_row(name, str(self.count[name]), f"{self.cpu[name]:.1f}",
                          f"{self.cpu[name] / total:.0%}", f"{self.wall[name]:.1f}")
        table.add_row("total", "", f"{sum(self.cpu.values()):.1f}", "100%",
                      f"{elapsed:.1f} elapsed" if elapsed is not None else f"{sum(self.wall.values()):.1f}")
        return table
