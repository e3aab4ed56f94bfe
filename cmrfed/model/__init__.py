"""The model: CineMA-compatible SAX encoder, LoRA with named adapters, and the classifier."""

from cmrfed.model.cinema import (
    SIZES,
    CineMASaxEncoder,
    EncoderSize,
    backbone_fingerprint,
    build_encoder,
    checkpoint_filter_fn,
    load_backbone,
    load_head_from_checkpoint,
    sincos_pos_table,
)
from cmrfed.model.classifier import HEAD_GROUP, CineMAClassifier, param_group
from cmrfed.model.lora import (
    AdapterSpec,
    LoRAAdapter,
    LoRALinear,
    adapter_group,
    add_lora,
    inject_lora,
    set_active_adapters,
    set_trainable_groups,
)

__all__ = [
    "HEAD_GROUP",
    "SIZES",
    "AdapterSpec",
    "CineMAClassifier",
    "CineMASaxEncoder",
    "EncoderSize",
    "LoRAAdapter",
    "LoRALinear",
    "adapter_group",
    "add_lora",
    "backbone_fingerprint",
    "build_encoder",
    "checkpoint_filter_fn",
    "inject_lora",
    "load_backbone",
    "load_head_from_checkpoint",
    "param_group",
    "set_active_adapters",
    "set_trainable_groups",
    "sincos_pos_table",
]
