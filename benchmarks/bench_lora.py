"""A proposed change to ``LoRALinear.forward``, measured: the cached step is mostly LoRA overhead.

Run: ``python benchmarks/bench_lora.py [--quick]``. Once the frozen trunk is cached, a training
step runs only the adapted blocks, and there the LoRA branch is no longer small beside the rest:
``LoRAAdapter.forward`` computes ``(x A^T) B^T`` and then multiplies that full (tokens x out)
product by ``alpha / r``, and ``LoRALinear.forward`` adds each adapter's full-size output to the
frozen output separately. Both are passes over (tokens x out) memory, and so are their backward
counterparts. The proposals, applied here by replacing the method for the measurement only
(cmrfed now uses ``fused``; ``before`` re-creates the earlier two-pass forward for the comparison):

- ``scale-rank``: scale the (tokens x r) intermediate instead of the (tokens x out) product
  (one line in ``LoRAAdapter.forward``; bit-identical when alpha / r is a power of two);
- ``fused``: concatenate the active adapters' scaled rank-r products and add them to the frozen
  output with one ``addmm`` (``LoRALinear.forward``; equal up to float rounding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from bench_cache import config
from common import Suite, markdown_table, median, standalone, timed_federate

from cmrfed.fed.task import build_run_model
from cmrfed.model import lora
from cmrfed.model.classifier import param_group

NAME = "lora"
TITLE = "LoRA forward: the fused adapter product, measured against the earlier forward"


def forward_two_pass(self: lora.LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The forward cmrfed had before: each adapter's full (tokens x out) product, scaled, then
    added to the frozen output one adapter at a time (the baseline, labelled ``before``)."""
    out = F.linear(x, self.weight, self.bias)
    for name, adapter in self.adapters.items():
        if self.active_adapters is None or name in self.active_adapters:
            out = out + F.linear(F.linear(x, adapter.A), adapter.B) * adapter.scaling
    return out


def forward_scale_rank(self: lora.LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Only the scaling moved: ``F.linear(F.linear(x, A) * scaling, B)`` per adapter."""
    out = F.linear(x, self.weight, self.bias)
    for name, adapter in self.adapters.items():
        if self.active_adapters is None or name in self.active_adapters:
            out = out + F.linear(F.linear(x, adapter.A) * adapter.scaling, adapter.B)
    return out


VARIANTS: dict[str, Callable[[lora.LoRALinear, torch.Tensor], torch.Tensor]] = {
    "before": forward_two_pass,
    "scale-rank": forward_scale_rank,
    "fused": lora.LoRALinear.forward,  # what cmrfed uses: all adapters in one addmm
}


@contextmanager
def lora_forward(variant: str) -> Iterator[None]:
    original = lora.LoRALinear.forward
    lora.LoRALinear.forward = VARIANTS[variant]  # type: ignore[method-assign]
    try:
        yield
    finally:
        lora.LoRALinear.forward = original  # type: ignore[method-assign]


def micro(suite: Suite, size: str, batch: int = 8, repeats: int = 5) -> str:
    """The adapted blocks' train step (fwd, bwd, AdamW) and validation pass from cached tokens."""
    cfg = config(suite.prepared, size, 2, True, 1)
    run_model = build_run_model(cfg, suite.cohort.shape)
    model, start = run_model.model, run_model.start_block
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B, so the comparison exercises every product
        for name, param in model.named_parameters():
            if (param_group(name) or "").endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        images = torch.rand((batch, 2, *suite.cohort.shape), generator=generator)
        h0, skips = model.backbone.embed(images)
        hidden = model.backbone.forward_blocks(h0, 0, start)
    labels = torch.arange(batch) % 2
    trained = [p for n, p in model.named_parameters() if param_group(n) in run_model.spec.trained]
    for param in trained:
        param.requires_grad_(True)
    state = {id(p): p.detach().clone() for p in trained}

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for param in trained:
            param.grad = None
        logits = model.forward_from(hidden, skips, start)
        F.cross_entropy(logits, labels).backward()
        return logits.detach(), [p.grad.clone() for p in trained if p.grad is not None]

    def step() -> None:
        optimizer = torch.optim.AdamW(trained, lr=1e-6)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model.forward_from(hidden, skips, start), labels).backward()
        optimizer.step()
        with torch.no_grad():  # keep every variant timing the same weights
            for param in trained:
                param.copy_(state[id(param)])

    def evaluate() -> None:
        with torch.no_grad():
            model.forward_from(hidden, skips, start)

    return _variants_table(*_measure_variants(grads, step, evaluate, repeats))


