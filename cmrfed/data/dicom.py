"""The DICOM cine reader: one short-axis series of classic single-frame files -> one 4-D volume.

A PACS export holds one file per slice and phase, under any names and in any order, often beside
other series of the same exam. This module finds the series, puts every file in its place on the
(x, y, z, t) grid and returns the same :class:`~cmrfed.data.nifti.NiftiVolume` the NIfTI reader
does, so that everything after reading (CineMA's preprocessing, shards) cannot tell the two apart.
The rules are the ones DICOM states and ITK's own series reader follows:

- image axes: i along a row (``ImageOrientationPatient`` row cosine, spacing ``PixelSpacing[1]``),
  j down a column (column cosine, ``PixelSpacing[0]``), k along the slice normal (row x column);
  the numpy array of ``pixel_array`` is (row, column) = (j, i), so it is transposed;
- slices: grouped by their position along the normal (``ImagePositionPatient`` . normal) and
  ordered along it; the origin is the first slice's ``ImagePositionPatient``; the through-plane
  spacing is the distance between slice positions, never ``SliceThickness`` (a gap or an overlap
  between slices makes the two differ);
- phases: ordered by ``TriggerTime``, or by ``InstanceNumber`` where any file lacks it;
- intensities: ``RescaleSlope`` / ``RescaleIntercept`` applied per file (float32 then), the stored
  integers kept otherwise (as ITK reads them);
- world coordinates are DICOM's patient LPS, which is ITK's: no axis flip (NIfTI's RAS is flipped
  in :mod:`cmrfed.data.nifti`).

What cannot make one regular grid is refused with a :class:`DataError` naming the folder: several
series and none chosen, missing slices or phases, spacing, size or orientation changing within
the series, slices not stacked along the normal, enhanced multi-frame files (not read yet).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cmrfed.data.nifti import NiftiVolume
from cmrfed.errors import DataError

ORIENTATION_TOLERANCE = 1e-4  # direction cosines equal within this (scanners write ~6 decimals)
SPACING_TOLERANCE = 1e-3  # relative: pixel spacings and slice gaps equal within 0.1 %
POSITION_TOLERANCE_MM = 0.01  # two files whose positions along the normal differ less: one slice
_ENHANCED = {"1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
             "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image Storage",
             "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage"}
_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of the export, not an image


@dataclass(frozen=True)
class _File:
    """One DICOM image file of the folder, before its series is chosen."""

    path: Path
    dataset: Dataset
    sha256: str

    @property
    def series(self) -> str:
        return str(self.dataset.get("SeriesInstanceUID", ""))


@dataclass(frozen=True)
class _Image(_File):
    """A file of the chosen series with its place on the grid (pixels decoded later)."""

    orientation: np.ndarray  # (6,) row cosine then column cosine
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    size: tuple[int, int]  # (rows, columns)
    trigger_time: float | None
    instance: int | None


def _float_list(dataset: Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {keyword} is missing or not {count} numbers ({value!r})") from exc
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise DataError(f"{path}: {keyword} is missing or not {count} numbers ({value!r})")
    return numbers


def _optional_number(dataset: Dataset, keyword: str) -> float | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _read_file(path: Path) -> _File | None:
    """The file as an image, or None when it is no DICOM image (a DICOMDIR, a text file, a
    report): exports put such files beside the images."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from exc
    try:
        dataset = pydicom.dcmread(io.BytesIO(raw))
    except (InvalidDicomError, EOFError):
        return None
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({exc}); re-export the series") from exc
    if str(dataset.get("SOPClassUID", "")) == _DIRECTORY_SOP_CLASS or "PixelData" not in dataset:
        return None
    return _File(path, dataset, hashlib.sha256(raw).hexdigest())


def _image(file: _File) -> _Image:
    """A file of the chosen series with its place on the grid; enhanced files are refused."""
    path, dataset = file.path, file.dataset
    sop_class = str(dataset.get("SOPClassUID", ""))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if sop_class in _ENHANCED or frames > 1:
        kind = _ENHANCED.get(sop_class, f"{frames} frames in one file")
        raise DataError(f"{path}: enhanced multi-frame MR ({kind}) is not supported yet; export the"
                        " cine as classic single-frame MR images (one file per slice and phase)")
    spacing = _float_list(dataset, "PixelSpacing", 2, path)
    if (spacing <= 0).any():
        raise DataError(f"{path}: PixelSpacing {list(spacing)} is not two positive numbers")
    instance = _optional_number(dataset, "InstanceNumber")
    return _Image(
        path=path, dataset=dataset, sha256=file.sha256,
        orientation=_float_list(dataset, "ImageOrientationPatient", 6, path),
        position=_float_list(dataset, "ImagePositionPatient", 3, path),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        size=(int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))),
        trigger_time=_optional_number(dataset, "TriggerTime"),
        instance=None if instance is None else int(instance),
    )


def _series_of(folder: Path, series: str | None) -> list[_Image]:
    """The images of the one series to read: the only one in ``folder``, or ``series``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_series: dict[str, list[_File]] = {}
    for path in files:
        file = _read_file(path)
        if file is not None:
            by_series.setdefault(file.series, []).append(file)
    if not by_series:
        raise DataError(f"{folder}: holds no DICOM image files; point `image` at the cine's folder")
    if series is not None:
        if series not in by_series:
            raise DataError(f"{folder}: no series {series} here (found {', '.join(sorted(by_series))});"
                            " check the `series` column")
        return [_image(file) for file in by_series[series]]
    if len(by_series) > 1:
        found = "; ".join(f"{uid} ({_description(chosen)}, {len(chosen)} files)"
                          for uid, chosen in sorted(by_series.items()))
        raise DataError(f"{folder}: holds {len(by_series)} series ({found}); put the cine's"
                        " SeriesInstanceUID in the CSV's `series` column")
    return [_image(file) for file in next(iter(by_series.values()))]


def _description(files: Sequence[_File]) -> str:
    return str(files[0].dataset.get("SeriesDescription", "")) or "no description"


def _check_uniform(folder: Path, images: Sequence[_Image]) -> None:
    """One orientation, one pixel spacing and one matrix size for the whole series."""
    first = images[0]
    for image in images[1:]:
        if np.abs(image.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise DataError(f"{folder}: ImageOrientationPatient changes within the series"
                            f" ({first.path.name}: {list(first.orientation)}, {image.path.name}:"
                            f" {list(image.orientation)}); a cine stack has one orientation")
        if not np.allclose(image.pixel_spacing, first.pixel_spacing, rtol=SPACING_TOLERANCE, atol=0):
            raise DataError(f"{folder}: PixelSpacing changes within the series ({first.path.name}:"
                            f" {list(first.pixel_spacing)}, {image.path.name}: {list(image.pixel_spacing)})")
        if image.size != first.size:
            raise DataError(f"{folder}: image size changes within the series ({first.path.name}:"
                            f" {first.size}, {image.path.name}: {image.size})")
    row, column = first.orientation[:3], first.orientation[3:]
    norms = (np.linalg.norm(row), np.linalg.norm(column))
    if max(abs(n - 1) for n in norms) > ORIENTATION_TOLERANCE or abs(row @ column) > ORIENTATION_TOLERANCE:
        raise DataError(f"{folder}: ImageOrientationPatient {list(first.orientation)} is not two"
                        " orthogonal unit vectors")


def _slices(folder: Path, images: Sequence[_Image], normal: np.ndarray) -> list[list[_Image]]:
    """Images grouped by position along the normal, slices in increasing position."""
    ordered = sorted(images, key=lambda im: float(im.position @ normal))
    groups: list[list[_Image]] = [[ordered[0]]]
    for image in ordered[1:]:
        if float((image.position - groups[-1][0].position) @ normal) > POSITION_TOLERANCE_MM:
            groups.append([image])
        else:
            groups[-1].append(image)
    for group in groups:
        drift = max(float(np.linalg.norm(im.position - group[0].position)) for im in group)
        if drift > POSITION_TOLERANCE_MM * 10:
            raise DataError(f"{folder}: files of one slice lie {drift:.3g} mm apart in-plane"
                            f" ({group[0].path.name}); the series is not one stack")
    return groups


def _through_plane_spacing(folder: Path, slices: Sequence[Sequence[_Image]], normal: np.ndarray) -> float:
    """The distance between slice positions, after checking the slices are evenly stacked."""
    if len(slices) < 2:
        raise DataError(f"{folder}: the series has one slice (2-D) where a short-axis stack is expected")
    origins = np.stack([group[0].position for group in slices])
    along = (origins - origins[0]) @ normal
    sheared = np.linalg.norm(origins - origins[0] - np.outer(along, normal), axis=1).max()
    if sheared > max(POSITION_TOLERANCE_MM * 10, SPACING_TOLERANCE * float(along[-1])):
        raise DataError(f"{folder}: slice positions move {sheared:.3g} mm sideways, not along the"
                        " slice normal; the series is not one stack")
    gaps = np.diff(along)
    spacing = float(along[-1]) / (len(slices) - 1)
    if np.abs(gaps - spacing).max() > SPACING_TOLERANCE * spacing + POSITION_TOLERANCE_MM:
        listed = ", ".join(f"{g:.4g}" for g in gaps)
        raise DataError(f"{folder}: slices are not evenly spaced (gaps {listed} mm): a slice is missing"
                        " or the spacing changes within the series")
    return spacing


def _phase_key(folder: Path, images: Sequence[_Image]) -> str:
    """``TriggerTime`` when every file has it, else ``InstanceNumber`` (which then every file needs)."""
    if all(im.trigger_time is not None for im in images):
        return "trigger_time"
    if all(im.instance is not None for im in images):
        return "instance"
    lacking = next(im for im in images if im.instance is None)
    raise DataError(f"{folder}: {lacking.path.name} has neither TriggerTime nor InstanceNumber; the"
                    " phases cannot be ordered")


def _phases(folder: Path, slices: Sequence[Sequence[_Image]], key: str) -> list[list[_Image]]:
    """Each slice's images in phase order, every slice holding the same number of phases."""
    counts = [len(group) for group in slices]
    if len(set(counts)) > 1:
        most = max(counts)
        short = [k for k, n in enumerate(counts) if n < most]
        raise DataError(f"{folder}: slices hold different numbers of phases ({min(counts)} to {most});"
                        f" slice(s) {', '.join(map(str, short))} (0-based along the normal) miss phases")
    ordered = []
    for k, group in enumerate(slices):
        phases = sorted(group, key=lambda im: (getattr(im, key), im.instance or 0, im.path.name))
        values = [getattr(im, key) for im in phases]
        if len(set(values)) != len(values):
            raise DataError(f"{folder}: slice {k} (0-based along the normal) holds two files with"
                            f" the same {'TriggerTime' if key == 'trigger_time' else 'InstanceNumber'};"
                            " remove the repeated files")
        ordered.append(phases)
    return ordered


