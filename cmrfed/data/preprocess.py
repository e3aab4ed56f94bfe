"""CineMA's short-axis preprocessing, reproduced rule by rule (docs/pipeline.md, "Your data").

Identical to CineMA's own code (its ``cinema/data/sitk.py``, the ACDC / M&Ms / M&Ms-2
``preprocess.py`` scripts and the classification dataset's load transforms) wherever an LV label
exists at ED; each rule below scales with ``--spacing`` / ``--shape`` (CineMA: 1 x 1 x 10 mm,
192 x 192 x 16):

1. Resample ED, ES (linear) and the ED labels (nearest) to the target spacing with SimpleITK, in
   the image's own pixel type and direction. Output size per axis ``round(n * s / t)`` (numpy's
   round half to even); output origin shifted by ``0.5 * (t - s)`` along each *world* axis.
2. Crop in-plane (x, y) to the target shape around the ED LV bounding box: start
   ``ceil((min + max_inclusive) / 2 - want / 2)``, kept inside the image; an axis not longer
   than the target is kept whole (padded at load time). No crop in z: every slice is kept.
3. ED and ES each: clip to their 0.95th / 99.5th percentiles, z-normalise, rescale to [0, 1]
   (SimpleITK Clamp, Normalize, RescaleIntensity) and store as uint8 ``floor(255 x)``.
4. At load (:mod:`cmrfed.data.model_input`): stack ED, ES; one min-max rescale over both
   channels together (float32); zero-pad at the END of each axis to the target shape. A stack
   deeper than the target is cut into overlapping windows of the target depth, as CineMA
   evaluates it; their class probabilities are averaged.

cmrfed's own, not CineMA's (CineMA fails without an LV label at ED): the label-free centre of
:func:`motion_centre`, used with the same crop rule; a constant volume normalises to zeros; a
resampled axis has at least one voxel.

Axes are ITK index order (i, j, k) throughout, as :mod:`cmrfed.data.nifti` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmrfed.data.layouts import SubjectFrames
from cmrfed.data.nifti import from_sitk, to_sitk

CLIP_PERCENTILES = (0.95, 99.5)
NORMALISATION = (
    "per volume: clip to percentiles 0.95/99.5, z-normalise, rescale to [0, 1], stored as uint8"
    " floor(255 x); at load: ED+ES min-max rescaled together to [0, 1] float32"
)
MOTION_SMOOTHING_MM = 5.0  # in-plane blur of the temporal-change map before taking its peak
_FINGERPRINT_GRID = (16, 16, 4)

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Preprocessed:
    """A subject's stored image and how its crop was placed."""

    image: np.ndarray  # (2, x, y, z) uint8: ED, ES; x, y <= target, z = every resampled slice
    centre: Triple  # crop centre, in voxels of the resampled grid
    crop_start: tuple[int, int]  # first kept voxel along x and y of the resampled grid
    centre_from: str  # "labels" or "label-free"
    warnings: tuple[str, ...]


def resampled_size(size: tuple[int, ...], spacing: Triple, target: Triple) -> tuple[int, int, int]:
    """Voxels per axis at the target spacing: ``round(n * s / t)``, half to even (at least one)."""
    pairs = zip(size, spacing, target, strict=True)
    return tuple(max(1, int(np.round(n * s / t))) for n, s, t in pairs)


