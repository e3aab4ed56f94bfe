"""What a fresh training process pays for its optimiser: cmrfed's AdamW against torch.optim.AdamW.

Run: ``python benchmarks/bench_optimizer.py [--quick]``. A Flower ClientApp is a new process for
every message, and every ``cmrfed`` command that trains is one too, so the optimiser's start-up is
paid per message per site. Each variant runs in a fresh interpreter (torch imported first, outside
the timing): build a LoRA-sized parameter set, then one ``zero_grad`` + ``step``; CPU seconds are
the child's user + system time, median over interleaved repeats. The steady state (many steps in
one process, the demo's trainable shapes) is timed too, since the two compute the same update
(tests/test_optimizer.py proves it bit for bit).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch
from common import Suite, markdown_table, standalone

from cmrfed.fed.optimizer import AdamW

NAME = "optimizer"
TITLE = "Optimiser start-up in a fresh process: cmrfed AdamW vs torch.optim.AdamW"
VARIANTS = {"cmrfed": "cmrfed.fed.optimizer.AdamW", "torch": "torch.optim.AdamW"}

CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start, wall = cpu(), time.perf_counter()
if sys.argv[1] == "cmrfed":
    from cmrfed.fed.optimizer import AdamW
else:
    from torch.optim import AdamW
params = [torch.nn.Parameter(torch.zeros(8, 96)) for _ in range(40)]
optimizer = AdamW([{"params": params, "weight_decay": 0.05}], lr=3e-3, betas=(0.9, 0.95))
for p in params:
    p.grad = torch.ones_like(p)
optimizer.step()
optimizer.zero_grad(set_to_none=True)
print(json.dumps({"cpu": cpu() - start, "wall": time.perf_counter() - wall,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def fresh_process(variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def steady_step_ms(variant: str, steps: int) -> float:
    """Milliseconds per step over ``steps`` steps on the trainable tensors of a DualLoRA blocks-2
    tiny cell (40 LoRA factors, rank 8, width 96; fc1 / fc2 ones 4x wider)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 96), (96, 8), (8, 96), (192, 8), (8, 96), (96, 8), (8, 96), (384, 8), (8, 384), (96, 8)] * 4
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    optimizer = (AdamW if variant == "cmrfed" else torch.optim.AdamW)(
        [{"params": params, "weight_decay": 0.05}], lr=3e-3, betas=(0.9, 0.95),
        **({} if variant == "cmrfed" else {"foreach": False}))
    grads = [torch.randn(s, generator=generator) for s in shapes]
    start = time.process_time()
    for _ in range(steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.process_time() - start) / steps * 1e3


def run(suite: Suite) -> str:
    repeats, steps = (3, 100) if suite.quick else (9, 400)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # interleaved, so drifting load hits both alike
        for variant in VARIANTS:
            runs[variant].append(fresh_process(variant))
    steady = {v: [] for v in VARIANTS}
    for _ in range(3):
        for variant in VARIANTS:
            steady[variant].append(steady_step_ms(variant, steps))
    baseline = statistics.median(r["cpu"] for r in runs["cmrfed"])
    rows = []
    for variant, name in VARIANTS.items():
        cpu = statistics.median(r["cpu"] for r in runs[variant])
        rows.append([f"`{name}`", f"{cpu:.2f}", f"{cpu - baseline:+.2f}",
                     "yes" if runs[variant][0]["dynamo"] else "no", f"{min(steady[variant]):.3f}"])
    table = markdown_table(["optimiser", "fresh process: CPU s to first step (median)",
                            "CPU s more than cmrfed's", "imports torch._dynamo",
                            "steady step, ms (min of 3)"],
                           rows)
    return (f"{len(runs['cmrfed'])} fresh processes per optimiser, interleaved; torch imported before "
            f"the timing starts; steady state {steps} steps x 3.\n\n{table}\n")


def main() -> None:
    standalone(NAME, TITLE, run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
