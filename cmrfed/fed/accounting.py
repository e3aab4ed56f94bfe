"""Analytic communication counts, computed from the model's layer shapes and the method table
(independently of the tensors that are actually serialised, so the two can check each other)."""

from __future__ import annotations

from torch import nn

from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import GLOBAL, HEAD, LOCAL, MethodSpec


def analytic_shared_params(
    model: nn.Module, spec: MethodSpec, cfg: FederateConfig, start_block: int, head_params: int
) -> int:
    """Scalars one client sends per round: for every adapted layer (out x in) and every shared
    LoRA group, r * in for an A and out * r for a B; plus the head when it is shared.

    For the base size with one rank-r pair on q, kv, proj, fc1, fc2 this is 13,056 r per block.
    """
    ranks = {GLOBAL: cfg.rank, LOCAL: cfg.effective_local_rank}
    total = 0
    blocks = model.backbone.encoder.blocks
    for block in list(blocks)[start_block:]:
        for name, module in block.named_modules():
            if name.split(".")[-1] not in cfg.targets or not hasattr(module, "weight"):
                continue
            out_features, in_features = module.weight.shape
            for group in spec.shared:
                if group == HEAD:
                    continue
                adapter, factor = group.split(".")
                rank = ranks[adapter]
                total += rank * in_features if factor == "A" else out_features * rank
    if HEAD in spec.shared:
        total += head_params
    return total
