"""Throughput of ``cmrfed prepare`` with 1 and 2 worker processes on a synthetic cohort.

Run: ``python benchmarks/bench_prepare.py [--subjects 24] [--synth-shape 96,96,8]``. Prints a table
of subjects per second per worker count, the speed-up and the shard bytes per subject (uint8
images, as CineMA stores them), and checks that both runs wrote the same shards (results must not
depend on the worker count). The speed-up needs idle cores: on a
busy machine compare the CPU seconds per subject instead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import Machine, cpu_seconds, markdown_table, write_results
from rich.console import Console
from rich.table import Table

from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth import write_synthetic_cohort
from cmrfed.paths import SHARDS_DIR

COLUMNS = ("workers", "subjects", "wall s", "subjects / s", "speed-up vs first", "CPU s / subject",
           "shard KiB / subject")


def _triple(text: str, kind: type) -> tuple:
    return tuple(kind(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=24, help="synthetic subjects per dataset")
    parser.add_argument("--synth-shape", default="96,96,8", help="nominal synthetic matrix")
    parser.add_argument("--spacing", default="1,1,10", help="prepare --spacing")
    parser.add_argument("--shape", default="192,192,16", help="prepare --shape")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    args = parser.parse_args()
    console = Console()
    machine = Machine()
    worker_counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        cohort = Path(scratch) / "cohort"
        write_synthetic_cohort(cohort, seed=0, subjects=args.subjects, shape=_triple(args.synth_shape, int))
        rows = []
        for workers in worker_counts:
            options = PrepareOptions(
                out=Path(scratch) / f"prepared-{workers}", acdc=cohort / "acdc", mnms=cohort / "mnms",
                mnms2=cohort / "mnms2", spacing=_triple(args.spacing, float), shape=_triple(args.shape, int),
                workers=workers,
            )
            cpu_before, start = cpu_seconds(), time.perf_counter()
            result = prepare(options, console=Console(quiet=True))
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
            size = sum(path.stat().st_size for path in (options.out / SHARDS_DIR).glob("*.h5"))
            rows.append((workers, len(result.manifest["subjects"]), seconds, cpu, size,
                         result.manifest["shards"]))

    base_rate = rows[0][1] / rows[0][2]
    table = Table(title=f"cmrfed prepare, {args.subjects} synthetic subjects per dataset, "
                        f"--shape {args.shape} --spacing {args.spacing} ({os.cpu_count()} CPUs)")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for workers, subjects, seconds, cpu, size, _ in rows:
        rate = subjects / seconds
        table.add_row(str(workers), str(subjects), f"{seconds:.2f}", f"{rate:.2f}",
                      f"{rate / base_rate:.2f}x", f"{cpu / subjects:.3f}", f"{size / subjects / 1024:.1f}")
    console.print(table)
    identical = all(row[-1] == rows[0][-1] for row in rows)
    console.print(f"identical shards across worker counts: {identical}")
    body = (f"{args.subjects} synthetic subjects per dataset, prepared to --shape {args.shape} "
            f"--spacing {args.spacing}.\n\n" + markdown_table(
                COLUMNS,
                [(w, n, f"{t:.2f}", f"{n / t:.2f}", f"{n / t / base_rate:.2f}x", f"{c / n:.3f}",
                  f"{b / n / 1024:.1f}") for w, n, t, c, b, _ in rows])
            + f"\n\nIdentical shards across worker counts: {identical}.\n")
    path = write_results(Path(__file__).parent / "results", "prepare", machine,
                         "cmrfed prepare: subjects per second by worker count", body)
    console.print(f"written: {path.relative_to(Path(__file__).parent.parent)}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
