"""Augmented views and the frozen-trunk cache: the cached views are the trunk on the augmented
images, shared by every method and seed of a study, and a cached run trains like an on-the-fly one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.data.augment import AugmentSpec, augment_image
from cmrfed.data.shards import load_manifest, load_split
from cmrfed.errors import UsageError
from cmrfed.fed import cache
from cmrfed.fed.cache import compute_trunk
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.task import build_client, build_run_model
from cmrfed.fed.views import CachedViews, OnTheFlyViews

CLIENT = "ge"


def site(prepared, **options):
    # float32: the cached views are compared with the trunk recomputed in float32
    cfg = FederateConfig(data=str(prepared), blocks=2, rank=4,
                         **{"precision": "fp32", "augment_views": 3, **options})
    manifest = load_manifest(prepared)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    client, data = build_client(cfg, prepared, manifest, CLIENT, run_model, torch.device("cpu"))
    return cfg, run_model, client, data


def test_cached_views_equal_the_trunk_on_augmented_images(small_prepared):
    _cfg, run_model, client, _ = site(small_prepared)
    assert isinstance(client.views, CachedViews)
    hidden, skips = client.views.tensors
    images = load_split(small_prepared, CLIENT, "train").images
    n = client.train.rows  # input rows: one per z window of each subject
    assert len(images) == n and hidden.shape[:2] == (3, n) and skips.shape[:2] == (3, n)
    _, _, fly, _ = site(small_prepared, cache=False)
    assert isinstance(fly, type(client)) and isinstance(fly.views, OnTheFlyViews)
    for k in range(3):
        augmented = torch.stack([
            augment_image(torch.from_numpy(images[i]),
                          torch.Generator().manual_seed(int(fly.views.seeds[i, k])), AugmentSpec())
            for i in range(n)
        ])
        h, s = compute_trunk(run_model.model.backbone, augmented.numpy(), run_model.start_block,
                             torch.device("cpu"), 4)
        torch.testing.assert_close(hidden[k], h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(skips[k], s, atol=1e-5, rtol=1e-5)
    # the views differ from each other and from the plain features
    assert not torch.allclose(hidden[0], hidden[1])
    plain_h, _ = client.train.inputs
    assert not torch.allclose(hidden[0], plain_h)
    # a step's draw gives the same views from both sources
    index = torch.tensor([0, 2, 1])
    cached = client.views.inputs(index, torch.Generator().manual_seed(11))
    raw = fly.views.inputs(index, torch.Generator().manual_seed(11))
    h, s = compute_trunk(run_model.model.backbone, raw[0].numpy(), run_model.start_block,
                         torch.device("cpu"), 4)
    torch.testing.assert_close(cached[0], h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached[1], s, atol=1e-5, rtol=1e-5)


def test_one_views_file_serves_every_method_and_seed_and_is_keyed_by_the_recipe(small_prepared, monkeypatch):
    _, _, client, _ = site(small_prepared)
    client.views.tensors  # noqa: B018 (built, or read, once here)
    files = set(paths.feature_cache_dir(small_prepared).glob(f"*/{CLIENT}.views.h5"))
    calls = []
    real = cache.compute_views
    monkeypatch.setattr(cache, "compute_views", lambda *a, **k: calls.append(1) or real(*a, **k))
    for method in ("fedlora", "ffalora", "central"):
        _, _, other, _ = site(small_prepared, method=method)
        torch.testing.assert_close(other.views.tensors[0], client.views.tensors[0], atol=0, rtol=0)
    assert calls == []
    # the views are seeded without the run seed (which here also seeds the random backbone, so
    # the trunk differs; with a CineMA weights file one views file serves every seed)
    seeds = [site(small_prepared, seed=s, cache=False)[2].views.seeds for s in (0, 5)]
    assert torch.equal(seeds[0], seeds[1])
    _, _, reseeded, _ = site(small_prepared, augment_seed=1)
    reseeded.views.tensors  # noqa: B018
    assert calls == [1]
    assert set(paths.feature_cache_dir(small_prepared).glob(f"*/{CLIENT}.views.h5")) - files
    assert not torch.allclose(reseeded.views.tensors[0], client.views.tensors[0])


def test_a_cached_run_trains_like_an_on_the_fly_run(small_prepared, tmp_path):
    base = FederateConfig(data=str(small_prepared), method="fedlora", precision="fp32", blocks=2, rank=4,
                          rounds=1, augment_views=2, lr=5e-3)
    for name, cfg in (("cached", base), ("fly", replace(base, cache=False))):
        federate(cfg, tmp_path / name, device="cpu", console=quiet_console())
    a = load_file(str(paths.shared_tensors_path(tmp_path / "cached")))
    b = load_file(str(paths.shared_tensors_path(tmp_path / "fly")))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def test_augmentation_off_keeps_the_plain_split_and_zero_views_need_no_cache(small_prepared):
    _, _, client, _ = site(small_prepared, augment="none")
    assert client.views is None
    with pytest.raises(UsageError, match="--no-cache"):
        site(small_prepared, augment_views=0)
    cfg = FederateConfig(data=str(small_prepared), blocks=2, rank=4, precision="fp32", augment_views=0,
                         cache=False)
    manifest = load_manifest(small_prepared)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    client, _ = build_client(cfg, small_prepared, manifest, CLIENT, run_model, torch.device("cpu"))
    draws = [client.views.inputs(torch.tensor([0, 1]), torch.Generator().manual_seed(s))[0]
             for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_subjects_with_several_z_windows_get_views_per_window_and_train():
    from cmrfed.data.augment import AugmentSpec as Spec
    from cmrfed.fed.client import Client, SplitTensors, TrainConfig
    from cmrfed.fed.methods import METHODS
    from cmrfed.fed.views import row_ids, view_seeds
    from cmrfed.model.cinema import build_encoder
    from cmrfed.model.classifier import CineMAClassifier, tensor_group

    assert row_ids(("a", "b"), None) == ("a", "b")
    window_subject = torch.tensor([0, 0, 1, 2, 2, 2])
    rows = row_ids(("a", "b", "c"), window_subject)
    assert rows == ("a#0", "a#1", "b#0", "c#0", "c#1", "c#2")
    seeds = view_seeds(0, "ge", rows, 2)
    assert seeds.shape == (6, 2) and len(set(seeds.flatten().tolist())) == 12
    model = CineMAClassifier(build_encoder("tiny", input_shape=(32, 32, 4), seed=0), n_classes=2, seed=0)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if tensor_group(n) == "head"}
    images = torch.rand((6, 2, 32, 32, 4), generator=torch.Generator().manual_seed(0))
    split = SplitTensors(("a", "b", "c"), torch.tensor([0, 1, 0]), (images,), window_subject=window_subject)
    views = OnTheFlyViews(2, images, seeds, Spec())
    spec = METHODS["central"]
    client = Client("c", 0, spec, state, split, None, TrainConfig(batch_size=2), 0, views=views)
    result = client.fit(model, 1, torch.device("cpu"))
    assert result.num_examples == 3 and torch.isfinite(torch.tensor(result.train_loss))
