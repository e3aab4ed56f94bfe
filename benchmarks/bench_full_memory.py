"""Peak memory of one ``central-full`` training step at base size on CineMA's input grid.

Run: ``python benchmarks/bench_full_memory.py [--quick]``. Each batch size runs in a fresh child
process (this file with ``--child``) that builds the base classifier for 192 x 192 x 16 inputs,
then runs one step of :meth:`Client.fit` with the ``central-full`` method (every backbone weight
trained, CineMA's layer-wise lr decay param groups, AdamW) on random images, and reports its
RSS before the step and its peak RSS (VmHWM) after. Beside it, the analytic floor of full
fine-tuning with AdamW: 4 float32 copies of every trained weight (weights, gradients, two moments).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from bench_memory import peak_rss_kib
from common import Suite, markdown_table, standalone

NAME = "full_memory"
TITLE = "central-full: peak memory of one training step at base size"
MIB = 1024 * 1024
SHAPE = (192, 192, 16)


def child(batch: int, threads: int) -> dict[str, float]:
    from cmrfed.fed.client import Client, SplitTensors, TrainConfig
    from cmrfed.fed.methods import METHODS
    from cmrfed.model.cinema import build_encoder
    from cmrfed.model.classifier import CineMAClassifier, tensor_group

    torch.set_num_threads(threads)
    model = CineMAClassifier(build_encoder("base", input_shape=SHAPE, seed=0), n_classes=2, seed=0)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if tensor_group(n) is not None}
    trained = sum(t.numel() for t in state.values())
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 2, *SHAPE), generator=generator)
    split = SplitTensors(tuple(str(i) for i in range(batch)), torch.arange(batch) % 2, (images,))
    client = Client("site", 0, METHODS["central-full"], state, split, None,
                    TrainConfig(batch_size=batch, local_epochs=1, lr=1e-3), seed=0)
    before = psutil.Process().memory_info().rss / MIB
    start = time.perf_counter()
    client.fit(model, 1, torch.device("cpu"))
    return {"trained": trained, "before": before, "peak": peak_rss_kib() / 1024,
            "seconds": time.perf_counter() - start}


def run(suite: Suite) -> str:
    rows = []
    trained = 0
    for batch in (1,) if suite.quick else (1, 2):
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(batch), str(suite.threads)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        trained = int(result["trained"])
        suite.console.log(f"batch {batch}: {result}")
        rows.append([batch, f"{result['before']:,.0f}", f"{result['peak']:,.0f}",
                     f"{result['peak'] - result['before']:,.0f}", f"{result['seconds']:.1f}"])
    floor = 4 * 4 * trained / MIB
    table = markdown_table(("batch", "RSS with model and data MiB", "peak RSS MiB", "step adds MiB",
                            "step s"), rows)
    return "\n".join([
        f"Base classifier for {'x'.join(map(str, SHAPE))} inputs (CineMA's grid), {trained:,} trained "
        f"tensors' values (every backbone weight but the fixed position table, plus the head); one "
        "Client.fit step of --method central-full (AdamW, layer-wise lr decay 0.75), float32, CPU; a fresh "
        "process per row.",
        "",
        table,
        "",
        f"Analytic floor of the optimiser state alone: 4 x 4 bytes x {trained:,} = {floor:,.0f} MiB "
        "(weights, gradients, AdamW's two moments); the rest of the step is activations kept for the "
        "backward pass and grows with the batch (CineMA's own recipe: 4 per device, gradient "
        "accumulation to 64). A client of the in-process engine also keeps a copy of the whole backbone "
        "as its state (about 1x the weights per site).",
    ])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        standalone(NAME, TITLE, run, __doc__ or "")
