"""Peak memory of one federated round per method and size, with and without the cache.

Run: ``python benchmarks/bench_memory.py [--quick]``. A process's peak resident set size can only
grow, so each configuration runs in a fresh child process (this file with ``--child``), which
reports its RSS after the imports, its peak RSS (VmHWM) and, on a GPU, the peak
GPU memory torch allocated. The first cached child of a size builds the cache (its peak includes
the build), later ones read it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from common import Suite, drop_cache, markdown_table, standalone
from rich.console import Console

from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate

NAME = "memory"
TITLE = "Peak memory per method and size"
METHODS = ("duallora", "fedlora", "ffalora", "fedsa")
MIB = 1024 * 1024


def peak_rss_kib() -> float:
    """This process's peak RSS: VmHWM, which exec resets (ru_maxrss keeps the parent's peak
    across fork + exec on Linux, so a child started by a big parent would report the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child(spec: dict[str, object]) -> dict[str, float]:
    """One federated round in this process; memory figures in MiB."""
    torch.set_num_threads(int(spec["threads"]))
    after_import = psutil.Process().memory_info().rss / MIB
    cfg = FederateConfig(data=str(spec["prepared"]), method=str(spec["method"]), blocks=2, rank=8,
                         rounds=1, backbone=str(spec["size"]), cache=bool(spec["cache"]), augment="none")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    federate(cfg, Path(str(spec["out"])), device=device, overwrite=True, console=Console(quiet=True))
    peak_kib = peak_rss_kib()
    gpu = torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else float("nan")
    return {"after_import": after_import, "peak": peak_kib / 1024, "gpu_peak": gpu,
            "seconds": time.perf_counter() - start}


def measure(suite: Suite, size: str, method: str, cache: bool) -> dict[str, float]:
    spec = {"prepared": str(suite.prepared), "method": method, "size": size, "cache": cache,
            "out": str(suite.scratch / "runs" / "memory"), "threads": suite.threads}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(suite: Suite) -> str:
    rows = []
    gpu = torch.cuda.is_available()
    for size in suite.sizes():
        drop_cache(suite.prepared)
        plan = [("duallora", False, "off")] + [(m, True, "read") for m in METHODS]
        plan[1] = ("duallora", True, "built, then read")
        for method, cache, how in plan:
            figures = measure(suite, size, method, cache)
            suite.console.log(f"memory {size} {method} cache={how}: peak {figures['peak']:.0f} MiB")
            rows.append([size, method, how, f"{figures['after_import']:.0f}", f"{figures['peak']:.0f}",
                         f"{figures['peak'] - figures['after_import']:.0f}",
                         f"{figures['gpu_peak']:.0f}" if gpu else "no GPU", f"{figures['seconds']:.1f}"])
    columns = ["size", "method", "cache", "RSS after imports MiB", "peak RSS MiB",
               "peak - imports MiB", "peak GPU MiB", "run s"]
    return (
        "## Peak memory of one federated round\n\n"
        f"{suite.cohort.describe()}; 2 adapted blocks, rank 8, E = 1, batch 8, one round with "
        "validation, every client in one process (the in-process engine). Each row is a fresh "
        "process: peak RSS is its whole life (imports, backbone, data, cache, training).\n\n"
        + markdown_table(columns, rows) + "\n"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.stdout.write(json.dumps(child(json.loads(sys.argv[2]))) + "\n")
        return
    standalone(NAME, TITLE, run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
