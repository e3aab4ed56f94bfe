"""The frozen-trunk cache changes nothing but speed: logits, loss and LoRA gradients with the
cache equal those without it; half-precision storage stays within a stated tolerance."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cmrfed.data.shards import load_manifest
from cmrfed.fed import cache as cache_module
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.task import build_run_model, load_client_data
from cmrfed.model.classifier import param_group

CPU = torch.device("cpu")


def setup(prepared, **options):
    cfg = FederateConfig(data=str(prepared), method="duallora", rank=4, **{"precision": "fp32", **options})
    manifest = load_manifest(prepared)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    # give every B a non-zero value so the LoRA branch (and A's gradient) is exercised
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in run_model.model.named_parameters():
            if (param_group(name) or "").endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return cfg, manifest, run_model


def logits_loss_grads(model, split):
    trainable = [p for n, p in model.named_parameters() if param_group(n) is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
        p.grad = None
    index = torch.arange(split.rows)  # every z window of every subject
    logits = split.logits(model, index, CPU)
    labels = split.labels if split.window_subject is None else split.labels[split.window_subject]
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def test_cached_fp32_equals_the_full_forward(small_prepared):
    cfg, manifest, run_model = setup(small_prepared)
    model = run_model.model.eval()
    plain = load_client_data(small_prepared, manifest, "siemens", run_model,
                             FederateConfig(**{**cfg.to_dict(), "cache": False}), CPU)
    cached = load_client_data(small_prepared, manifest, "siemens", run_model, cfg, CPU)
    assert cached["train"].start_block == run_model.start_block == 10
    assert plain["train"].start_block is None
    assert cached["train"].subject_ids == plain["train"].subject_ids
    logits_a, loss_a, grads_a = logits_loss_grads(model, plain["train"])
    logits_b, loss_b, grads_b = logits_loss_grads(model, cached["train"])
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    assert any(".adapters.global.A" in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_storage_is_close_and_changes_no_prediction(small_prepared, dtype, tolerance):
    cfg, manifest, run_model = setup(small_prepared, cache_dtype=dtype)
    model = run_model.model.eval()
    reference_cfg = FederateConfig(**{**cfg.to_dict(), "cache_dtype": "float32"})
    for client in manifest.clients:
        exact = load_client_data(small_prepared, manifest, client, run_model, reference_cfg, CPU)
        half = load_client_data(small_prepared, manifest, client, run_model, cfg, CPU)
        assert half["test"].inputs[0].dtype == getattr(torch, dtype)
        with torch.no_grad():
            index = torch.arange(len(exact["test"]))
            a = exact["test"].logits(model, index, CPU)
            b = half["test"].logits(model, index, CPU)
        assert (a - b).abs().max() <= tolerance, (client, (a - b).abs().max())
        assert torch.equal(a.argmax(-1), b.argmax(-1)), client


def test_cache_is_reused_and_keyed_by_everything_it_depends_on(small_prepared, monkeypatch):
    cfg, manifest, run_model = setup(small_prepared)
    load_client_data(small_prepared, manifest, "ge", run_model, cfg, CPU)
    calls = []
    real = cache_module.compute_trunks
    monkeypatch.setattr(cache_module, "compute_trunks", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_client_data(small_prepared, manifest, "ge", run_model, cfg, CPU)
    assert calls == [], "a valid cache entry must be reused"

    key = cache_module.CacheKey(run_model.fingerprint, run_model.start_block, tuple(manifest.shape),
                                "float32")
    others = [
        cache_module.CacheKey("other-weights", key.start_block, key.input_shape, key.dtype),
        cache_module.CacheKey(key.backbone_fingerprint, 9, key.input_shape, key.dtype),
        cache_module.CacheKey(key.backbone_fingerprint, key.start_block, (64, 64, 8), key.dtype),
        cache_module.CacheKey(key.backbone_fingerprint, key.start_block, key.input_shape, "float16"),
    ]
    assert len({k.digest() for k in [key, *others]}) == 5

    # a different shard checksum invalidates the entry: it is recomputed, not trusted
    path = cache_module.cache_path(small_prepared, key, "ge")
    before = os.stat(path).st_mtime_ns
    cache_module.load_or_compute(small_prepared, "ge", ("train",), "not-the-shard-hash",
                                 run_model.model.backbone, key, CPU)
    assert calls == [1, 1, 1]  # train, val, test recomputed
    assert os.stat(path).st_mtime_ns != before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_pass_for_several_start_blocks_writes_what_each_key_computes_alone(small_prepared, tmp_path,
                                                                               monkeypatch, precision):
    """A study's blocks ablation: the trunk runs once per site for blocks 1 and 2, and each file
    holds, bit for bit, what federating with that --blocks alone would have computed."""
    import shutil

    from cmrfed import paths
    from cmrfed.fed.task import cache_key

    alone, joint = tmp_path / "alone", tmp_path / "joint"
    for folder in (alone, joint):
        shutil.copytree(small_prepared, folder, ignore=shutil.ignore_patterns(paths.CACHE_DIR))
    manifest = load_manifest(small_prepared)
    site, splits = manifest.clients[0], ("train", "val", "test")
    models, keys = {}, {}
    for b in (1, 2):
        cfg = FederateConfig(data=str(alone), blocks=b, rank=4, precision=precision)
        models[b] = build_run_model(cfg, tuple(manifest.shape))
        keys[b] = cache_key(cfg, models[b], manifest, CPU)
    assert keys[1].start_block == keys[2].start_block + 1
    cache_module.precompute(joint, site, manifest.shard_sha256[site], models[1].model.backbone,
                            tuple(keys.values()), CPU)
    with monkeypatch.context() as patch:  # what precompute wrote is read, never computed again
        patch.setattr(cache_module, "_compute_splits", lambda *a, **k: pytest.fail("recomputed"))
        got = {b: cache_module.load_or_compute(joint, site, splits, manifest.shard_sha256[site],
                                               models[b].model.backbone, key, CPU) for b, key in keys.items()}
    for b, key in keys.items():
        want = cache_module.load_or_compute(alone, site, splits, manifest.shard_sha256[site],
                                            models[b].model.backbone, key, CPU)
        for split in splits:
            assert torch.equal(got[b][split].hidden, want[split].hidden), (b, split)
            assert torch.equal(got[b][split].skips, want[split].skips), (b, split)
