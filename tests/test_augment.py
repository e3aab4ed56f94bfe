"""CineMA's augmentation on (2, X, Y, Z) images: seeded, and geometrically right."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cmrfed.data.augment import (
    AugmentSpec,
    adjust_gamma,
    affine_resample,
    apply_augment,
    augment_batch,
    augment_image,
    augment_spec,
    draw_augment,
    subject_view_seed,
)
from cmrfed.errors import UsageError


def phantom(n: int = 32, z: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    """An asymmetric blob (an L of two rectangles, off-centre) as a 2-channel image and its mask;
    ES is a dimmer copy of ED."""
    mask = np.zeros((n, n, z), dtype=bool)
    mask[6:20, 8:12, :] = True  # the long bar of the L
    mask[16:20, 12:24, 1:] = True  # its foot, absent from slice 0
    ed = mask.astype(np.float32) * 0.8 + 0.1
    image = torch.from_numpy(np.stack([ed, ed * 0.5]))
    return image, mask


def test_a_90_degree_rotation_rotates_the_mask_like_rot90():
    image, mask = phantom()
    rotated = affine_resample(image, -90.0, (0.0, 0.0), 1.0)
    expected = np.rot90(image.numpy(), 1, axes=(1, 2))
    np.testing.assert_allclose(rotated.numpy(), expected, atol=1e-5)
    rotated_mask = affine_resample(torch.from_numpy(mask[None].astype(np.float32)), -90.0, (0.0, 0.0), 1.0)
    assert np.array_equal(rotated_mask[0].numpy() > 0.5, np.rot90(mask, 1, axes=(0, 1)))
    # -90 degrees is the other way round, and 180 twice is the identity
    back = affine_resample(rotated, 90.0, (0.0, 0.0), 1.0)
    np.testing.assert_allclose(back.numpy(), image.numpy(), atol=1e-5)
    half = affine_resample(affine_resample(image, 180.0, (0.0, 0.0), 1.0), 180.0, (0.0, 0.0), 1.0)
    np.testing.assert_allclose(half.numpy(), image.numpy(), atol=1e-5)


def test_an_integer_shift_moves_the_image_and_pads_with_zeros():
    image, _mask = phantom()
    shifted = affine_resample(image, 0.0, (3.0, -2.0), 1.0).numpy()
    # output voxel p samples input p + t: the content moves by -t
    expected = np.zeros_like(image.numpy())
    expected[:, : 32 - 3, 2:, :] = image.numpy()[:, 3:, : 32 - 2, :]
    np.testing.assert_allclose(shifted, expected, atol=1e-6)


def test_a_45_degree_rotation_moves_the_centroid_by_the_rotation_and_keeps_slices_apart():
    _image, mask = phantom()
    rotated = affine_resample(torch.from_numpy(mask[None].astype(np.float32)), -45.0, (0.0, 0.0), 1.0)[0]
    centre = (32 - 1) / 2

    def centroid(m: np.ndarray) -> np.ndarray:
        x, y = np.nonzero(m)
        return np.array([x.mean(), y.mean()]) - centre

    for z in range(4):
        before = centroid(mask[:, :, z])
        after = centroid(rotated[:, :, z].numpy() > 0.5)
        c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
        # output p samples R p: content at q appears at R^-1 q
        expected = np.array([c * before[0] - s * before[1], s * before[0] + c * before[1]])
        np.testing.assert_allclose(after, expected, atol=0.6)
    # slice 0 has no foot: the foot's voxels never leak across z
    assert rotated[:, :, 0].sum() < rotated[:, :, 1].sum()


def test_scaling_stretches_x_only():
    mask = np.zeros((32, 32, 2), dtype=bool)
    mask[12:20, 13:17, :] = True  # centred, so the stretch stays inside the plane
    scaled = affine_resample(torch.from_numpy(mask[None].astype(np.float32)), 0.0, (0.0, 0.0), 0.5)[0] > 0.5
    x_extent = np.nonzero(scaled.numpy().any(axis=(1, 2)))[0]
    y_extent = np.nonzero(scaled.numpy().any(axis=(0, 2)))[0]
    assert np.ptp(x_extent) > 1.8 * np.ptp(np.nonzero(mask.any(axis=(1, 2)))[0])
    assert np.array_equal(y_extent, np.nonzero(mask.any(axis=(0, 2)))[0])


def test_same_seed_same_view_and_other_seeds_other_views():
    image, _ = phantom()
    spec = AugmentSpec()
    views = [augment_image(image, torch.Generator().manual_seed(s), spec) for s in (7, 7, 8)]
    assert torch.equal(views[0], views[1])
    assert not torch.equal(views[0], views[2])
    batch = augment_batch(torch.stack([image, image]), [7, 8], spec)
    assert torch.equal(batch[0], views[0]) and torch.equal(batch[1], views[2])
    many = torch.stack([augment_image(image, torch.Generator().manual_seed(s), spec) for s in range(40)])
    assert many.shape == (40, *image.shape)
    assert float(many.min()) >= 0.0 and float(many.max()) <= 1.0 + 1e-6
    # with probability 0.5 each, some views are rotated and some are not
    unrotated = [bool(torch.allclose(v[0] > 0.5, image[0] > 0.5)) for v in many]
    assert 3 <= sum(unrotated) <= 37


def test_gamma_keeps_the_range_and_bends_the_middle():
    image = torch.linspace(0, 1, 11).reshape(1, 11, 1, 1).repeat(2, 1, 1, 1)
    bright = adjust_gamma(image, 0.5)
    assert torch.isclose(bright.min(), image.min()) and torch.isclose(bright.max(), image.max(), atol=1e-6)
    assert float(bright[0, 5]) == pytest.approx(0.5 ** 0.5, abs=1e-6)


def test_view_seeds_depend_on_every_coordinate_and_names_are_checked():
    base = subject_view_seed(0, "ge", "acdc-001", 0)
    assert base == subject_view_seed(0, "ge", "acdc-001", 0)
    others = {subject_view_seed(1, "ge", "acdc-001", 0), subject_view_seed(0, "canon", "acdc-001", 0),
              subject_view_seed(0, "ge", "acdc-002", 0), subject_view_seed(0, "ge", "acdc-001", 1)}
    assert base not in others and len(others) == 4
    assert augment_spec("none") is None and augment_spec("cinema") == AugmentSpec()
    with pytest.raises(UsageError, match="--augment"):
        augment_spec("heavy")


# --- fidelity to CineMA's MONAI transforms -------------------------------------------------------


def _stored_image(seed: int = 0) -> torch.Tensor:
    """A (2, X, Y, Z) model input as ``prepare`` makes it: uint8 values rescaled to [0, 1]."""
    rng = np.random.default_rng(seed)
    image, _ = phantom(24, 3)
    stored = np.floor(255 * np.clip(image.numpy() + 0.05 * rng.standard_normal(image.shape), 0, 1))
    stored.flat[0], stored.flat[1] = 0, 255
    return torch.from_numpy(stored / 255.0).to(torch.float32)


@pytest.mark.parametrize("coins", [(True, True, True), (True, False, False), (False, True, True)])
def test_fixed_parameters_give_monais_transforms_on_cinemas_uint8_scale(coins):
    monai = pytest.importorskip("monai.transforms")
    image = _stored_image()
    generator = torch.Generator().manual_seed(3)
    spec = AugmentSpec()
    draw = draw_augment(tuple(image.shape), generator, spec)
    noise = monai.RandGaussianNoise(prob=1.0, mean=0.0, std=spec.noise_std)
    noise.set_random_state(seed=11)
    noise.randomize(image)
    monai_noise = torch.as_tensor(noise.noise, dtype=torch.float32)
    draw = replace(draw, coins=coins, noise=monai_noise, std=1.0)  # MONAI's field, already scaled
    ours = apply_augment(image, draw, spec)

    # CineMA: the uint8 values (as the dataset hands them over), then MONAI's deterministic steps
    expected = torch.round(image * 255)
    if coins[0]:
        expected = monai.AdjustContrast(gamma=draw.gamma)(expected)
    if coins[1]:
        expected = noise(expected, randomize=False)
    expected = monai.ScaleIntensity()(expected)
    if coins[2]:
        affine = monai.Affine(rotate_params=(0.0, 0.0, np.deg2rad(draw.angle)),
                              translate_params=(*draw.shift, 0.0), scale_params=(draw.scale_x, 1.0, 1.0),
                              mode="bilinear", padding_mode="zeros", image_only=True)
        expected = affine(expected)
    np.testing.assert_allclose(ours.numpy(), torch.as_tensor(expected).numpy(), atol=2e-5)


def test_noise_is_at_most_a_tenth_of_one_uint8_level():
    """CineMA adds std <= 0.1 to 0..255 values: after the rescale, <= 0.1 / 255 of the range (the
    old cmrfed recipe added up to 0.1, a tenth of the whole range). The rescale also stretches the
    view a little (the noise moves its min and max), so the noise is what a linear fit of the noisy
    view on the plain one leaves."""
    image = _stored_image(1)
    spec = AugmentSpec()
    for seed in range(10):
        draw = draw_augment(tuple(image.shape), torch.Generator().manual_seed(seed), spec)
        plain = apply_augment(image, replace(draw, coins=(False, False, False)), spec).double().flatten()
        noisy = apply_augment(image, replace(draw, coins=(False, True, False)), spec).double().flatten()
        slope, intercept = np.polyfit(plain.numpy(), noisy.numpy(), 1)
        residual = float(np.std(noisy.numpy() - (slope * plain.numpy() + intercept)))
        assert residual == pytest.approx(draw.std / 255.0, rel=0.05, abs=2e-7)
        assert residual <= spec.noise_std / 255.0 * 1.05


def test_the_views_cache_key_holds_the_intensity_scale():
    """Views cached under the old, 255 times stronger noise are never read again."""
    from cmrfed.fed.cache import CacheKey, ViewsKey

    base = CacheKey("fingerprint", 10, (32, 32, 4), "float32")
    old = AugmentSpec(intensity_scale=1.0)
    assert ViewsKey(base, AugmentSpec(), 8, 0).digest() != ViewsKey(base, old, 8, 0).digest()
