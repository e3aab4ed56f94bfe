"""``cmrfed study --jobs 2`` against ``--jobs 1`` on two small studies.

Run: ``python benchmarks/bench_jobs.py``. Each level is one study of 3 methods x 2 seeds (6 cells,
2 adapted blocks) on its own synthetic cohort, run with ``--jobs 1`` (the study process with every
core's thread) and ``--jobs 2`` (two workers, each with half the threads), cache built first and
shared by both; the reports are checked equal (timings aside) and the wall and CPU seconds (study
process and workers) compared.

- ``toy``: 32 x 32 x 4, 16 subjects per dataset, tiny random backbone, rank 4, 3 rounds: cells of
  about a second, where a worker's start-up is of the same order as its work.
- ``demo cells``: 64 x 64 x 8, 16 subjects per dataset, the demo study's federate settings
  (tiny-pretrained, rank 8, 10 rounds, 3 local epochs, batch 8, precision auto): cells of several
  seconds.

Hypotheses, fixed before the demo-cells level was first run: (1) on toy cells ``--jobs 2`` is no
faster than ``--jobs 1`` (start-up dominates); (2) on demo cells ``--jobs 2`` takes less wall time
than ``--jobs 1`` on 2 idle cores, because a cell's many small ops scale worse over two threads of
one process than over two one-thread processes. The first two runs of that level, one pair each,
gave 0.98x and 1.15x: within each other's noise, so the benchmark now alternates three pairs per
level and reads the medians (the hypotheses unchanged).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    RESULTS_DIR,
    CohortSpec,
    Machine,
    cpu_seconds,
    make_cohort,
    markdown_table,
    median,
    show,
    write_results,
)
from rich.console import Console

from cmrfed import paths
from cmrfed.study.config import parse_study
from cmrfed.study.runner import run_study

NAME = "jobs"
TITLE = "study --jobs 2 against --jobs 1"


@dataclass(frozen=True)
class Level:
    """One study size: its cohort, its [federate] keys and its rank."""

    name: str
    cohort: CohortSpec
    federate: str
    rank: int
    describe: str


LEVELS = (
    Level("toy", CohortSpec(subjects=16, shape=(32, 32, 4), spacing=(4.0, 4.0, 10.0),
                            synth_shape=(48, 48, 6)),
          'backbone = "tiny"\nrounds = 3\naugment = "none"\n', 4,
          "tiny random backbone, rank 4, 3 rounds"),
    Level("demo cells", CohortSpec(),
          'backbone = "tiny-pretrained"\nrounds = 10\nlocal-epochs = 3\nbatch-size = 8\nlr = 3e-3\n'
          'augment = "none"\nprecision = "auto"\n', 8,
          "tiny-pretrained, rank 8, 10 rounds, 3 local epochs, batch 8, precision auto (the demo's cells)"),
)


def study_text(prepared: Path, level: Level) -> str:
    return f"""
[data]
prepared = "{prepared}"
[federate]
{level.federate}device = "cpu"
[grid]
methods = ["duallora", "fedlora", "ffalora"]
seeds = [0, 1]
blocks = [2]
ranks = [{level.rank}]
[evaluate]
n-boot = 100
"""


def _numbers(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _numbers(v) for k, v in doc.items() if k not in ("seconds_per_round", "versions")}
    if isinstance(doc, list):
        return [_numbers(v) for v in doc]
    return doc


REPEATS = 3  # alternating --jobs 1 / --jobs 2 pairs per level; a row is the median of its repeats


def measure(level: Level, scratch: Path) -> tuple[list[list[str]], float, list[float], bool]:
    """Rows (jobs, median wall, CPU, phases' CPU) of one level, its median wall-time speed-up, the
    speed-up of each repeat, and whether every report equals the first (timings aside)."""
    runs: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
    reports = []
    prepared = make_cohort(scratch / "cohort", level.cohort)
    study = parse_study(study_text(prepared, level), "bench_jobs", scratch)
    run_study(study, scratch / "warm", jobs=1, console=Console(quiet=True))  # builds the cache
    for repeat in range(REPEATS):
        for jobs in (1, 2):
            cpu, wall = cpu_seconds(), time.perf_counter()
            result = run_study(study, scratch / f"jobs{jobs}-{repeat}", jobs=jobs,
                               console=Console(quiet=True))
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            reports.append(_numbers(json.loads((result.report.out / "report.json").read_text())))
            record = json.loads(paths.study_record_path(result.out).read_text())
            runs[jobs].append((wall, cpu, sum(p["cpu_s"] for p in record["timings"].values())))
    rows = [[level.name, str(jobs), *(f"{median([r[i] for r in runs[jobs]]):.1f}" for i in range(3))]
            for jobs in (1, 2)]
    each = [one[0] / two[0] for one, two in zip(runs[1], runs[2], strict=True)]
    speed_up = median([r[0] for r in runs[1]]) / median([r[0] for r in runs[2]])
    return rows, speed_up, each, all(r == reports[0] for r in reports)


def main() -> None:
    console, machine = Console(), Machine()
    rows, lines, speed_up = [], [], {}
    for level in LEVELS:
        with tempfile.TemporaryDirectory() as scratch:
            level_rows, speed_up[level.name], each, same = measure(level, Path(scratch))
        rows += level_rows
        lines.append(f"- {level.name}: {level.cohort.describe()}; {level.describe}. Wall-time speed-up of "
                     f"--jobs 2: {speed_up[level.name]:.2f}x (medians; per repeat "
                     f"{', '.join(f'{x:.2f}x' for x in each)}); reports equal (timings aside): {same}.")
    # the verdicts read the hypotheses in the docstring against this run's ratios
    verdict = {True: "held", False: "did not hold"}
    lines.append(f"- Hypothesis 1 (toy: --jobs 2 no faster): {verdict[speed_up['toy'] <= 1.0]}. "
                 f"Hypothesis 2 (demo cells: --jobs 2 takes less wall time): "
                 f"{verdict[speed_up['demo cells'] > 1.0]}.")
    body = "\n".join([
        __doc__.split("\n\n", 1)[1].strip(), "",
        f"3 methods x 2 seeds, 2 adapted blocks (6 cells), CPU; {REPEATS} alternating repeats, medians. "
        f"{torch.get_num_threads()} threads in the "
        "study process; workers take cores // jobs each. Bitwise equal reports need equal thread "
        "counts, which tests/test_study.py pins; here --jobs 1 has every core's threads.", "",
        markdown_table(["level", "--jobs", "wall s", "CPU s (getrusage, workers incl.)", "CPU s (phases)"],
                       rows),
        "", *lines])
    show(console, body, write_results(RESULTS_DIR, NAME, machine, TITLE, body))


if __name__ == "__main__":
    main()
