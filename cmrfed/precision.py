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
