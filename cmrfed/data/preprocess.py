"""CineMA's short-axis preprocessing (reference/cinema-backbone.md, "Preprocessing CineMA used").

1. Resample ED and ES to the target spacing (SimpleITK: images linear, labels nearest).
2. Crop to the target shape centred on the bounding box of the LV label at ED; without a usable
   label, centred on the region of largest temporal intensity change across the cine.
3. Per volume: clip to the 0.95th / 99.5th percentiles, z-normalise, rescale to [0, 1].
4. Pad at the end with zeros to the target shape; stack ED then ES -> (2, X, Y, Z) float32.

Axes are ITK index order (i, j, k) throughout, as :mod:`cmrfed.data.nifti` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from cmrfed.data.layouts import SubjectFrames
from cmrfed.data.nifti import from_sitk, to_sitk

CLIP_PERCENTILES = (0.95, 99.5)
NORMALISATION = "clip to percentiles 0.95/99.5, z-normalise, rescale to [0, 1] (per volume)"
MOTION_SMOOTHING_MM = 5.0  # in-plane blur of the temporal-change map before taking its peak
_FINGERPRINT_GRID = (16, 16, 4)

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Preprocessed:
    """A subject's model input and how its crop was centred."""

    image: np.ndarray  # (2, X, Y, Z) float32 in [0, 1]: ED, ES
    centre: Triple  # crop centre, in voxels of the resampled grid
    centre_from: str  # "labels" or "label-free"
    warnings: tuple[str, ...]


def resampled_size(size: tuple[int, ...], spacing: Triple, target: Triple) -> tuple[int, int, int]:
    """Voxels per axis covering the same extent at the target spacing (at least one)."""
    pairs = zip(size, spacing, target, strict=True)
    return tuple(max(1, int(np.floor(n * s / t + 0.5))) for n, s, t in pairs)


def resample(array: np.ndarray, spacing: Triple, target: Triple, *, labels: bool) -> np.ndarray:
    """Resample a 3-D (i, j, k) array to ``target`` spacing, keeping origin and direction.

    The first voxel stays where it was (origin kept, as CineMA does), so voxel i of the output
    sits at i * target mm, and the size covers the input extent (``resampled_size``).
    """
    image = to_sitk(array, spacing)
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    out = sitk.Resample(
        image,
        resampled_size(array.shape, spacing, target),
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        tuple(float(t) for t in target),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )
    return from_sitk(out)


def lv_centre(labels: np.ndarray, lv_label: int) -> Triple | None:
    """Centre of the LV label's bounding box (voxels), or None if the label is absent."""
    where = np.nonzero(labels == lv_label)
    if where[0].size == 0:
        return None
    return tuple(float(axis.min() + axis.max()) / 2.0 for axis in where)


def motion_centre(cine: np.ndarray, spacing: Triple, target: Triple) -> Triple:
    """Label-free centre: peak of the (smoothed) temporal intensity change, in target voxels.

    The heart is what moves in a cine. The per-voxel temporal standard deviation, summed over
    slices and smoothed in-plane, is thresholded at half its peak; the centre is the weighted
    centroid of the connected region holding the peak (the moving walls form a ring around the
    cavity, so its centroid, not its peak, is the cavity centre). The slice centre is the middle
    of the stack (a short-axis stack covers the ventricles base to apex). Computed on the
    original grid, then mapped to the target one.
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
    return tuple(float(c) * s / t for c, s, t in zip((i, j, k), spacing, target, strict=True))


def crop(array: np.ndarray, centre: Triple, shape: tuple[int, int, int]) -> np.ndarray:
    """Crop each axis longer than ``shape`` to a window centred on ``centre`` (kept inside)."""
    slices = []
    for n, c, want in zip(array.shape, centre, shape, strict=True):
        if n <= want:
            slices.append(slice(0, n))
            continue
        start = int(np.clip(np.floor(c - (want - 1) / 2.0 + 0.5), 0, n - want))
        slices.append(slice(start, start + want))
    return array[tuple(slices)]


def pad_to(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Zero-pad at the end of each axis up to ``shape`` (as CineMA pads at load time)."""
    return np.pad(array, [(0, want - n) for n, want in zip(array.shape, shape, strict=True)])


def normalise(volume: np.ndarray) -> np.ndarray:
    """CineMA intensity normalisation: percentile clip, z-score, then min-max to [0, 1]."""
    values = volume.astype(np.float64)
    low, high = np.percentile(values, CLIP_PERCENTILES)
    values = np.clip(values, low, high)
    std = values.std()
    values = (values - values.mean()) / std if std > 0 else np.zeros_like(values)
    span = values.max() - values.min()
    values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def preprocess(
    frames: SubjectFrames, lv_label: int, spacing: Triple, shape: tuple[int, int, int]
) -> Preprocessed:
    """One subject's ED/ES frames -> the (2, X, Y, Z) model input."""
    ed = resample(frames.ed, frames.spacing, spacing, labels=False)
    es = resample(frames.es, frames.spacing, spacing, labels=False)
    warnings: list[str] = []
    centre = None
    if frames.ed_labels is not None:
        centre = lv_centre(resample(frames.ed_labels, frames.spacing, spacing, labels=True), lv_label)
        if centre is None:
            warnings.append("LV label vanished at the target spacing; used the label-free centre")
    centre_from = "labels" if centre is not None else "label-free"
    if centre is None:
        motion = frames.cine if frames.cine is not None else np.stack([frames.ed, frames.es], axis=-1)
        centre = motion_centre(motion, frames.spacing, spacing)
    channels = [pad_to(normalise(crop(volume, centre, shape)), shape) for volume in (ed, es)]
    return Preprocessed(np.stack(channels).astype(np.float32), centre, centre_from, tuple(warnings))


def fingerprint(image: np.ndarray) -> np.ndarray:
    """A unit vector summarising the ED channel (block means, centred): equal for the same scan.

    Two datasets holding the same scan give (near) identical vectors even if stored with other
    intensity scaling or file encoding, because the preprocessing is intensity-affine invariant.
    """
    volume = image[0].astype(np.float64)
    for axis, blocks in enumerate(_FINGERPRINT_GRID):
        n = volume.shape[axis]
        starts = np.linspace(0, n, min(blocks, n) + 1).astype(int)[:-1]
        counts = np.diff(np.append(starts, n))
        shape = [1] * volume.ndim
        shape[axis] = len(counts)
        volume = np.add.reduceat(volume, starts, axis=axis) / counts.reshape(shape)
    vector = volume.ravel() - volume.mean()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector
