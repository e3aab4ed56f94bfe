"""CineMA's preprocessing, rule by rule, on hand-worked cases (cmrfed/data/preprocess.py).

Each test pins one rule of CineMA's code with numbers worked out by hand, so that changing the
rule (rounding, origin shift, crop start, storage, load-time rescale, padding, windows) fails.
"""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cmrfed.data import model_input as mi
from cmrfed.data import preprocess as pp
from cmrfed.data.layouts import SubjectFrames
from cmrfed.data.nifti import read_nifti
from cmrfed.data.shards import FORMAT_VERSION, load_manifest, load_split, write_manifest
from cmrfed.errors import DataError
from cmrfed.fed.client import load_into
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.task import build_client, build_run_model
from cmrfed.fed.windows import split_tensors
from cmrfed.paths import shard_path

CINEMA = (1.0, 1.0, 10.0)
ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # index i -> world y, index j -> world -x


def _ramp(axis: int, n: int = 10, dtype: type = np.float64) -> np.ndarray:
    """A (n, 4, 3) or (4, n, 3) volume whose value is the voxel index along ``axis``."""
    shape = [4, 4, 3]
    shape[axis] = n
    values = np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])
    return np.broadcast_to(values, shape).astype(dtype)


# ----------------------------------------------------------------------------- 1. resampling


def test_resampled_size_rounds_half_to_even():
    # 186 voxels of 1.25 mm = 232.5 mm -> 232 voxels of 1 mm (floor(x + 0.5) would give 233)
    assert pp.resampled_size((186, 186, 10), (1.25, 1.25, 10.0), CINEMA) == (232, 232, 10)
    assert pp.resampled_size((187, 10, 9), (1.25, 1.25, 10.0), CINEMA) == (234, 12, 9)  # 233.75, 12.5
    assert pp.resampled_size((7, 5, 7), (0.5, 0.5, 5.0), CINEMA) == (4, 2, 4)  # 3.5 -> 4, 2.5 -> 2
    assert pp.resample(_ramp(0), (1.25, 1.25, 10.0), CINEMA, labels=False).shape == (12, 5, 3)


def test_origin_shifted_half_a_spacing_difference():
    # output voxel u samples input index (u + 0.5 (1 - 1.25)) / 1.25 = (u - 0.125) / 1.25:
    # u = 5 -> 3.9 (without the shift it would be 4.0)
    out = pp.resample(_ramp(0), (1.25, 1.25, 10.0), CINEMA, labels=False)
    np.testing.assert_allclose(out[1:8, 1, 1], [0.7, 1.5, 2.3, 3.1, 3.9, 4.7, 5.5], atol=1e-9)
    # the absolute origin does not matter, only the shift relative to it
    moved = pp.resample(_ramp(0), (1.25, 1.25, 10.0), CINEMA, labels=False, origin=(-100.3, 20.7, 5.0))
    np.testing.assert_allclose(moved, out, atol=1e-9)


def test_origin_shift_is_along_world_axes_under_an_oblique_direction():
    # ramp along index j. Identity direction: j shift -0.125 mm -> (u - 0.125) / 1.25.
    # Rotated 90 degrees about z, index j runs along world -x: the world shift (-0.125, -0.125, 0)
    # moves index j by +0.125 / 1.25 -> (u + 0.125) / 1.25: u = 5 -> 4.1 instead of 3.9.
    volume = _ramp(1)
    straight = pp.resample(volume, (1.25, 1.25, 10.0), CINEMA, labels=False)
    oblique = pp.resample(volume, (1.25, 1.25, 10.0), CINEMA, labels=False, direction=ROTATED)
    np.testing.assert_allclose(straight[2, 5, 1], 3.9, atol=1e-9)
    np.testing.assert_allclose(oblique[2, 1:8, 1], [0.9, 1.7, 2.5, 3.3, 4.1, 4.9, 5.7], atol=1e-9)


def test_pixel_type_kept_int16_truncates():
    # linear interpolation in the image's own type: 3 x 3.9 = 11.7 -> int16 11 (ITK truncates)
    out = pp.resample(3 * _ramp(0, dtype=np.int16), (1.25, 1.25, 10.0), CINEMA, labels=False)
    assert out.dtype == np.int16
    assert out[1:8, 1, 1].tolist() == [2, 4, 6, 9, 11, 14, 16]
    # labels: nearest neighbour of the same source indices 0.7, 2.3, 3.9, 4.7 -> 1, 2, 4, 5
    # (linear + truncation would give 0, 2, 3, 4)
    labels = pp.resample(_ramp(0, dtype=np.int16), (1.25, 1.25, 10.0), CINEMA, labels=True)
    assert labels.dtype == np.int16 and labels[[1, 3, 5, 6], 1, 1].tolist() == [1, 2, 4, 5]


def test_nifti_keeps_stored_pixel_type_and_simpleitk_direction(tmp_path):
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.25, 1.25, 10.0])
    affine[:3, 3] = (-120.0, 33.0, 71.0)
    data = np.arange(8 * 6 * 3, dtype=np.int16).reshape(8, 6, 3)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    path = tmp_path / "oblique.nii.gz"
    nib.save(image, path)
    volume = read_nifti(path, ndim=3)
    reference = sitk.ReadImage(str(path))
    assert volume.array.dtype == np.int16 and volume.orientation_from == "SimpleITK"
    np.testing.assert_allclose(volume.direction, reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    assert volume.direction[0] == pytest.approx(-np.cos(angle), abs=1e-6)  # RAS x -> LPS -x


def test_orientation_from_nibabel_where_simpleitk_refuses_the_header(tmp_path):
    affine = np.diag([1.25, 1.25, 10.0, 1.0])
    affine[0, 1] = 0.6  # sheared sform, no qform: ITK finds no orthonormal definition
    image = nib.Nifti1Image(np.zeros((8, 6, 3), np.int16), affine)
    image.set_sform(affine, code=1)
    image.header["qform_code"] = 0
    path = tmp_path / "sheared.nii.gz"
    nib.save(image, path)
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(path))
    volume = read_nifti(path, ndim=3)
    direction = np.array(volume.direction).reshape(3, 3)
    assert volume.orientation_from == "nibabel"
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)
    assert direction[0, 0] < 0 and direction[2, 2] == pytest.approx(1.0)  # RAS x -> LPS -x
    out = pp.resample(volume.array, volume.spacing, CINEMA, labels=False, origin=volume.origin,
                      direction=volume.direction)
    assert out.shape == (10, 8, 3) and out.dtype == np.int16


# ----------------------------------------------------------------------------- 2. crop


def test_crop_start_from_bounding_box():
    # bbox [100, 142] inclusive: centre 121, start ceil(121 - 96) = 25 (not 26)
    assert pp.crop_start((100 + 142) / 2, 300, 192) == 25
    assert pp.crop_start((100 + 143) / 2, 300, 192) == 26  # ceil(25.5)
    assert pp.crop_start((5 + 20) / 2, 300, 192) == 0  # kept in bounds, low side
    assert pp.crop_start((280 + 290) / 2, 300, 192) == 108  # kept in bounds, high side
    assert pp.crop_start(40.0, 150, 192) == 0  # field of view smaller: nothing cropped


def _frames(ed: np.ndarray, es: np.ndarray, labels: np.ndarray | None, spacing=CINEMA) -> SubjectFrames:
    return SubjectFrames(ed=ed, es=es, spacing=spacing, ed_labels=labels, cine=None, ed_index=0,
                         es_index=1, sources=(), warnings=())


def test_preprocess_crops_in_plane_around_lv_and_keeps_every_slice():
    rng = np.random.default_rng(0)
    ed = rng.normal(100, 20, (300, 250, 20)).astype(np.float32)
    es = rng.normal(90, 25, (300, 250, 20)).astype(np.float32)
    labels = np.zeros(ed.shape, np.int16)
    labels[100:143, 150:161, 3:9] = 3  # LV: x 100..142, y 150..160
    labels[20:30, 20:30, :] = 1  # another structure, ignored
    result = pp.preprocess(_frames(ed, es, labels), 3, CINEMA, (192, 192, 16))
    assert result.centre_from == "labels" and result.centre == (121.0, 155.0, 5.5)
    assert result.crop_start == (25, 58)  # ceil(121 - 96), ceil(155 - 96) -> clipped to 250 - 192
    assert result.image.shape == (2, 192, 192, 20) and result.image.dtype == np.uint8  # no z crop
    np.testing.assert_array_equal(result.image[0], pp.normalise_uint8(ed[25:217, 58:250]))
    np.testing.assert_array_equal(result.image[1], pp.normalise_uint8(es[25:217, 58:250]))


def test_label_free_fallback_uses_the_same_crop_rule():
    cine = np.zeros((260, 200, 4, 6), np.float32)
    for t in range(6):  # a pulsing disc at (150, 90): the only thing that moves
        x, y = np.ogrid[:260, :200]
        cine[..., t] = (((x - 150) ** 2 + (y - 90) ** 2) < (20 + 3 * t) ** 2)[..., None] * 100.0
    frames = SubjectFrames(ed=cine[..., 0], es=cine[..., 3], spacing=CINEMA, ed_labels=None, cine=cine,
                           ed_index=0, es_index=3, sources=(), warnings=())
    result = pp.preprocess(frames, 3, CINEMA, (192, 192, 16))
    assert result.centre_from == "label-free"
    assert result.centre[:2] == pytest.approx((150.0, 90.0), abs=1.0)
    expected = tuple(pp.crop_start(c, n, 192) for c, n in zip(result.centre[:2], (260, 200), strict=True))
    assert result.crop_start == expected and result.image.shape == (2, 192, 192, 4)


# ----------------------------------------------------------------------------- 3. intensities


def test_normalise_is_percentile_clip_then_floor_255():
    volume = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    # percentiles 0.95 / 99.5 of 0..999: 9.4905 and 994.005 (linear interpolation)
    low, high = 0.0095 * 999, 0.995 * 999
    expected = np.floor(255 * (np.clip(volume, low, high) - low) / (high - low))
    out = pp.normalise_uint8(volume)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[9, 9, 9] >= 254
    assert (out == expected).mean() > 0.99  # floor, not round: rounding would move half of them
    assert np.abs(out - expected).max() <= 1  # only last-bit float ties may differ
    # clipped: every voxel below the low percentile is 0, above the high one is the top value
    assert (out.ravel()[:10] == 0).all() and (out.ravel()[995:] == out.max()).all()


def test_normalise_int16_clamps_in_its_own_type():
    volume = np.arange(-500, 500, dtype=np.int16).reshape(10, 10, 10)
    out = pp.normalise_uint8(volume)
    # bounds -490.5095 / 494.005 become int16 -490 / 494 inside SimpleITK's Clamp
    low, high = -490, 494
    expected = np.floor(255 * (np.clip(volume.astype(np.float64), low, high) - low) / (high - low))
    assert (out == expected).mean() > 0.99 and np.abs(out - expected).max() <= 1
    assert (out.ravel()[:11] == 0).all()  # -500..-490 all clipped to the bottom


def test_constant_volume_gives_zeros():
    assert not pp.normalise_uint8(np.full((4, 4, 3), 7, np.int16)).any()


# ----------------------------------------------------------------------------- 4. load


def test_load_rescales_ed_and_es_together_and_pads_at_the_end():
    ed = np.zeros((180, 150, 10), np.uint8)
    es = np.zeros((180, 150, 10), np.uint8)
    ed[0, 0, 0], ed[1, 0, 0] = 20, 200
    es[0, 0, 0], es[1, 0, 0] = 10, 250
    out = mi.model_input(np.stack([ed, es]), (192, 192, 16))
    assert out.shape == (1, 2, 192, 192, 16) and out.dtype == np.float32
    # one min-max over both channels: min 0, max 250
    assert out[0, 0, 1, 0, 0] == np.float32(200) / np.float32(250)
    assert out[0, 1, 1, 0, 0] == 1.0 and out[0, 0, 0, 0, 0] == np.float32(20) / np.float32(250)
    # zero padding at the END of x (180 -> 192), y (150 -> 192) and z (10 -> 16)
    assert not out[..., 180:, :, :].any() and not out[..., 150:, :].any() and not out[..., 10:].any()
    stacked = np.stack([ed, es]).astype(np.float32) / np.float32(250)
    np.testing.assert_array_equal(out[0, :, :180, :150, :10], stacked)


