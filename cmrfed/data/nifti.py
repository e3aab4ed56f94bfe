"""The one NIfTI reader of cmrfed, and the one place arrays become SimpleITK images and back.

Files are read with nibabel from bytes we read ourselves, so that one read gives the provenance
hash, the gzip check and the voxels. Voxel spacing comes from the header zooms (``pixdim``),
never from an sform-preferred affine: ACDC files carry an unscaled sform of diag(-1, -1, 1) while
the qform / zooms hold the real spacing (reference/datasets.md). Image voxels keep the stored
pixel type (as SimpleITK reads them: a scaled file becomes float32), because CineMA resamples in
the file's pixel type.

The orientation (origin, direction) is what SimpleITK reads from the header, because CineMA's
resampling shifts the output origin along the world axes and so depends on the direction. Where
SimpleITK refuses a header (some M&Ms files: "No orthonormal definition found") it is taken from
nibabel's affine instead (qform, else sform; RAS turned into ITK's LPS, axes made orthonormal)
and a warning says so.

Axis convention: a nibabel array is indexed (i, j, k[, t]), which is ITK index order; SimpleITK's
numpy view is (k, j, i), so the two converters below transpose.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from cmrfed.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI2_HEADER_SIZE = 540
_SUPPORTED = "NIfTI-1 or NIfTI-2 (.nii or .nii.gz)"
_WHAT = {3: "3-D short-axis volume (x, y, z)", 4: "4-D cine (x, y, z, t)"}


@dataclass(frozen=True)
class NiftiVolume:
    """One volume in stored (i, j, k[, t]) order, its spacing in mm and its hash: a NIfTI file, or a
    DICOM series (:mod:`cmrfed.data.dicom`; ``path`` its folder, ``sha256`` one over its files)."""

    path: Path
    array: np.ndarray
    spacing: tuple[float, float, float]
    sha256: str
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ITK (LPS) world mm of voxel (0, 0, 0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # ITK, row-major
    orientation_from: str = "SimpleITK"  # "nibabel" where SimpleITK refused the header; "DICOM"

    @property
    def n_frames(self) -> int:
        return self.array.shape[3] if self.array.ndim == 4 else 1

    def frame(self, index: int) -> np.ndarray:
        """The 3-D volume at time ``index`` of a 4-D file (the array itself for a 3-D file)."""
        return self.array[..., index] if self.array.ndim == 4 else self.array


def _decode(path: Path, raw: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    if path.name.endswith(".gz"):
        if raw[:2] != _GZIP_MAGIC:
            raise DataError(f"{path}: not gzip-compressed although named .gz; re-download the file")
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(
                f"{path}: truncated or corrupt gzip stream ({exc}); re-download the file"
            ) from exc
    header_size = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    image_class = nib.Nifti2Image if header_size == _NIFTI2_HEADER_SIZE else nib.Nifti1Image
    try:
        return image_class.from_bytes(raw)
    except (ValueError, OSError, EOFError, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as exc:
        raise DataError(f"{path}: not a readable {_SUPPORTED} file ({exc})") from exc


def read_nifti(path: Path, *, ndim: int | tuple[int, ...], labels: bool = False) -> NiftiVolume:
    """Read and validate one NIfTI file expected to hold ``ndim`` (3 or 4, or either) dimensions.

    Trailing singleton axes beyond the largest ``ndim`` are dropped (some writers store
    (x, y, z, 1)); fewer axes, or a single slice, is a 2-D image where a short-axis stack is
    expected.
    Label files are rounded to integers; image files must hold only finite values.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found; check the dataset folder is complete") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from exc
    image = _decode(path, raw)
    try:
        array = np.asanyarray(image.dataobj)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"{path}: voxel data is truncated or unreadable ({exc}); re-download the file"
        ) from exc
    accepted = (ndim,) if isinstance(ndim, int) else ndim
    while array.ndim > max(accepted) and array.shape[-1] == 1:
        array = array[..., 0]
    what = " or ".join(_WHAT[n] for n in accepted)
    if array.ndim < 3 or array.shape[2] < 2:
        raise DataError(f"{path}: image is 2-D (shape {array.shape}) where a {what} is expected")
    if array.ndim not in accepted:
        raise DataError(f"{path}: image has shape {array.shape} where a {what} is expected")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: header voxel spacing {zooms} is not three positive numbers")
    if labels:
        array = np.rint(np.nan_to_num(array)).astype(np.int16)
    else:
        array = _itk_pixel_type(array, image.header.get_data_dtype())
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"{path}: image holds NaN or infinite voxels; re-export or remove it")
    origin, direction, orientation_from = _orientation(path, image)
    return NiftiVolume(path=path, array=array, spacing=zooms, sha256=hashlib.sha256(raw).hexdigest(),
                       origin=origin, direction=direction, orientation_from=orientation_from)