def resample(
    array: np.ndarray,
    spacing: Triple,
    target: Triple,
    *,
    labels: bool,
    origin: Triple = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Resample a 3-D (i, j, k) array to ``target`` spacing, keeping direction and pixel type.

    The output origin is the input origin shifted by ``0.5 * (target - spacing)`` along each
    world axis (CineMA's rule: with an identity direction the first output voxel's edge sits on
    the first input voxel's edge; with an oblique one the shift mixes the index axes). Values
    outside the input are 0.
    """
    image = to_sitk(array, spacing, origin, direction)
    shifted = [o + 0.5 * (t - s) for o, t, s in zip(origin, target, spacing, strict=True)]
    out = sitk.Resample(
        image,
        resampled_size(array.shape, spacing, target),
        sitk.Transform(),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        shifted,
        tuple(float(t) for t in target),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )
    return from_sitk(out)


def lv_bounding_box(labels: np.ndarray, lv_label: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-axis first and last (inclusive) voxel holding the LV label, or None if absent."""
    where = np.nonzero(labels == lv_label)
    if where[0].size == 0:
        return None
    return np.array([axis.min() for axis in where]), np.array([axis.max() for axis in where])


def lv_centre(labels: np.ndarray, lv_label: int) -> Triple | None:
    """Centre of the LV label's bounding box, ``(min + max_inclusive) / 2`` voxels, or None."""
    box = lv_bounding_box(labels, lv_label)
    if box is None:
        return None
    return tuple(float(lo + hi) / 2.0 for lo, hi in zip(*box, strict=True))


def motion_centre(cine: np.ndarray, spacing: Triple, target: Triple) -> Triple:
    """Label-free centre (cmrfed's own): the moving heart, in voxels of the resampled grid.

    The per-voxel temporal standard deviation, summed over slices and smoothed in-plane, is
    thresholded at half its peak; the centre is the weighted centroid of the connected region
    holding the peak (the moving walls form a ring around the cavity, so its centroid, not its
    peak, is the cavity centre). The slice centre is the middle of the stack. Computed on the
    original grid, then mapped to the resampled one (voxel i of spacing s covers the same mm as
    voxel ``(i + 0.5) s / t - 0.5`` of spacing t, given the origin shift of :func:`resample`).
    """
    change = cine.astype(np.float32).std(axis=3).sum(axis=2)
    sigma = (MOTION_SMOOTHING_MM / spacing[0], MOTION_SMOOTHING_MM / spacing[1])
    in_plane = ndimage.gaussian_filter(change, sigma=sigma)
    if in_plane.max() > 0:
        regions, _ = ndimage.label(in_plane >= 0.5 * in_plane.max())
        peak = np.unravel_index(int(np.argmax(in_plane)), in_plane.shape)
        i, j = ndimage.center_of_mass(in_plane, regions, int(regions[peak]))
    else:
        i, j = (in_plane.shape[0] - 1) / 2.0, (in_plane.shape[1] - 1) / 2.0
    k = (cine.shape[2] - 1) / 2.0
    pairs = zip((i, j, k), spacing, target, strict=True)
    return tuple((float(c) + 0.5) * s / t - 0.5 for c, s, t in pairs)


def crop_start(centre: float, length: int, want: int) -> int:
    """CineMA's crop start along one axis: ``ceil(centre - want / 2)`` kept in ``[0, length -
    want]``; 0 when the axis is not longer than ``want`` (nothing is cropped)."""
    if length <= want:
        return 0
    return min(max(math.ceil(centre - want / 2.0), 0), length - want)


def crop_in_plane(array: np.ndarray, starts: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """The x, y window ``[start, start + want)`` (whole axis when shorter); z is never cropped."""
    (x0, y0), (wx, wy) = starts, shape[:2]
    return array[x0 : x0 + wx, y0 : y0 + wy]


def normalise_uint8(volume: np.ndarray) -> np.ndarray:
    """CineMA's per-volume intensity step in its own SimpleITK filters, bit for bit.

    Percentiles 0.95 / 99.5 of the voxels (numpy, in the volume's pixel type), ``Clamp`` to them
    (bounds cast to the pixel type by SimpleITK), ``Normalize`` (z-score), ``RescaleIntensity``
    to [0, 1], times 255 and cast to uint8 (truncation, i.e. ``floor(255 x)``). A volume that is
    constant after clipping becomes zeros (cmrfed's guard; CineMA would divide by zero).
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    low, high = np.percentile(volume, CLIP_PERCENTILES)
    image = sitk.Clamp(image, lowerBound=float(low), upperBound=float(high))
    clamped = sitk.GetArrayViewFromImage(image)
    if clamped.min() == clamped.max():
        return np.zeros(volume.shape, dtype=np.uint8)
    image = sitk.RescaleIntensity(sitk.Normalize(image), outputMinimum=0.0, outputMaximum=1.0)
    return from_sitk(sitk.Cast(image * 255, sitk.sitkUInt8))


@contextmanager
def one_itk_thread() -> Iterator[None]:
    """Run SimpleITK on one thread: its resampling (scanline increments per thread region) and
    statistics sums round differently with the thread count, so that the bytes never depend on
    the machine. CineMA ran ITK's default thread count; the results agree but for rare last-bit
    ties that move a voxel by 1/255."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def preprocess(
    frames: SubjectFrames, lv_label: int, spacing: Triple, shape: tuple[int, int, int]
) -> Preprocessed:
    """One subject's ED/ES frames -> the stored (2, x, y, z) uint8 image (ITK on one thread)."""
    with one_itk_thread():
        return _preprocess(frames, lv_label, spacing, shape)


def _preprocess(
    frames: SubjectFrames, lv_label: int, spacing: Triple, shape: tuple[int, int, int]
) -> Preprocessed:
    geometry = {"origin": frames.origin, "direction": frames.direction}
    ed = resample(frames.ed, frames.spacing, spacing, labels=False, **geometry)
    es = resample(frames.es, frames.spacing, spacing, labels=False, **geometry)
    warnings: list[str] = []
    centre = None
    if frames.ed_labels is not None:
        labels = resample(frames.ed_labels, frames.spacing, spacing, labels=True, **geometry)
        centre = lv_centre(labels, lv_label)
        if centre is None:
            warnings.append("LV label vanished at the target spacing; used the label-free centre")
    centre_from = "labels" if centre is not None else "label-free"
    if centre is None:
        motion = frames.cine if frames.cine is not None else np.stack([frames.ed, frames.es], axis=-1)
        centre = motion_centre(motion, frames.spacing, spacing)
    starts = (crop_start(centre[0], ed.shape[0], shape[0]), crop_start(centre[1], ed.shape[1], shape[1]))
    channels = [normalise_uint8(crop_in_plane(volume, starts, shape)) for volume in (ed, es)]
    return Preprocessed(np.stack(channels), centre, starts, centre_from, tuple(warnings))


def fingerprint(image: np.ndarray) -> np.ndarray:
    """A unit vector summarising the ED channel (block means, centred): equal for the same scan.

    Two datasets holding the same scan give (near) identical vectors even if stored with other
    intensity scaling or file encoding, because the preprocessing is intensity-affine invariant.
    Every vector has the grid's length, so images of any size compare: an axis shorter than its
    number of blocks repeats its voxels (nearest neighbour) instead of being averaged.
    """
    volume = image[0].astype(np.float64)
    for axis, blocks in enumerate(_FINGERPRINT_GRID):
        n = volume.shape[axis]
        if n < blocks:
            volume = np.take(volume, (np.arange(blocks) * n) // blocks, axis=axis)
            continue
        starts = np.linspace(0, n, blocks + 1).astype(int)[:-1]
        counts = np.diff(np.append(starts, n))
        shape = [1] * volume.ndim
        shape[axis] = len(counts)
        volume = np.add.reduceat(volume, starts, axis=axis) / counts.reshape(shape)
    vector = volume.ravel() - volume.mean()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector
