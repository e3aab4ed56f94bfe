"""CineMA's augmentation on (2, X, Y, Z) images: seeded, and geometrically right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmrfed.data.augment import (
    AugmentSpec,
    adjust_gamma,
    affine_resample,
    augment_batch,
    augment_image,
    augment_spec,
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
    rotated = affine_resample(image, 90.0, (0.0, 0.0), 1.0)
    expected = np.rot90(image.numpy(), 1, axes=(1, 2))
    np.testing.assert_allclose(rotated.numpy(), expected, atol=1e-5)
    rotated_mask = affine_resample(torch.from_numpy(mask[None].astype(np.float32)), 90.0, (0.0, 0.0), 1.0)
    assert np.array_equal(rotated_mask[0].numpy() > 0.5, np.rot90(mask, 1, axes=(0, 1)))
    # -90 degrees is the other way round, and 180 twice is the identity
    back = affine_resample(rotated, -90.0, (0.0, 0.0), 1.0)
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
    rotated = affine_resample(torch.from_numpy(mask[None].astype(np.float32)), 45.0, (0.0, 0.0), 1.0)[0]
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
