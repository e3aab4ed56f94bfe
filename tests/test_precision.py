"""``--precision``: bf16 autocast agrees with float32 within a stated tolerance, keeps float32 where
it must (master weights, loss, DP-SGD's per-sample gradients), keys the trunk cache by precision,
and run.json records the precision ``auto`` resolved to."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_SHAPE, quiet_console

from cmrfed import paths
from cmrfed.data.shards import load_manifest
from cmrfed.fed import inprocess
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS
from cmrfed.fed.privacy import per_sample_grads
from cmrfed.fed.task import build_run_model, cache_key, load_client_data
from cmrfed.model.classifier import param_group
from cmrfed.precision import (
    AUTO,
    BF16,
    FLOAT32_ATTENTION_BELOW,
    FP32,
    attention,
    autocast,
    in_precision,
    native_bf16,
    resolve_precision,
)

CPU = torch.device("cpu")
# bfloat16 keeps 8 bits of mantissa (about 0.4 % per product); through the tiny encoder's blocks
# the logits (of magnitude ~1) move by at most ~0.008 (measured); the tolerance leaves room.
LOGIT_TOLERANCE = 0.03
PROBABILITY_TOLERANCE = 0.01


def _model(method: str, blocks: int = 2):
    run_model = build_run_model(FederateConfig(data="", method=method, blocks=blocks, rank=4), SMALL_SHAPE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would hide the LoRA branch: move off it
        for name, param in run_model.model.named_parameters():
            if (param_group(name) or "").endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return run_model, generator


def _forward(model, batch):
    return model(batch[0])


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_logits_agree_with_fp32_within_the_stated_tolerance(method):
    run_model, generator = _model(method)
    model = run_model.model.eval()
    images = torch.rand((6, 2, *SMALL_SHAPE), generator=generator)
    with torch.no_grad():
        exact = in_precision(_forward, FP32, CPU)(model, (images,))
        approx = in_precision(_forward, BF16, CPU)(model, (images,))
    assert exact.dtype == approx.dtype == torch.float32  # the loss and metrics see float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights untouched
    assert not torch.equal(exact, approx)  # bf16 really ran
    assert (exact - approx).abs().max() <= LOGIT_TOLERANCE
    probs = (exact.softmax(-1) - approx.softmax(-1)).abs().max()
    assert probs <= PROBABILITY_TOLERANCE


def test_the_bf16_cache_is_stored_in_bfloat16_under_a_key_of_its_own(small_prepared):
    manifest = load_manifest(small_prepared)
    client = manifest.clients[0]
    data, keys = {}, {}
    for precision in (FP32, BF16):
        cfg = FederateConfig(data=str(small_prepared), method="duallora", rank=4, precision=precision)
        run_model = build_run_model(cfg, tuple(manifest.shape))
        keys[precision] = cache_key(cfg, run_model, manifest, CPU)
        data[precision] = load_client_data(small_prepared, manifest, client, run_model, cfg, CPU)["test"]
    assert keys[FP32].digest() != keys[BF16].digest()
    assert (keys[BF16].dtype, keys[FP32].dtype) == ("bfloat16", "float32")
    assert data[BF16].inputs[0].dtype == torch.bfloat16 and data[FP32].inputs[0].dtype == torch.float32
    index = torch.arange(data[FP32].rows)
    model = run_model.model.eval()
    with torch.no_grad():
        exact = in_precision(data[FP32].forward, FP32, CPU)(model, data[FP32].batch(index, CPU))
        approx = in_precision(data[BF16].forward, BF16, CPU)(model, data[BF16].batch(index, CPU))
    assert (exact - approx).abs().max() <= LOGIT_TOLERANCE


def test_auto_is_resolved_by_the_device_and_recorded_resolved(small_prepared, tmp_path):
    has_flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(CPU) == has_flags
    assert resolve_precision(AUTO, CPU) == (BF16 if has_flags else FP32)
    assert resolve_precision(FP32, CPU) == FP32 and resolve_precision(BF16, CPU) == BF16
    cfg = FederateConfig(data=str(small_prepared), rounds=1, rank=2)
    assert cfg.precision == AUTO  # the default
    run = tmp_path / "run"
    inprocess.federate(cfg, run, device="cpu", console=quiet_console())
    recorded = json.loads(paths.run_config_path(run).read_text())["config"]
    expected = resolve_precision(AUTO, CPU)
    assert recorded["precision"] == expected
    assert recorded["cache_dtype"] == ("bfloat16" if expected == BF16 else "float32")
    # a run.json written before --precision existed computed in float32
    legacy = {k: v for k, v in recorded.items() if k != "precision"}
    assert FederateConfig.from_dict(legacy).precision == FP32


def test_dp_trains_under_bf16_with_float32_per_sample_gradients_that_clip_to_the_bound(small_prepared,
                                                                                      tmp_path):
    """Opacus clips with the norms of these tensors: they must be float32 (see per_sample_grads)."""
    from opacus.optimizers import DPOptimizer

    run = tmp_path / "dp-bf16"
    cfg = FederateConfig(data=str(small_prepared), rounds=1, rank=2, precision=BF16, dp_epsilon=3.0,
                         class_balanced=False)
    inprocess.federate(cfg, run, device="cpu", console=quiet_console())
    assert json.loads(paths.run_config_path(run).read_text())["config"]["precision"] == BF16

    run_model, generator = _model("duallora", blocks=1)
    model = run_model.model
    model.set_trainable_groups(run_model.spec.trained)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    images = torch.rand((4, 2, *SMALL_SHAPE), generator=generator)
    target = torch.tensor([0, 1, 1, 0])
    grads, _ = per_sample_grads(model, params, _forward, (images,), target, F.cross_entropy)
    assert all(g.dtype == torch.float32 for g in grads.values())
    clip = 1e-3  # far below every sample's norm: every sample is clipped
    optimizer = DPOptimizer(torch.optim.SGD(list(params.values()), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=len(target))
    for name, param in params.items():
        param.grad_sample = grads[name]
    optimizer.pre_step()
    summed = torch.sqrt(sum(p.summed_grad.double().square().sum() for p in params.values()))
    assert summed <= len(target) * clip * (1 + 1e-6)


def test_autocast_refuses_an_unresolved_precision():
    with pytest.raises(ValueError, match="not resolved"):
        autocast(AUTO, CPU)


def _qkv(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(tokens)
    return tuple(torch.randn(2, 3, tokens, 32, generator=generator).to(dtype) for _ in range(3))


def test_short_sequences_attend_in_float32_on_a_cpu_under_bf16():
    """Below FLOAT32_ATTENTION_BELOW tokens the attention is exactly float32 attention of the
    bfloat16 inputs (the demo's 129 tokens: PyTorch's CPU bf16 flash attention is the slower one)."""
    q, k, v = _qkv(129, torch.bfloat16)
    with autocast(BF16, torch.device("cpu")):
        out = attention(q, k, v, scale=32**-0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=32**-0.5))
    # and it is differentiable through the casts, as training needs
    leaves = [t.float().requires_grad_() for t in _qkv(129, torch.float32)]
    with autocast(BF16, torch.device("cpu")):
        attention(*leaves, scale=32**-0.5).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_long_sequences_and_fp32_attend_as_autocast_decides():
    q, k, v = _qkv(FLOAT32_ATTENTION_BELOW, torch.bfloat16)
    with autocast(BF16, torch.device("cpu")):
        long = attention(q, k, v, scale=32**-0.5)
    assert long.dtype == torch.bfloat16  # at and above the crossover bf16 is the faster one
    q, k, v = _qkv(129, torch.float32)
    with autocast(FP32, torch.device("cpu")):
        assert torch.equal(attention(q, k, v, scale=0.1), F.scaled_dot_product_attention(q, k, v, scale=0.1))