def _itk_pixel_type(array: np.ndarray, stored: np.dtype) -> np.ndarray:
    """The voxels in the pixel type SimpleITK would give them: the stored type (native byte
    order), or float32 where the header's scl_slope / scl_inter rescale them (nibabel then
    returns float64)."""
    native = np.dtype(stored).newbyteorder("=")
    if array.dtype.newbyteorder("=") != native:
        return np.asarray(array, dtype=np.float64 if native == np.float64 else np.float32)
    return np.asarray(array, dtype=native)


def _orientation(
    path: Path, image: nib.Nifti1Image | nib.Nifti2Image
) -> tuple[tuple[float, float, float], tuple[float, ...], str]:
    """Spatial origin and 3 x 3 direction as SimpleITK reads them (nibabel's affine if it cannot)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's header remarks are not the user's
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        affine = image.get_qform() if int(image.header["qform_code"]) > 0 else image.affine
        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :4]
        u, _, vt = np.linalg.svd(lps[:, :3])  # the nearest rotation (ITK needs orthonormal axes)
        return (tuple(float(v) for v in lps[:, 3]), tuple(float(v) for v in (u @ vt).ravel()),
                "nibabel")
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    n = reader.GetDimension()
    direction = np.array(reader.GetDirection()).reshape(n, n)[:3, :3]
    return (tuple(float(v) for v in reader.GetOrigin()[:3]), tuple(float(v) for v in direction.ravel()),
            "SimpleITK")


def to_sitk(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> sitk.Image:
    """A SimpleITK image of a 3-D (i, j, k) array with the given geometry (default: origin 0,
    identity direction); the pixel type is the array's."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in direction))
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    """The (i, j, k) numpy array of a 3-D SimpleITK image (its numpy view transposed)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def same_grid(a: NiftiVolume, b: NiftiVolume, tolerance_mm: float = 0.01) -> bool:
    """Whether two volumes put their voxels at the same places: same (x, y, z) shape, and voxel
    centres no further apart than ``tolerance_mm`` anywhere in the volume (origin, spacing and
    direction compared through the positions they give)."""
    if a.array.shape[:3] != b.array.shape[:3]:
        return False
    steps_a = np.array(a.direction).reshape(3, 3) * np.array(a.spacing)  # column c: one voxel along c
    steps_b = np.array(b.direction).reshape(3, 3) * np.array(b.spacing)
    span = np.array(a.array.shape[:3], dtype=np.float64) - 1
    drift = np.abs(np.subtract(a.origin, b.origin)) + np.abs(steps_a - steps_b) @ span
    return bool(drift.max() <= tolerance_mm)


def labels_onto(labels: NiftiVolume, image: NiftiVolume) -> np.ndarray:
    """A label volume (3-D or 4-D) sampled at ``image``'s voxel centres, nearest neighbour, by
    world position: a segmentation exported on another grid than its image (e.g. rows flipped
    by a DICOM-to-NIfTI converter) lands on the image's voxels; outside it is 0."""
    def one(frame: np.ndarray) -> np.ndarray:
        moving = to_sitk(frame, labels.spacing, labels.origin, labels.direction)
        reference = to_sitk(np.zeros(image.array.shape[:3], dtype=frame.dtype), image.spacing,
                            image.origin, image.direction)
        out = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                            moving.GetPixelID())
        return from_sitk(out)

    if labels.array.ndim == 3:
        return one(labels.array)
    return np.stack([one(labels.frame(t)) for t in range(labels.n_frames)], axis=-1)
