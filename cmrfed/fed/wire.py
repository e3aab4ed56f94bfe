"""What actually travels between a site and the server: safetensors bytes.

Both engines serialise shared tensors with these two functions, so the communication numbers
cmrfed reports are the sizes of real payloads, not estimates.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

TensorState = dict[str, torch.Tensor]


def encode(state: TensorState) -> bytes:
    """Serialise a tensor state (contiguous CPU copies) to safetensors bytes."""
    return _st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def decode(payload: bytes) -> TensorState:
    """The tensors of a payload made by :func:`encode`."""
    return dict(_st_load(payload))


def num_params(state: TensorState) -> int:
    """Number of scalar values in a state (the analytic side of communication)."""
    return sum(int(t.numel()) for t in state.values())


def tensor_bytes(state: TensorState) -> int:
    """Raw tensor bytes of a state, without the safetensors header."""
    return sum(int(t.numel()) * t.element_size() for t in state.values())
