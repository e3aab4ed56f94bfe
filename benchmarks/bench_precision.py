"""bf16 autocast against float32: seconds per steady federated round, cached and plain, and the
largest logit difference between the two.

Run: ``python benchmarks/bench_precision.py [--quick] [--threads 1]``. For each size (base; small
with ``--quick``) and each path (the frozen-trunk cache on, and off), one run per precision of
``federate`` (duallora, 2 adapted blocks, rank 8, E = 1) on the shared synthetic cohort, fp32 and
bf16 alternating; a row's numbers are medians over the steady rounds (round 2 on). Cached runs
build their cache first (its own, per precision: the key includes it). The logit difference is
the largest |bf16 - fp32| logit over every subject of every client's test split, with the full
forward (plain) and from each precision's cached features (cached).
"""

from __future__ import annotations

import torch
from common import Suite, markdown_table, median, standalone, timed_federate

from cmrfed.data.shards import load_manifest
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.task import build_run_model, load_client_data
from cmrfed.precision import BF16, FP32, in_precision, native_bf16

NAME = "precision"
TITLE = "bf16 autocast against float32"
CPU = torch.device("cpu")


def config(suite: Suite, size: str, precision: str, cache: bool, rounds: int) -> FederateConfig:
    return FederateConfig(data=str(suite.prepared), method="duallora", blocks=2, rank=8, rounds=rounds,
                          local_epochs=1, backbone=size, cache=cache, precision=precision, augment="none")


@torch.no_grad()
def largest_logit_difference(suite: Suite, size: str, cache: bool) -> float:
    """max |bf16 - fp32| over every test subject's logits (each precision from its own cache)."""
    manifest = load_manifest(suite.prepared)
    worst = 0.0
    for client in manifest.clients:
        logits = {}
        for precision in (FP32, BF16):
            cfg = config(suite, size, precision, cache, 1)
            run_model = build_run_model(cfg, tuple(manifest.shape))
            test = load_client_data(suite.prepared, manifest, client, run_model, cfg, CPU)["test"]
            forward = in_precision(test.forward, precision, CPU)
            logits[precision] = forward(run_model.model.eval(), test.batch(torch.arange(test.rows), CPU))
        worst = max(worst, float((logits[BF16] - logits[FP32]).abs().max()))
    return worst


def run(suite: Suite) -> str:
    rounds = 3
    rows = []
    for size in suite.sizes():
        for cache in (True, False):
            per = {FP32: [], BF16: []}
            for precision in (FP32, BF16):  # a cache build is set-up, not a steady round
                timing = timed_federate(config(suite, size, precision, cache, rounds),
                                        suite.scratch / f"{size}-{cache}-{precision}")
                per[precision] = timing.steady_rounds
            wall = {p: median([r.wall for r in per[p]]) for p in per}
            cpu = {p: median([r.cpu for r in per[p]]) for p in per}
            diff = largest_logit_difference(suite, size, cache)
            rows.append([size, "cached" if cache else "plain", f"{cpu[FP32]:.2f}", f"{cpu[BF16]:.2f}",
                         f"{cpu[FP32] / cpu[BF16]:.2f}x", f"{wall[FP32]:.2f}", f"{wall[BF16]:.2f}",
                         f"{wall[FP32] / wall[BF16]:.2f}x", f"{diff:.2e}"])
            suite.console.print(rows[-1])
    columns = ["size", "path", "fp32 CPU s / round", "bf16 CPU s / round", "speed-up (CPU)",
               "fp32 wall s / round", "bf16 wall s / round", "speed-up (wall)", "largest |logit diff|"]
    lines = [f"{suite.cohort.describe()}. Method duallora, 2 adapted blocks, rank 8, E = 1, no augmentation, "
             f"{rounds} rounds per run, one run per precision; medians over the steady rounds (round 2 on). "
             f"This CPU computes bf16 natively: {native_bf16(CPU)} (so `--precision auto` is "
             f"{'bf16' if native_bf16(CPU) else 'fp32'} here). Wall times also count any neighbours on "
             "the machine (the load at start and end is above); the CPU columns do not. Read the ratios.", "",
             markdown_table(columns, rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    standalone(NAME, TITLE, run, __doc__.splitlines()[0])
