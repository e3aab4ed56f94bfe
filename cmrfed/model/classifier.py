"""The disease classifier: the frozen CineMA SAX encoder (plus LoRA) and a CineMA-style head.

The head is the one CineMA's own fine-tuning uses (``ConvViT`` with ``reduce="all"``):
``pred_head_dict.sax`` on the mean of the fused view tokens and ``pred_head_dict.cls`` on the cls
token, logits = mean of the two. Keeping its structure and names means a head from CineMA's
fine-tuned SAX files loads by name (:meth:`CineMAClassifier.load_head`), and our fine-tuning
starts from the same head design the CineMA paper evaluated.

Tensor groups (what cmrfed/fed/methods.py trains, shares or keeps): ``"<adapter>.A"``,
``"<adapter>.B"`` for LoRA factors and ``"head"`` for the head; the backbone has no group of
:func:`param_group` and stays frozen, except for full fine-tuning, which holds it as the group
``"backbone"`` (:func:`tensor_group`) and trains it with CineMA's layer-wise lr decay
(:func:`layer_lr_scale`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from cmrfed.errors import DataError
from cmrfed.model.cinema import HEAD_PREFIX, HEAD_VIEWS, VIEW, CineMASaxEncoder, allocate, init_default_
from cmrfed.model.lora import adapter_group, set_trainable_groups
from cmrfed.seeding import seeded_generator

HEAD_GROUP = "head"
BACKBONE_GROUP = "backbone"
_BACKBONE_PREFIX = "backbone."


def param_group(param_name: str) -> str | None:
    """``"head"`` for head tensors, ``"<adapter>.A|B"`` for LoRA tensors, None for the backbone."""
    if param_name.startswith(HEAD_PREFIX):
        return HEAD_GROUP
    return adapter_group(param_name)


def tensor_group(param_name: str) -> str | None:
    """:func:`param_group`, with every other encoder weight in the group ``"backbone"``, except the
    fixed sin-cos position table (a parameter CineMA never trains: ``requires_grad=False``)."""
    group = param_group(param_name)
    if group is not None:
        return group
    return None if param_name.endswith("pos_embed") else BACKBONE_GROUP


def layer_id(param_name: str, depth: int) -> int:
    """CineMA's layer of a parameter for layer-wise lr decay (cinema/convvit.py
    ``get_layer_id_for_vit``, after BEiT): 0 for the conv stem, the fusion (CineMA's ``enc_*``
    modules) and the cls token / position table; i + 1 for block i; ``depth + 1`` for the rest
    (the final norm and the head)."""
    name = param_name.removeprefix(_BACKBONE_PREFIX)
    if name.startswith("enc_") or any(k in name for k in ("cls_token", "pos_embed", "patch_embed",
                                                            "view_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def layer_lr_scale(param_name: str, depth: int, decay: float) -> float:
    """decay ** (depth + 1 - layer): 1 for the head and final norm, decay ** 13 for the stem of a
    12-block encoder (CineMA's ``param_groups_lr_decay``)."""
    return decay ** (depth + 1 - layer_id(param_name, depth))


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
        self.pred_head_dict = allocate(nn.ModuleDict(heads))
        # PyTorch's default Linear init (what CineMA's heads get), from a generator of their own
        generator = seeded_generator(seed, HEAD_GROUP)
        with torch.no_grad():
            for view in HEAD_VIEWS:
                init_default_(self.pred_head_dict[view], generator)
        self.pred_head_dict.to(backbone.encoder.cls_token.device)
        for name, param in self.backbone.named_parameters():
            if adapter_group(name) is None:
                param.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`pooled`: the cls token and the mean view token side by side."""
        return 2 * self.backbone.embed_dim

    @staticmethod
    def pooled(cls: torch.Tensor, view_tokens: torch.Tensor) -> torch.Tensor:
        """What the head reads, as one vector per instance: [cls token ; mean of the view tokens]
        (the inputs of ``pred_head_dict.cls`` and ``pred_head_dict.sax``), (B, 2 D)."""
        return torch.cat([cls, view_tokens.mean(dim=1)], dim=-1)

    def features_from(self, h: torch.Tensor, skips: torch.Tensor, start_block: int) -> torch.Tensor:
        """:meth:`pooled` features from cached tokens (as :meth:`forward_from` computes logits)."""
        return self.pooled(*self._fused(h, skips, start_block))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> :meth:`pooled` features (B, 2 D)."""
        h, skips = self.backbone.embed(x)
        return self.features_from(h, skips, 0)

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
        return self.head(*self._fused(h, skips, start_block))

    def _fused(self, h: torch.Tensor, skips: torch.Tensor,
               start_block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls, fused view tokens) from tokens entering block ``start_block``."""
        h = self.backbone.forward_blocks(h, start_block, self.backbone.depth)
        return self.backbone.fuse(h, skips)

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
