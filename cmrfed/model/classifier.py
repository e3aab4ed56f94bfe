"""The disease classifier: the frozen CineMA SAX encoder (plus LoRA) and a CineMA-style head.

The head is the one CineMA's own fine-tuning uses (``ConvViT`` with ``reduce="all"``):
``pred_head_dict.sax`` on the mean of the fused view tokens and ``pred_head_dict.cls`` on the cls
token, logits = mean of the two. Keeping its structure and names means a head from CineMA's
fine-tuned SAX files loads by name (:meth:`CineMAClassifier.load_head`), and our fine-tuning
starts from the same head design the CineMA paper evaluated.

Tensor groups (what cmrfed/fed/methods.py trains, shares or keeps): ``"<adapter>.A"``,
``"<adapter>.B"`` for LoRA factors and ``"head"`` for the head; the backbone has no group and
stays frozen.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from cmrfed.errors import DataError
from cmrfed.model.cinema import HEAD_PREFIX, HEAD_VIEWS, VIEW, CineMASaxEncoder, init_default_
from cmrfed.model.lora import adapter_group, seeded_generator, set_trainable_groups

HEAD_GROUP = "head"


def param_group(param_name: str) -> str | None:
    """``"head"`` for head tensors, ``"<adapter>.A|B"`` for LoRA tensors, None for the backbone."""
    if param_name.startswith(HEAD_PREFIX):
        return HEAD_GROUP
    return adapter_group(param_name)


class CineMAClassifier(nn.Module):
    """``backbone`` (a :class:`CineMASaxEncoder`, frozen) + ``pred_head_dict`` {sax, cls} heads.

    The backbone's non-LoRA parameters are frozen here; LoRA adapters (injected before or after,
    with ``inject_lora(classifier.backbone, ...)``) and the head are trainable. Parameter names
    are ``backbone.<CineMA key>`` and ``pred_head_dict.{sax,cls}.{weight,bias}``.
    """

    def __init__(self, backbone: CineMASaxEncoder, n_classes: int, seed: int = 0) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.backbone = backbone
        self.n_classes = n_classes
        with torch.device("meta"):
            heads = {view: nn.Linear(backbone.embed_dim, n_classes) for view in HEAD_VIEWS}
        self.pred_head_dict = nn.ModuleDict(heads).to_empty(device="cpu")
        # PyTorch's default Linear init (what CineMA's heads get), from a generator of their own
        generator = seeded_generator(seed, HEAD_GROUP)
        with torch.no_grad():
            for view in HEAD_VIEWS:
                init_default_(self.pred_head_dict[view], generator)
        self.pred_head_dict.to(backbone.encoder.cls_token.device)
        for name, param in self.backbone.named_parameters():
            if adapter_group(name) is None:
                param.requires_grad_(False)

    def head(self, cls: torch.Tensor, view_tokens: torch.Tensor) -> torch.Tensor:
        """(cls (B, D), view tokens (B, N, D)) -> logits (B, n_classes)."""
        logits = torch.stack([self.pred_head_dict[VIEW](view_tokens.mean(dim=1)),
                              self.pred_head_dict["cls"](cls)])
        return logits.mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> logits (B, n_classes)."""
        h, skips = self.backbone.embed(x)
        return self.forward_from(h, skips, 0)

    def forward_from(self, h: torch.Tensor, skips: torch.Tensor, start_block: int) -> torch.Tensor:
        """Logits from cached tokens: h after ``blocks[:start_block]`` and the stem skips."""
        h = self.backbone.forward_blocks(h, start_block, self.backbone.depth)
        return self.head(*self.backbone.fuse(h, skips))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of every trainable tensor by name (the adapters being trained and the head)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def group_state(self, groups: Collection[str]) -> dict[str, torch.Tensor]:
        """Copies of every tensor whose group is in ``groups`` (e.g. what a method shares)."""
        return {name: p.detach().clone() for name, p in self.named_parameters()
                if param_group(name) in groups}

    def load_group_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy grouped tensors (adapters, head) in by name; unknown names or shapes -> DataError."""
        params = dict(self.named_parameters())
        bad = sorted(name for name, t in state.items()
                     if name not in params or param_group(name) is None
                     or params[name].shape != t.shape)
        if bad:
            raise DataError(f"{source}: tensors that do not fit this model (unknown name, backbone "
                            f"tensor or wrong shape): {', '.join(bad[:12])}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def load_head(self, head: Mapping[str, torch.Tensor], source: str) -> None:
        """Load ``pred_head_dict.*`` tensors, e.g. from ``load_head_from_checkpoint``."""
        self.load_group_state(head, source)

    def set_trainable_groups(self, groups: Collection[str]) -> None:
        """Train exactly these groups among adapters and head (e.g. FFA-LoRA: {"global.B", "head"})."""
        set_trainable_groups(self, groups, group_of=param_group)
