"""LoRA with named adapters: exact start at the backbone, the adapted output, seeding, groups."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from cmrfed.errors import UsageError
from cmrfed.model import (
    AdapterSpec,
    LoRALinear,
    adapter_group,
    add_lora,
    build_encoder,
    inject_lora,
    set_active_adapters,
    set_trainable_groups,
)
from cmrfed.model.cinema import Block
from cmrfed.model.lora import DEFAULT_TARGETS

TINY_SHAPE = (64, 64, 8)
DUAL = [AdapterSpec("global", 4, 8.0), AdapterSpec("local", 2, 2.0)]


@pytest.fixture()
def tiny():
    return build_encoder("tiny", input_shape=TINY_SHAPE, seed=0).eval()


def _a_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if adapter_group(n) == "global.A"}


def test_zero_b_starts_exactly_at_the_backbone(tiny) -> None:
    x = torch.rand(2, 2, *TINY_SHAPE)
    keys_before = list(tiny.state_dict())
    with torch.no_grad():
        cls_before, view_before = tiny(x)
    adapted = inject_lora(tiny, "all", DUAL, seed=0)
    assert len(adapted) == 12 * 5 and adapted[0] == "encoder.blocks.0.attn.q"
    with torch.no_grad():
        cls_after, view_after = tiny(x)
    assert torch.equal(cls_after, cls_before) and torch.equal(view_after, view_before)
    # backbone keys unchanged: CineMA's names, adapters added beside them
    keys_after = list(tiny.state_dict())
    assert [k for k in keys_after if adapter_group(k) is None] == keys_before
    assert "encoder.blocks.10.attn.q.adapters.global.A" in keys_after


def test_only_adapters_are_trainable(tiny) -> None:
    inject_lora(tiny, 2, DUAL, seed=0)
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(adapter_group(n) is not None for n in trainable)
    assert {n.split(".")[2] for n in trainable} == {"10", "11"}  # the LAST two blocks
    assert len(trainable) == 2 * 5 * 2 * 2


def test_output_is_base_plus_sum_of_active_adapters() -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        base = nn.Linear(5, 7)
    base = base.to_empty(device="cpu")
    with torch.no_grad():
        base.weight.copy_(torch.randn(7, 5, generator=generator))
        base.bias.copy_(torch.randn(7, generator=generator))
    layer = LoRALinear(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    for spec in DUAL:
        layer.add_adapter(spec, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator))
    x = torch.randn(3, 4, 5, generator=generator)
    g, lo = layer.adapters["global"], layer.adapters["local"]
    plain = x @ base.weight.T + base.bias
    global_part = (8.0 / 4) * (x @ g.A.T) @ g.B.T
    local_part = (2.0 / 2) * (x @ lo.A.T) @ lo.B.T
    with torch.no_grad():
        assert torch.allclose(layer(x), plain + global_part + local_part, atol=1e-5)
        set_active_adapters(layer, ["global"])
        assert torch.allclose(layer(x), plain + global_part, atol=1e-5)
        set_active_adapters(layer, [])
        assert torch.allclose(layer(x), plain, atol=1e-5)
        set_active_adapters(layer, None)
        assert torch.allclose(layer(x), plain + global_part + local_part, atol=1e-5)
        # FedDPA's mix: a weight per batch row for one adapter, a number for the other
        rows = torch.tensor([0.0, 0.5, 2.0])
        set_active_adapters(layer, ["global", "local"], {"global": rows, "local": 0.25})
        mixed = plain + rows.reshape(3, 1, 1) * global_part + 0.25 * local_part
        assert torch.allclose(layer(x), mixed, atol=1e-5)
        # plain weights on both
        set_active_adapters(layer, ["global", "local"], {"global": 0.5, "local": 1.0})
        assert torch.allclose(layer(x), plain + 0.5 * global_part + local_part, atol=1e-5)
    with pytest.raises(UsageError, match="unknown adapters"):
        set_active_adapters(layer, ["nope"])


def test_rank_and_alpha_per_adapter(tiny) -> None:
    inject_lora(tiny, 1, DUAL, seed=0)
    q = tiny.encoder.blocks[11].attn.q
    kv = tiny.encoder.blocks[11].attn.kv
    assert isinstance(q, LoRALinear)
    assert q.adapters["global"].A.shape == (4, 96) and q.adapters["global"].B.shape == (96, 4)
    assert kv.adapters["local"].A.shape == (2, 96) and kv.adapters["local"].B.shape == (192, 2)
    assert q.adapters["global"].scaling == 2.0 and q.adapters["local"].scaling == 1.0
    assert torch.count_nonzero(q.adapters["global"].B) == 0
    assert torch.count_nonzero(q.adapters["global"].A) > 0


def test_frozen_a_gets_no_gradient(tiny) -> None:
    inject_lora(tiny, 2, [AdapterSpec("global", 4, 8.0)], seed=0)
    set_trainable_groups(tiny, {"global.B"})  # FFA-LoRA
    cls, view = tiny(torch.rand(1, 2, *TINY_SHAPE))
    (cls.sum() + view.sum()).backward()
    adapter = tiny.encoder.blocks[11].mlp.fc2.adapters["global"]
    assert adapter.A.grad is None and not adapter.A.requires_grad
    assert adapter.B.grad is not None and torch.count_nonzero(adapter.B.grad) > 0
    assert tiny.encoder.blocks[11].mlp.fc2.weight.grad is None
    with pytest.raises(ValueError, match=re.escape("local.A")):
        set_trainable_groups(tiny, {"local.A"})


def test_same_seed_gives_identical_a_everywhere() -> None:
    def injected(seed: int, blocks: int | str, adapters=DUAL):
        encoder = build_encoder("tiny", input_shape=TINY_SHAPE, seed=seed + 100)  # backbone seed differs
        inject_lora(encoder, blocks, adapters, seed=seed)
        return encoder

    first, second = _a_factors(injected(7, 2)), _a_factors(injected(7, 2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = _a_factors(injected(8, 2))
    assert not any(torch.equal(first[k], other[k]) for k in first)
    # adapting more blocks, or adding the local adapter, leaves each layer's A unchanged
    everything = _a_factors(injected(7, "all", [AdapterSpec("global", 4, 8.0)]))
    assert all(torch.equal(first[k], everything[k]) for k in first)
    model = injected(7, 1)
    q = model.encoder.blocks[11].attn.q.adapters
    assert not torch.equal(q["global"].A[:2], q["local"].A)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_one_adapted_base_block_adds_13056_r_parameters(rank: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init
        block = Block(768, 12, 4)
    adapted = add_lora(block, DEFAULT_TARGETS, [AdapterSpec("global", rank, 2.0 * rank)], seed=0)
    assert adapted == ["attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    count = sum(p.numel() for n, p in block.named_parameters() if adapter_group(n) is not None)
    assert count == 13_056 * rank


def test_adapter_group_names() -> None:
    assert adapter_group("encoder.blocks.10.attn.q.adapters.global.A") == "global.A"
    assert adapter_group("backbone.encoder.blocks.0.mlp.fc2.adapters.local.B") == "local.B"
    assert adapter_group("encoder.blocks.10.attn.q.weight") is None
    assert adapter_group("pred_head_dict.sax.weight") is None
    assert adapter_group("A") is None


def test_bad_options_are_usage_errors(tiny) -> None:
    for blocks in (0, 13, "some", True):
        with pytest.raises(UsageError, match="--blocks"):
            inject_lora(tiny, blocks, DUAL, seed=0)
    with pytest.raises(UsageError, match="qkv"):
        inject_lora(tiny, 1, DUAL, seed=0, targets=("q", "qkv"))
    with pytest.raises(UsageError, match="unique"):
        inject_lora(tiny, 1, [DUAL[0], DUAL[0]], seed=0)
    with pytest.raises(UsageError, match="rank"):
        AdapterSpec("global", 0, 1.0)
    with pytest.raises(UsageError, match="identifier"):
        AdapterSpec("glo.bal", 2, 1.0)
    inject_lora(tiny, 1, [DUAL[0]], seed=0)
    with pytest.raises(UsageError, match="already present"):
        inject_lora(tiny, 1, [DUAL[0]], seed=0)


def test_a_second_injection_adds_adapters_and_keeps_the_first_trainable(tiny) -> None:
    inject_lora(tiny, 2, [DUAL[0]], seed=0)
    inject_lora(tiny, 2, [DUAL[1]], seed=0)
    trainable = {adapter_group(n) for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {"global.A", "global.B", "local.A", "local.B"}
    assert set(tiny.encoder.blocks[10].mlp.fc1.adapters) == {"global", "local"}
