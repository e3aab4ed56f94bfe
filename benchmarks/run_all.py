"""Every benchmark of cmrfed in one command; prints each markdown table and writes it under
benchmarks/results/ (benchmarks/results/quick/ with ``--quick``), each file headed by the machine.

Run: ``python benchmarks/run_all.py [--quick] [--threads N]``. ``--quick`` (a few minutes): small
size only, fewer rounds and repeats. The full run (about 25 minutes on two CPU cores, and some 15
more for bench_dp) adds the base size. All benchmarks but bench_dp (which needs more subjects)
share one synthetic cohort (and so its frozen-trunk caches), prepared in a temporary folder that
is removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_augment
import bench_cache
import bench_comm
import bench_dp
import bench_lora
import bench_memory
import bench_optimizer
import bench_precision
import bench_probe
import bench_scaling
from common import Machine, Suite, show, write_results
from rich.console import Console
from rich.rule import Rule

# the cheap, load-insensitive table first. Standalone only: bench_gpu (a prepared GPU script) and
# bench_demo (whole demos, one variant per invocation).
MODULES = (bench_comm, bench_optimizer, bench_cache, bench_augment, bench_lora, bench_scaling, bench_memory,
           bench_precision, bench_probe, bench_dp)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small size only, fewer rounds (minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every timing (default 1: see results/cache.md)")
    args = parser.parse_args()
    console = Console()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmrfed-bench-") as scratch:
        suite = Suite(args.quick, Path(scratch), console, threads=args.threads)
        for module in MODULES:
            console.print(Rule(module.TITLE))
            machine = Machine()
            body = module.run(suite)
            show(console, body, write_results(suite.results, module.NAME, machine, module.TITLE, body))
    console.print(f"all benchmarks done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
