"""Numeric precision of the forward pass: float32, or bfloat16 autocast as CineMA trains and infers.

``--precision fp32|bf16|auto`` (federate, flower run, evaluate, adapt, pretrain, study files):

- ``bf16`` runs every forward pass (training, evaluation, the frozen-trunk cache) under
  ``torch.autocast(dtype=torch.bfloat16)``: matrix products and convolutions in bfloat16, while
  the master weights, AdamW's moments, the loss and every tensor that is saved, sent or
  aggregated stay float32 (the model itself is never cast). Cached trunk features are stored in
  bfloat16 (half the disk and memory); the cache key records the precision, so bf16 and fp32
  features never mix.
- ``fp32`` is float32 throughout, as cmrfed ran before this option.
- ``auto`` is bf16 where the device computes it natively, fp32 elsewhere: on CUDA when
  ``torch.cuda.is_bf16_supported()``; on a CPU when it has the AVX512-BF16 or AMX instructions
  (read from the CPU's flags by PyTorch's cpuinfo). Without them PyTorch emulates bfloat16 on
  the CPU, which is slower than float32. The flags, not a timed probe, make the rule: the same
  machine always resolves ``auto`` the same way, whatever else it is running.

``auto`` is resolved once when a run starts, and run.json records the RESOLVED precision, so
``--resume``, ``evaluate`` and ``adapt`` compute exactly as the run did, on any machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from cmrfed.errors import UsageError

FP32, BF16, AUTO = "fp32", "bf16", "auto"
RESOLVED = (FP32, BF16)
CHOICES = (*RESOLVED, AUTO)
_STORAGE = {FP32: "float32", BF16: "bfloat16"}

def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 products in hardware (the ``auto`` rule)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` by :func:`native_bf16`, the others as they are."""
    if name == AUTO:
        return BF16 if native_bf16(device) else FP32
    if name not in RESOLVED:
        raise UsageError(f"--precision must be one of {', '.join(CHOICES)}, got {name!r}")
    return name


def storage_dtype(precision: str) -> str:
    """The dtype cached trunk features are stored in under a resolved precision."""
    return _STORAGE[precision]


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The forward pass's context: bfloat16 autocast under ``bf16``, a no-op under ``fp32``."""
    if precision not in RESOLVED:
        raise ValueError(f"precision {precision!r} is not resolved (call resolve_precision first)")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == BF16)


def in_precision(forward: Callable[..., torch.Tensor], precision: str,
                 device: torch.device) -> Callable[..., torch.Tensor]:
    """``forward`` run under :func:`autocast`, its output returned as float32 (the loss, the
    softmax and every metric are computed in float32)."""

    @functools.wraps(forward)
    def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
        with autocast(precision, device):
            out = forward(*args, **kwargs)
        return out.float()

    return wrapped


FLOAT32_ATTENTION_BELOW = 1024
"""Sequences shorter than this many tokens attend in float32 on a CPU under bf16 (:func:`attention`)."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T scale) v`` (scaled dot-product attention); on a CPU under bf16, in float32
    for sequences shorter than :data:`FLOAT32_ATTENTION_BELOW` tokens.

    PyTorch's CPU flash attention (forward + backward, one thread, AVX512-BF16) is slower in
    bfloat16 than in float32 on short sequences and faster on long ones: 2.8x slower at 129 tokens
    (the demo's tiny encoder: 8 x 3 heads of 32), 1.14x slower at 577, 0.86-0.92x at 1,025 and
    0.83x at 2,305 (CineMA's 192 x 192 x 16 grid, 12 heads of 64). At 129 tokens it made a bf16
    demo cell slower than fp32 (17.8-20.2 against 15.3 s CPU) although its matrix products ran
    1.6-1.7x faster; with the attention in float32 the cell takes 13.3 s
    (docs/precision.md). So below the crossover the attention runs in float32 (its
    inputs cast up; the next linear layer casts its output down again) and only the linear products
    run in bfloat16. On CUDA, bfloat16 flash attention is fast and runs as autocast decides.
    """
    if q.device.type == "cpu" and q.shape[-2] < FLOAT32_ATTENTION_BELOW and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
