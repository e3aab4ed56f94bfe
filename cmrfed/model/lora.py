"""LoRA on frozen linear layers, with several named adapters per layer (e.g. ``global`` + ``local``).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) adds a trainable
low-rank update ``s * B A`` (A: r x in, B: out x r, s = alpha / r) to a frozen weight ``W0``. Med-DualLoRA
(Perramon-Llussà et al., 2026) keeps two such pairs per layer, a global one averaged across sites
and a local one that never leaves its site, and adds both; FedLoRA, FFA-LoRA (Sun et al., ICLR 2024)
and FedSA-LoRA (Guo et al., ICLR 2025) use one pair and differ only in which factor is trained or
shared. So a layer holds a dictionary of named adapters, and every method is a choice of tensor
groups ``"<adapter>.A"`` / ``"<adapter>.B"`` (see :func:`adapter_group`, cmrfed/fed/methods.py).

:class:`LoRALinear` replaces an ``nn.Linear`` in place and keeps its ``weight`` and ``bias`` under
the same state_dict keys, so the backbone's keys stay CineMA's; adapter tensors are named
``<layer>.adapters.<adapter>.A`` / ``.B``, e.g. ``encoder.blocks.10.attn.q.adapters.global.A``.

Every A is drawn from a generator seeded by (run seed, layer name, adapter name) only: the same
seed gives the same A on every client whatever else was built (FFA-LoRA needs identical frozen A),
and adapting more blocks does not change the A of the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmrfed.errors import UsageError
from cmrfed.seeding import seeded_generator

ADAPTERS_ATTR = "adapters"
FACTORS = ("A", "B")
DEFAULT_TARGETS: tuple[str, ...] = ("q", "kv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class AdapterSpec:
    """One named LoRA pair to add to every adapted layer: its rank r and alpha (scaling alpha / r)."""

    name: str
    rank: int
    alpha: float

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise UsageError(f"adapter name {self.name!r} must be a plain identifier like 'global'")
        if self.rank < 1:
            raise UsageError(f"adapter {self.name!r}: rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise UsageError(f"adapter {self.name!r}: alpha must be positive, got {self.alpha}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(nn.Module):
    """One LoRA pair: ``delta(x) = scaling * (x A^T) B^T``; A Kaiming-uniform, B zero at init."""

    def __init__(self, in_features: int, out_features: int, spec: AdapterSpec,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.rank = spec.rank
        self.alpha = spec.alpha
        self.scaling = spec.scaling
        # (r, in): the same init as nn.Linear's weight (and PEFT's LoRA A); B = 0 so the adapted
        # model starts exactly at the pretrained one.
        self.A = nn.Parameter(torch.empty(spec.rank, in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(out_features, spec.rank))  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A) * self.scaling, self.B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


class LoRALinear(nn.Module):
    """A frozen linear layer plus named LoRA adapters: ``x W^T + b + sum_active w_a delta_a(x)``.

    ``weight`` and ``bias`` are the wrapped layer's own Parameters, registered under the same
    names, so the state_dict keys of the backbone do not change when LoRA is injected. Which
    adapters are active, and their weights ``w_a`` (1 unless set; FedDPA mixes its two adapters
    with per-instance weights), are set for the whole model by :func:`set_active_adapters`.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapters = nn.ModuleDict()
        # names of the adapters added to the output; None = all of them
        self.active_adapters: tuple[str, ...] | None = None
        # weight of each active adapter's delta (a number, or one per batch row); absent: 1
        self.adapter_weights: dict[str, float | torch.Tensor] = {}

    def add_adapter(self, spec: AdapterSpec, generator: torch.Generator) -> LoRAAdapter:
        if spec.name in self.adapters:
            raise UsageError(f"adapter {spec.name!r} is already present on this layer")
        adapter = LoRAAdapter(self.in_features, self.out_features, spec, generator)
        adapter.to(device=self.weight.device, dtype=self.weight.dtype)
        self.adapters[spec.name] = adapter
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All active adapters in one ``addmm``: the alpha / r scaling is applied to the rank-r
        intermediate rather than to a full-size output, and the adapters' outputs are not
        materialised one by one (the LoRA branch dominates a cached training step; this cut it
        by about 12 % at base size, see benchmarks/results/lora.md)."""
        out = F.linear(x, self.weight, self.bias)
        active = [(name, adapter) for name, adapter in self.adapters.items()
                  if self.active_adapters is None or name in self.active_adapters]
        if not active:
            return out
        # (..., sum r)
        low = torch.cat([F.linear(x, a.A) * self._scale(name, a, x) for name, a in active], dim=-1)
        up = torch.cat([a.B for _, a in active], dim=1)  # (out, sum r)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), up.t())
        return flat.view_as(out)

    def _scale(self, name: str, adapter: LoRAAdapter, x: torch.Tensor) -> float | torch.Tensor:
        """alpha / r times the adapter's weight; a per-row weight (B,) broadcasts over the rest of
        ``x`` (tokens), so each instance of a batch can mix the adapters differently (FedDPA)."""
        weight = self.adapter_weights.get(name)
        if weight is None:
            return adapter.scaling
        if isinstance(weight, torch.Tensor):
            return (weight.to(x.dtype) * adapter.scaling).reshape(-1, *([1] * (x.dim() - 1)))
        return adapter.scaling * weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def adapter_group(param_name: str) -> str | None:
    """``"<adapter>.A"`` / ``"<adapter>.B"`` for a LoRA tensor name, None for any other name.

    ``encoder.blocks.10.attn.q.adapters.global.A`` -> ``"global.A"``.
    """
    parts = param_name.split(".")
    if len(parts) >= 3 and parts[-3] == ADAPTERS_ATTR and parts[-1] in FACTORS:
        return f"{parts[-2]}.{parts[-1]}"
    return None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every :class:`LoRALinear` of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_lora(module: nn.Module, targets: Sequence[str], adapters: Sequence[AdapterSpec], seed: int,
             prefix: str = "") -> list[str]:
    """Wrap each linear layer of ``module`` whose last name part is in ``targets`` and add ``adapters``.

    ``prefix`` is the module's qualified name inside the model: it labels each layer's seed, so the
    same layer gets the same A whether it is adapted alone or within a whole encoder.
    Returns the qualified names of the adapted layers. Layers that are already LoRALinear get the
    new adapters added (a second call adds, e.g., a local adapter).
    """
    if not adapters:
        raise UsageError("at least one adapter is needed to inject LoRA")
    if len({spec.name for spec in adapters}) != len(adapters):
        raise UsageError(f"adapter names must be unique, got {[s.name for s in adapters]}")
    found = {
        name: child for name, child in module.named_modules()
        if name and name.split(".")[-1] in targets and isinstance(child, nn.Linear | LoRALinear)
    }
    missing = sorted(set(targets) - {name.split(".")[-1] for name in found})
    if missing:
        linears = sorted({n.split(".")[-1] for n, m in module.named_modules()
                          if isinstance(m, nn.Linear | LoRALinear)})
        raise UsageError(f"LoRA targets {missing} match no linear layer; available: {linears}")
    clashes = sorted({spec.name for child in found.values() if isinstance(child, LoRALinear)
                      for spec in adapters if spec.name in child.adapters})
    if clashes:
        raise UsageError(f"adapters {clashes} are already present on these layers")
    adapted = []
    for name, child in found.items():
        full_name = f"{prefix}.{name}" if prefix else name
        layer = child if isinstance(child, LoRALinear) else LoRALinear(child)
        for spec in adapters:
            layer.add_adapter(spec, seeded_generator(seed, "lora", full_name, spec.name))
        if layer is not child:
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, layer)
        adapted.append(full_name)
    return adapted


def inject_lora(encoder: nn.Module, blocks: int | str, adapters: Sequence[AdapterSpec], seed: int,
                targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every backbone parameter, then add ``adapters`` to ``targets`` of the LAST ``blocks`` blocks.

    ``encoder`` is a CineMA SAX encoder (its transformer blocks at ``encoder.blocks``); ``blocks``
    is a count or ``"all"``: the last blocks are those nearest the head, so the first ones stay a
    pure function of the image and can be cached. Returns the adapted layer names, e.g.
    ``encoder.blocks.11.attn.q``. Calling it again adds further adapters (with new names) and
    leaves the existing ones as they are.
    """
    vit_blocks = encoder.get_submodule("encoder.blocks")
    depth = len(vit_blocks)
    if blocks == "all":
        count = depth
    elif isinstance(blocks, int) and not isinstance(blocks, bool) and 1 <= blocks <= depth:
        count = blocks
    else:
        raise UsageError(f"--blocks must be an integer from 1 to {depth} or 'all', got {blocks!r}")
    for name, param in encoder.named_parameters():
        if adapter_group(name) is None:  # adapters of an earlier call keep their state
            param.requires_grad_(False)
    adapted: list[str] = []
    for index in range(depth - count, depth):
        adapted += add_lora(vit_blocks[index], targets, adapters, seed, prefix=f"encoder.blocks.{index}")
    return adapted


def set_active_adapters(model: nn.Module, names: Collection[str] | None,
                        weights: Mapping[str, float | torch.Tensor] | None = None) -> None:
    """Choose which adapters every LoRA layer adds (None: all), e.g. the global part alone, and
    optionally each one's weight: a number, or a tensor with one weight per batch row (an
    adapter without a weight counts once)."""
    extra = set(weights or {}) - set(names or ())
    if extra:
        raise UsageError(f"weights given for adapters {sorted(extra)} that are not active")
    for _, layer in lora_layers(model):
        if names is not None:
            unknown = set(names) - set(layer.adapters)
            if unknown:
                raise UsageError(f"unknown adapters {sorted(unknown)}; present: {list(layer.adapters)}")
        layer.active_adapters = None if names is None else tuple(names)
        layer.adapter_weights = dict(weights or {})


def set_trainable_groups(model: nn.Module, groups: Collection[str],
                         group_of: Callable[[str], str | None] = adapter_group) -> None:
    """Make exactly the parameters whose group is in ``groups`` trainable among grouped parameters.

    Parameters without a group (the frozen backbone) are left untouched. A group that matches no
    parameter is an error, so a method table naming an adapter the model lacks fails loudly.
    """
    present: set[str] = set()
    for name, param in model.named_parameters():
        group = group_of(name)
        if group is None:
            continue
        present.add(group)
        param.requires_grad_(group in groups)
    unknown = set(groups) - present
    if unknown:
        raise ValueError(f"tensor groups {sorted(unknown)} match no parameter; present: {sorted(present)}")