def test_windows_over_deep_stacks():
    assert mi.window_starts(10, 16) == [0]
    assert mi.window_starts(16, 16) == [0]
    assert mi.window_starts(17, 16) == [0, 1]
    assert mi.window_starts(24, 16) == [0, 8]
    assert mi.window_starts(30, 16) == [0, 8, 14]
    stored = np.zeros((2, 192, 192, 20), np.uint8)
    stored[0, 0, 0, :] = np.arange(20) + 1
    out = mi.model_input(stored, (192, 192, 16))
    assert out.shape == (2, 2, 192, 192, 16)  # windows [0, 16) and [4, 20)
    assert out[0, 0, 0, 0, 0] * 20 == pytest.approx(1) and out[1, 0, 0, 0, -1] == 1.0
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    np.testing.assert_allclose(mi.combine_windows(probs, np.array([0, 0, 1]), 2),
                               [[0.4, 0.6], [0.9, 0.1]])


def test_window_rows_draw_one_window_per_subject_and_predict_the_mean():
    ids, labels = ("a", "b", "c"), np.array([0, 1, 1])
    inputs = (torch.arange(6.0)[:, None],)
    split = split_tensors(ids, labels, np.array([0, 1, 1, 1, 2, 2]), inputs)
    assert split.subject_ids == ids and len(split) == 3 and split.rows == 6
    assert split.window_subject.tolist() == [0, 1, 1, 1, 2, 2]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([split.draw_windows(generator) for _ in range(300)])
    assert (draws[:, 0] == 0).all()  # "a" has one window: row 0
    assert set(draws[:, 1].tolist()) == {1, 2, 3} and set(draws[:, 2].tolist()) == {4, 5}
    single = split_tensors(ids, labels, np.array([0, 1, 2]), inputs)
    assert single.window_subject is None and single.rows == 3


def test_client_predicts_the_mean_of_window_probabilities(small_prepared):
    # the small cohort has 8-10 slices at --shape z = 4: every subject has 3-4 windows
    cfg = FederateConfig(data=str(small_prepared), method="fedlora", rank=2, backbone="tiny", cache=False,
                         precision="fp32")  # the expected values are computed in float32
    manifest = load_manifest(small_prepared)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    client, data = build_client(cfg, small_prepared, manifest, "siemens", run_model, torch.device("cpu"))
    test = data["test"]
    assert test.window_subject is not None and test.rows > len(test) > 0
    load_into(run_model.model, client.state)
    run_model.model.eval()
    with torch.no_grad():
        rows = torch.softmax(test.logits(run_model.model, torch.arange(test.rows), torch.device("cpu")), -1)
    expected = [rows[test.window_subject == i, 1].mean().item() for i in range(len(test))]
    predicted = client.predict(run_model.model, test, torch.device("cpu"))
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- shards


def test_old_float32_shards_are_refused(tmp_path):
    path = shard_path(tmp_path, "siemens")
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as shard:
        shard.attrs["format_version"] = 1
        shard.attrs["shape"] = [32, 32, 8]
        group = shard.create_group("subjects").create_group("s1")
        group.create_dataset("image", data=np.zeros((2, 32, 32, 8), np.float32))
        group.attrs["split"], group.attrs["label"] = "train", 0
    with pytest.raises(DataError, match=r"shard format 1 but this cmrfed reads 2.*re-run `cmrfed prepare`"):
        load_split(tmp_path, "siemens", "train")
    write_manifest(tmp_path, {})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"format_version": {FORMAT_VERSION}',
                                                     '"format_version": 1'))
    with pytest.raises(DataError, match=r"manifest format 1 but this cmrfed reads 2; re-run `cmrfed"):
        load_manifest(tmp_path)
