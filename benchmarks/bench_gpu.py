"""Training throughput of the base size on a GPU with bf16 autocast (skipped without a GPU).

Run: ``python benchmarks/bench_gpu.py``. At CineMA's full input (192 x 192 x 16, 2304 tokens), on
random inputs already on the device: subjects per second of a training step (forward, backward
through the 2 adapted blocks, AdamW) from the image (plain) and from cached trunk tokens, and of
a validation pass, each under ``torch.autocast(dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import Suite, markdown_table, standalone

from cmrfed.fed.config import FederateConfig
from cmrfed.fed.task import build_run_model
from cmrfed.model.classifier import param_group

NAME = "gpu"
TITLE = "GPU throughput (base, bf16 autocast)"
FULL_SHAPE = (192, 192, 16)


def throughput(device: torch.device, shape: tuple[int, int, int], batch: int, steps: int,
               size: str = "base") -> dict[str, float]:
    """Subjects per second of each step kind on ``device``."""
    cfg = FederateConfig(data="-", method="duallora", blocks=2, rank=8, backbone=size)
    run_model = build_run_model(cfg, shape)
    model, start = run_model.model.to(device), run_model.start_block
    trained = [p for n, p in model.named_parameters() if param_group(n) in run_model.spec.trained]
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand((batch, 2, *shape), generator=generator, device=device)
    labels = torch.arange(batch, device=device) % 2
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        h0, skips = model.backbone.embed(images)
        hidden = model.backbone.forward_blocks(h0, 0, start)

    def train(logits: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(logits(), labels)
            loss.backward()
            optimizer.step()
        return step

    def evaluate(logits: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast:
                logits()
        return step

    kinds = {
        "train, plain": train(lambda: model(images)),
        "train, cached": train(lambda: model.forward_from(hidden, skips, start)),
        "validation, plain": evaluate(lambda: model(images)),
        "validation, cached": evaluate(lambda: model.forward_from(hidden, skips, start)),
    }
    rates = {}
    for name, step in kinds.items():
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates[name] = batch * steps / (time.perf_counter() - begin)
    return rates


def run(suite: Suite) -> str:
    if not torch.cuda.is_available():
        return "## GPU throughput (base, bf16 autocast)\n\nskipped: no GPU\n"
    device = torch.device("cuda")
    rates = throughput(device, FULL_SHAPE, batch=8, steps=10 if suite.quick else 30)
    rows = [[name, f"{rate:.1f}"] for name, rate in rates.items()]
    speed = rates["train, cached"] / rates["train, plain"]
    return (
        "## GPU throughput (base, bf16 autocast)\n\n"
        f"{torch.cuda.get_device_name(device)}; base size, duallora rank 8, 2 adapted blocks, batch 8, "
        f"input {'x'.join(map(str, FULL_SHAPE))}.\n\n"
        + markdown_table(["step", "subjects / s"], rows)
        + f"\n\nCached training is {speed:.2f}x the plain rate.\n"
    )


def main() -> None:
    standalone(NAME, TITLE, run, (__doc__ or "").splitlines()[0])


if __name__ == "__main__":
    main()
