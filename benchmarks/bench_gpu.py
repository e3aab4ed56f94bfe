"""The paper grid on the first GPU this machine has: seconds per round for bf16 and fp32, with and
without the frozen-trunk cache, peak GPU memory, and the grid's projected wall time.

Run: ``python benchmarks/bench_gpu.py`` (one prepared script, under 5 minutes; without a CUDA GPU
it prints one line and exits 0, writing nothing). At base size on CineMA's grid (192 x 192 x 16,
2304 tokens) and random inputs already on the device, each step kind (a training step: forward,
backward through the adapted blocks, AdamW; a validation pass) is timed for each precision and
path: ``plain`` (the image through the stem and all 12 blocks), ``cached`` (the trunk's tokens
entering the 2 adapted blocks) and ``all blocks`` (every block adapted: no frozen trunk, the
grid's ``blocks = "all"`` cells). Peak memory is ``torch.cuda.max_memory_allocated`` per kind.

A round of a site is (train subjects / train rate) + (val subjects / validation rate), one local
epoch; the grid is the shipped example study (``cmrfed study --template``: 3 methods x 5 seeds x
blocks {2, all}, 30 rounds, plus the participation cells without one site), on the subject counts
below (ACDC + M&Ms-1 + M&Ms-2 labelled subjects split 0.6 / 0.2 / 0.2). The projection adds
the trunk cache's one build and each run's test evaluation (every site's model on every site's
test split); it leaves out start-up and file I/O, so it is a lower bound.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import RESULTS_DIR, Machine, markdown_table, write_results

from cmrfed.fed.config import FederateConfig
from cmrfed.fed.task import build_run_model
from cmrfed.model.classifier import param_group
from cmrfed.precision import BF16, FP32, autocast

NAME = "gpu"
TITLE = "GPU: the paper grid at base size, bf16 and fp32, cached and plain"
FULL_SHAPE = (192, 192, 16)
BATCH = 8
STEPS = 10
BUDGET_S = 240.0  # measuring stops early (fewer steps) past this, to stay under 5 minutes
SUBJECTS = {"train": 531, "val": 177, "test": 177}  # ~885 labelled subjects, split 0.6 / 0.2 / 0.2
SITES = 4
ROUNDS = 30
METHODS, SEEDS = 3, 5
HOLDOUT_SHARE = 0.1  # the held-out site's share of the subjects (canon: the smallest vendor)


def _rates(device: torch.device, precision: str, blocks: int | str, deadline: float
           ) -> dict[str, tuple[float, float]]:
    """(subjects / s, peak GiB) of each step kind of one model (blocks adapted) in one precision."""
    cfg = FederateConfig(data="-", method="duallora", blocks=blocks, rank=8, backbone="base")
    run_model = build_run_model(cfg, FULL_SHAPE)
    model, start = run_model.model.to(device), run_model.start_block
    trained = [p for n, p in model.named_parameters() if param_group(n) in run_model.spec.trained]
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand((BATCH, 2, *FULL_SHAPE), generator=generator, device=device)
    labels = torch.arange(BATCH, device=device) % 2
    with torch.no_grad(), autocast(precision, device):
        h0, skips = model.backbone.embed(images)
        hidden = model.backbone.forward_blocks(h0, 0, start)

    def train(logits: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, device):
                out = logits()
            F.cross_entropy(out.float(), labels).backward()
            optimizer.step()
        return step

    def evaluate(logits: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast(precision, device):
                logits()
        return step

    kinds = {"train": train(lambda: model(images)), "validation": evaluate(lambda: model(images))}
    if start > 0:
        kinds |= {"train, cached": train(lambda: model.forward_from(hidden, skips, start)),
                  "validation, cached": evaluate(lambda: model.forward_from(hidden, skips, start))}
    out = {}
    for name, step in kinds.items():
        step()  # warm-up (kernels, allocator)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        steps, begin = 0, time.perf_counter()
        while steps < STEPS and (steps < 2 or time.perf_counter() < deadline):
            step()
            steps += 1
        torch.cuda.synchronize(device)
        out[name] = (BATCH * steps / (time.perf_counter() - begin),
                     torch.cuda.max_memory_allocated(device) / 2**30)
    return out


def round_s(train_rate: float, val_rate: float, share: float = 1.0) -> float:
    """Seconds of one round over every site (sites train one after the other, as in-process)."""
    return share * (SUBJECTS["train"] / train_rate + SUBJECTS["val"] / val_rate)


def projection(rates: dict[str, dict[str, tuple[float, float]]], precision: str, cache: bool) -> float:
    """Projected wall seconds of the paper grid in ``precision``, with or without the cache."""
    two, every = rates[f"{precision} blocks 2"], rates[f"{precision} blocks all"]
    train2 = two["train, cached" if cache else "train"][0]
    val2 = two["validation, cached" if cache else "validation"][0]
    eval2 = SITES * SUBJECTS["test"] / val2  # every site's model on every site's test split
    cell2 = ROUNDS * round_s(train2, val2) + eval2
    cell_all = ROUNDS * round_s(every["train"][0], every["validation"][0]) + SITES * SUBJECTS["test"] / \
        every["validation"][0]
    held_out = ROUNDS * round_s(train2, val2, 1 - HOLDOUT_SHARE) + eval2
    build = sum(SUBJECTS.values()) / two["validation"][0] if cache else 0.0  # the trunk, once
    return METHODS * SEEDS * (cell2 + cell_all + held_out) + build


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine; nothing measured, nothing written")
        return
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    machine, started = Machine(), time.perf_counter()
    deadline = started + BUDGET_S
    rates: dict[str, dict[str, tuple[float, float]]] = {}
    for precision in (BF16, FP32):
        for blocks in (2, "all"):
            rates[f"{precision} blocks {blocks}"] = _rates(device, precision, blocks, deadline)
            torch.cuda.empty_cache()
            print(f"{precision} blocks {blocks}: {rates[f'{precision} blocks {blocks}']}", flush=True)
    rows = []
    for precision in (BF16, FP32):
        two = rates[f"{precision} blocks 2"]
        for path, suffix in (("cached", ", cached"), ("plain", "")):
            train, val = two[f"train{suffix}"], two[f"validation{suffix}"]
            rows.append([precision, f"2 blocks, {path}", f"{train[0]:.1f}", f"{val[0]:.1f}",
                         f"{round_s(train[0], val[0]):.1f}", f"{max(train[1], val[1]):.2f}"])
        every = rates[f"{precision} blocks all"]
        rows.append([precision, "all blocks", f"{every['train'][0]:.1f}", f"{every['validation'][0]:.1f}",
                     f"{round_s(every['train'][0], every['validation'][0]):.1f}",
                     f"{max(every['train'][1], every['validation'][1]):.2f}"])
    grid = [[precision, "on" if cache else "off", f"{projection(rates, precision, cache) / 3600:.2f}"]
            for precision in (BF16, FP32) for cache in (True, False)]
    bf16, fp32 = projection(rates, BF16, True), projection(rates, FP32, True)
    body = "\n".join([
        f"{torch.cuda.get_device_name(device)}; base size, duallora rank 8, batch {BATCH}, input "
        f"{'x'.join(map(str, FULL_SHAPE))}; TF32 off (fp32 is fp32); {STEPS} timed steps per kind after a "
        f"warm-up. A round: {SUBJECTS['train']} train + {SUBJECTS['val']} val subjects over {SITES} sites.",
        "", markdown_table(["precision", "path", "train subjects / s", "val subjects / s", "s / round",
                            "peak GiB"], rows),
        "", f"Paper grid ({METHODS} methods x {SEEDS} seeds x blocks {{2, all}} + {METHODS * SEEDS} "
        f"participation cells, {ROUNDS} rounds), projected wall time (a lower bound: no start-up or I/O):",
        "", markdown_table(["precision", "cache", "hours"], grid),
        "", f"bf16 with the cache: {fp32 / bf16:.2f}x faster than fp32 with the cache. "
        f"Measured in {time.perf_counter() - started:.0f} s."])
    path = write_results(RESULTS_DIR, NAME, machine, TITLE, body)
    print(body)
    print(f"written: {path.relative_to(RESULTS_DIR.parent.parent)}")


if __name__ == "__main__":
    sys.exit(main())