def _measure_variants(grads: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]], step: Callable[[], None],
                      evaluate: Callable[[], None], repeats: int,
                      ) -> tuple[dict[tuple[str, str], list[float]], dict[str, tuple[float, float]]]:
    """Times of the train step and the validation pass of every LoRA forward variant, and each
    variant's largest logit and relative gradient difference from the one it replaces."""
    reference = grads()
    times: dict[tuple[str, str], list[float]] = {}
    differences = {}
    for repeat in range(repeats):
        for variant in VARIANTS:
            with lora_forward(variant):
                if repeat == 0:
                    logits, gradients = grads()
                    differences[variant] = (
                        float((logits - reference[0]).abs().max()),
                        max(float((g - r).abs().max() / r.abs().max().clamp(min=1e-30))
                            for g, r in zip(gradients, reference[1], strict=True)),
                    )
                for label, fn in (("train", step), ("eval", evaluate)):
                    if repeat == 0:
                        fn()  # warm-up
                    begin = time.perf_counter()
                    fn()
                    times.setdefault((variant, label), []).append(time.perf_counter() - begin)
    return times, differences


def _variants_table(times: dict[tuple[str, str], list[float]],
                    differences: dict[str, tuple[float, float]]) -> str:
    base_train, base_eval = median(times[("before", "train")]), median(times[("before", "eval")])
    rows = []
    for variant in VARIANTS:
        train, evaluation = median(times[(variant, "train")]), median(times[(variant, "eval")])
        logit_gap, grad_gap = differences[variant]
        rows.append([variant, f"{train * 1e3:.1f}", f"{100 * (train / base_train - 1):+.0f}%",
                     f"{evaluation * 1e3:.1f}", f"{100 * (evaluation / base_eval - 1):+.0f}%",
                     f"{logit_gap:.1e}", f"{grad_gap:.1e}"])
    return markdown_table(["LoRA forward", "train step ms", "vs before", "validation ms", "vs before",
                           "max logit diff", "max rel. grad diff"], rows)


def rounds(suite: Suite, size: str, repeats: int, n_rounds: int) -> str:
    """Steady round times, plain and cached, with the earlier and the fused forward."""
    samples: dict[tuple[str, bool], list[float]] = {}
    plan = [(v, c) for v in ("before", "fused") for c in (False, True)]
    for repeat in range(repeats):
        for variant, cache in plan if repeat % 2 == 0 else list(reversed(plan)):
            with lora_forward(variant):
                timing = timed_federate(config(suite.prepared, size, 2, cache, n_rounds),
                                        suite.scratch / "runs" / "lora")
            samples.setdefault((variant, cache), []).extend(r.cpu for r in timing.steady_rounds)
            suite.console.log(f"lora {variant} cache={cache}: {[round(r.wall, 2) for r in timing.rounds]} s")
    rows = []
    for variant in ("before", "fused"):
        plain, cached = median(samples[(variant, False)]), median(samples[(variant, True)])
        rows.append([variant, f"{plain:.2f}", f"{cached:.2f}", f"{plain / cached:.2f}x"])
    return markdown_table(["LoRA forward", "plain CPU s / round", "cached CPU s / round",
                           "cache speed-up"], rows)


def run(suite: Suite) -> str:
    size = "small" if suite.quick else "base"
    repeats, n_rounds = (1, 2) if suite.quick else (2, 3)
    return (
        "## LoRA forward: the cost the cache leaves\n\n"
        + (__doc__ or "").split("\n\n", 1)[1].replace("Run: ``python benchmarks/bench_lora.py "
                                                      "[--quick]``. ", "")
        + f"\n\n### The adapted blocks alone ({size}, 2 blocks, duallora rank 8, batch 8)\n\n"
        + micro(suite, size)
        + f"\n\n### Whole rounds ({size}, 2 blocks; {repeats} interleaved repeats x {n_rounds} rounds, "
        "medians of the steady rounds' CPU seconds)\n\n"
        + rounds(suite, size, repeats, n_rounds) + "\n"
    )


def main() -> None:
    standalone(NAME, TITLE, run, (__doc__ or "").splitlines()[0])


if __name__ == "__main__":
    main()