def _pixels(image: _Image) -> np.ndarray:
    """One file's (i, j) pixels, rescaled when the file says so (float32 then)."""
    try:
        stored = image.dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported or broken pixel data
        syntax = image.dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise DataError(f"{image.path}: cannot decode the pixel data (transfer syntax {syntax}: {exc});"
                        " export uncompressed or install a pydicom pixel-data plugin") from exc
    if stored.ndim != 2:
        raise DataError(f"{image.path}: pixel data of shape {stored.shape} is not one grey-level image")
    slope = _optional_number(image.dataset, "RescaleSlope")
    intercept = _optional_number(image.dataset, "RescaleIntercept")
    pixels = stored.T
    if (slope is not None and slope != 1.0) or (intercept is not None and intercept != 0.0):
        pixels = (pixels.astype(np.float64) * (1.0 if slope is None else slope)
                  + (0.0 if intercept is None else intercept)).astype(np.float32)
    return pixels


def series_sha256(images: Sequence[tuple[str, str]]) -> str:
    """One digest of a series: sha256 over its files' (name, sha256) lines in name order."""
    lines = "".join(f"{name}  {digest}\n" for name, digest in sorted(images))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def read_dicom_cine(folder: Path, series: str | None = None) -> NiftiVolume:
    """Read one DICOM cine series from ``folder`` as an (x, y, z, t) volume with its geometry.

    ``series`` picks a SeriesInstanceUID when the folder holds several. The volume's ``path`` is
    the folder and its ``sha256`` the :func:`series_sha256` of the series' files.
    """
    images = _series_of(folder, series)
    _check_uniform(folder, images)
    row, column = images[0].orientation[:3], images[0].orientation[3:]
    normal = np.cross(row, column)
    slices = _slices(folder, images, normal)
    dz = _through_plane_spacing(folder, slices, normal)
    grid = _phases(folder, slices, _phase_key(folder, images))
    planes = [[_pixels(image) for image in phases] for phases in grid]
    dtype = np.result_type(*(plane.dtype for phases in planes for plane in phases))
    array = np.stack([np.stack(phases, axis=-1) for phases in planes], axis=2).astype(dtype, copy=False)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{folder}: rescaled intensities hold NaN or infinite values")
    row_spacing, column_spacing = images[0].pixel_spacing
    direction = np.column_stack([row, column, normal])
    return NiftiVolume(
        path=folder,
        array=array,
        spacing=(column_spacing, row_spacing, dz),
        sha256=series_sha256([(im.path.relative_to(folder).as_posix(), im.sha256) for im in images]),
        origin=tuple(float(v) for v in slices[0][0].position),
        direction=tuple(float(v) for v in direction.ravel()),
        orientation_from="DICOM",
    )
