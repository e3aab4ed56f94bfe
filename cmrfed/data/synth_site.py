"""A synthetic hospital site as a PACS export gives it: a CSV plus one DICOM cine series per subject.

Why it exists: ``cmrfed prepare --csv`` reads a site's own exams, and no real exam may be shipped;
``cmrfed synth --site NAME`` writes such a site so that the format is exercised end to end.

The hearts come from :mod:`cmrfed.data.synth` through its public writer: a synthetic cohort is
written to a scratch folder with the site's seed, and its M&Ms-1 subjects (four vendors, 4-D
cines with the ED and ES frames labelled) are exported the way a scanner writes them:

- one classic single-frame MR file per slice and phase (``write_dicom_cine``), with the tags
  scanners fill (orientation, position, spacing, trigger time, instance number, rescale), an
  oblique short-axis orientation drawn per subject, file names that say nothing and a file order
  that is shuffled;
- ``SliceThickness`` smaller than the slice spacing (a gap), as cine stacks often have, so that a
  reader taking the thickness for the spacing is caught;
- the labels as a 4-D NIfTI on the DICOM grid (``seg``), which gives CineMA's crop and ED/ES;
- the CSV: ``subject, site, pathology, image, seg, vendor`` plus an extra ``age`` column.

The subjects without labels (M&Ms-1's unlabelled vendor-C scans) are left out: their ED/ES are
not known. Everything is drawn from the seed: the same seed gives the same files.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from rich.table import Table

from cmrfed import paths
from cmrfed.atomic import atomic_dir, write_json
from cmrfed.data.nifti import read_nifti
from cmrfed.data.synth import write_synthetic_cohort
from cmrfed.data.tables import CLIENT_NAME, CLIENT_NAME_RULE
from cmrfed.errors import UsageError
from cmrfed.lock import folder_lock
from cmrfed.outputs import COHORT
from cmrfed.provenance import versions

CSV_NAME = "site.csv"
_MANUFACTURER = {"siemens": "SIEMENS", "philips": "Philips Medical Systems", "ge": "GE MEDICAL SYSTEMS",
                 "canon": "Canon Medical Systems"}
_GAP = 0.8  # SliceThickness / slice spacing
_DECIMALS = 10  # significant digits of the decimal strings (DS) written


@dataclass(frozen=True)
class DicomGeometry:
    """Where a cine's voxels are, as the DICOM files state it: LPS mm, ITK index axes.

    ``direction`` holds the row cosine, the column cosine and the slice normal as columns (the
    ITK direction matrix, row-major); ``spacing`` is (along a row, down a column, between slices).
    """

    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    spacing: tuple[float, float, float]

    def affine_ras(self) -> np.ndarray:
        """The NIfTI (RAS) affine that puts voxel (i, j, k) where the DICOM files do."""
        lps = np.eye(4)
        lps[:3, :3] = np.array(self.direction).reshape(3, 3) * np.array(self.spacing)
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _ds(value: float) -> str:
    """A decimal string (DICOM DS, at most 16 characters) for ``value``."""
    return f"{float(value):.{_DECIMALS}g}"


def decimal(value: float) -> float:
    """``value`` as a reader gets it back from the decimal string written for it."""
    return float(_ds(value))


def oblique_geometry(rng: np.random.Generator, spacing: Sequence[float], shape: Sequence[int],
                     tilt_degrees: tuple[float, float] = (20.0, 40.0)) -> DicomGeometry:
    """A short-axis-like oblique orientation: the slice normal tilted from the patient's feet-head
    axis by a drawn angle, about a drawn axis; centred near the isocentre. The numbers are the ones
    the DICOM strings carry (:func:`decimal`), so a NIfTI twin can state exactly the same grid."""
    tilt = np.deg2rad(rng.uniform(*tilt_degrees))
    azimuth, spin = rng.uniform(0, 2 * np.pi, size=2)
    axis = np.array([np.cos(azimuth), np.sin(azimuth), 0.0])
    rotation = _rotation(axis, tilt) @ _rotation(np.array([0.0, 0.0, 1.0]), spin)
    row, column = (decimal_vector(v) for v in (rotation[:, 0], rotation[:, 1]))
    normal = np.cross(row, column)
    extent = np.array(spacing) * (np.array(shape) - 1)
    centre = rng.uniform(-20, 20, size=3)
    origin = centre - np.column_stack([row, column, normal]) @ (extent / 2)
    return DicomGeometry(tuple(decimal(v) for v in origin),
                         tuple(float(v) for v in np.column_stack([row, column, normal]).ravel()),
                         tuple(float(s) for s in spacing))


def decimal_vector(vector: np.ndarray) -> np.ndarray:
    return np.array([decimal(v) for v in vector])


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation about a unit ``axis`` by ``angle`` radians."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def write_dicom_cine(folder: Path, pixels: np.ndarray, geometry: DicomGeometry, *, dt_ms: float,
                     rng: np.random.Generator, uid_seed: str, rescale: tuple[float, float] = (1.0, 0.0),
                     manufacturer: str = "SIEMENS", patient_id: str = "anonymous",
                     description: str = "cine SAX") -> str:
    """Write an (x, y, z, t) cine as classic single-frame MR files, one per slice and phase.

    ``pixels`` are the stored integers (int16 or uint16); the values the files mean are
    ``pixels * slope + intercept`` for ``rescale = (slope, intercept)``. Slice k lies at
    ``origin + k * spacing_z * normal``; phase t has TriggerTime ``t * dt_ms`` and InstanceNumber
    ``1 + k * T + t``. File names are random hex, written in a random order; UIDs derive from
    ``uid_seed`` so the same inputs give the same bytes. Returns the SeriesInstanceUID.
    """
    if pixels.ndim != 4 or pixels.dtype not in (np.int16, np.uint16):
        raise TypeError(f"pixels must be a 4-D int16 or uint16 array, got {pixels.dtype} {pixels.shape}")
    folder.mkdir(parents=True, exist_ok=True)
    nz, nt = pixels.shape[2:]
    series = Dataset()
    series.StudyInstanceUID, series.SeriesInstanceUID, series.FrameOfReferenceUID = (
        generate_uid(entropy_srcs=[uid_seed, part]) for part in ("study", "series", "frame"))
    series.Modality, series.Manufacturer, series.PatientID = "MR", manufacturer, patient_id
    series.SeriesDescription, series.SeriesNumber = description, 1
    series.CardiacNumberOfImages = nt
    series.RescaleSlope, series.RescaleIntercept = _ds(rescale[0]), _ds(rescale[1])
    order = rng.permutation(nz * nt)
    names = [f"{int(v):016x}" for v in rng.integers(0, 2**63, size=nz * nt)]
    for position, cell in enumerate(order):
        k, t = divmod(int(cell), nt)
        uid = generate_uid(entropy_srcs=[uid_seed, str(cell)])
        ds = _image(series, pixels[:, :, k, t], geometry, k, uid)
        ds.InstanceNumber = 1 + k * nt + t
        ds.TriggerTime = _ds(t * dt_ms)
        ds.save_as(folder / names[position], enforce_file_format=True)
    return str(series.SeriesInstanceUID)


def _image(series: Dataset, plane: np.ndarray, geometry: DicomGeometry, k: int, uid: str) -> Dataset:
    """One slice's file: the series' tags, its place on the grid and its pixels."""
    axes = np.array(geometry.direction).reshape(3, 3)
    row, column, normal = axes[:, 0], axes[:, 1], axes[:, 2]
    ds = Dataset()
    ds.update(series)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    position = np.array(geometry.origin) + k * geometry.spacing[2] * normal
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *column)]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(position @ normal))
    ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]  # rows apart, columns apart
    ds.SliceThickness = _ds(_GAP * geometry.spacing[2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = plane.shape[1], plane.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if plane.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(plane.T, dtype=plane.dtype.newbyteorder("<")).tobytes()
    return ds


def write_nifti(path: Path, array: np.ndarray, geometry: DicomGeometry) -> None:
    """A NIfTI file on the DICOM grid (qform and sform both state it)."""
    image = nib.Nifti1Image(array, geometry.affine_ras())
    image.set_qform(geometry.affine_ras(), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


@dataclass(frozen=True)
class SiteSubject:
    """One subject of a written site, as its CSV row lists it."""

    subject: str
    pathology: str
    label: int
    vendor: str
    ed: int
    es: int
    series: str


_RESCALE = {"philips": (1.5, -20.0)}  # Philips writes real-valued rescale; the others do not
_MNMS_LV = 1  # the LV label of the cohort's M&Ms-1 files, the CSV's default lv_label
_SECOND_SERIES = "localizer"


def _export_subject(out: Path, site: str, subject_id: str, cohort_subject: Path, client: str,
                    rng: np.random.Generator, seed: int) -> tuple[int, int, str]:
    """Write one cohort subject as DICOM + seg; returns (ED, ES, SeriesInstanceUID)."""
    cine = read_nifti(cohort_subject / f"{subject_id}_sa.nii.gz", ndim=4)
    labels = read_nifti(cohort_subject / f"{subject_id}_sa_gt.nii.gz", ndim=4, labels=True).array
    labelled = [t for t in range(labels.shape[3]) if labels[..., t].any()]
    lv = [int((labels[..., t] == _MNMS_LV).sum()) for t in labelled]
    ed, es = (labelled[0], labelled[1]) if lv[0] >= lv[1] else (labelled[1], labelled[0])
    geometry = oblique_geometry(rng, cine.spacing, cine.array.shape[:3])
    slope, intercept = _RESCALE.get(client, (1.0, 0.0))
    folder = out / subject_id
    uid_seed = f"{seed}/{site}/{subject_id}"
    series = write_dicom_cine(folder, cine.array.astype(np.int16), geometry,
                              dt_ms=round(900.0 / cine.n_frames, 3), rng=rng, uid_seed=uid_seed,
                              rescale=(slope, intercept), manufacturer=_MANUFACTURER[client],
                              patient_id=subject_id)
    survey = cine.array[..., ::2, :1].astype(np.int16)  # a few slices, one phase: a survey scan
    write_dicom_cine(folder, survey, oblique_geometry(rng, cine.spacing, survey.shape[:3]), dt_ms=0.0,
                     rng=rng, uid_seed=f"{uid_seed}/{_SECOND_SERIES}", manufacturer=_MANUFACTURER[client],
                     patient_id=subject_id, description=_SECOND_SERIES)
    write_nifti(out / f"{subject_id}_seg.nii.gz", labels.astype(np.uint8), geometry)
    return ed, es, series


def write_synthetic_site(out: str | Path, site: str, seed: int = 0, subjects: int = 24,
                         shape: tuple[int, int, int] = (96, 96, 8), frames: int | None = None,
                         overwrite: bool = False) -> list[SiteSubject]:
    """Write a synthetic site ``site`` under ``out``: ``site.csv`` and, per subject, a folder of
    DICOM files (the cine and a survey series) and a 4-D label NIfTI. ``subjects``, ``shape``,
    ``frames`` and ``seed`` are those of the cohort it is drawn from (module docstring)."""
    if not CLIENT_NAME.fullmatch(site):
        raise UsageError(f"--site {site!r}: not {CLIENT_NAME_RULE}")
    out = Path(out)
    with folder_lock(out), atomic_dir(out, overwrite=overwrite, kind=COHORT) as tmp:
        scratch = tmp / ".cohort"
        summary = write_synthetic_cohort(scratch, seed=seed, subjects=subjects, shape=shape, frames=frames)
        rng = np.random.default_rng([seed, 21])
        written = []
        chosen = [s for s in summary.subjects if s.dataset == "mnms" and s.labelled]
        for entry in chosen:
            ed, es, series = _export_subject(tmp, site, entry.subject_id, scratch / entry.path,
                                             entry.client, rng, seed)
            written.append(SiteSubject(entry.subject_id, entry.pathology, entry.label,
                                       _MANUFACTURER[entry.client], ed, es, series))
        shutil.rmtree(scratch)
        _write_csv(tmp / CSV_NAME, site, written, rng)
        write_json(paths.synth_summary_path(tmp), {
            "site": site, "csv": CSV_NAME, "subjects": [asdict(s) for s in written],
            "options": {"seed": seed, "subjects": subjects, "shape": list(shape), "frames": frames},
            "versions": versions()})
    return written


def _write_csv(path: Path, site: str, subjects: Sequence[SiteSubject], rng: np.random.Generator) -> None:
    """The site's list: every other row leaves ED/ES to the seg; an extra column (age) as sites have."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("subject", "site", "pathology", "image", "seg", "ed", "es", "series", "vendor",
                         "age"))
        for n, s in enumerate(subjects):
            frames = (s.ed, s.es) if n % 2 else ("", "")
            writer.writerow((s.subject, site, s.pathology, s.subject, f"{s.subject}_seg.nii.gz", *frames,
                             s.series, s.vendor, int(rng.integers(18, 85))))


def site_table(out: Path, site: str, subjects: Sequence[SiteSubject]) -> Table:
    """Subjects per vendor and label of a written site, for the CLI to print."""
    table = Table(title=f"synthetic site {site} in {out}: prepare it with --csv {out / CSV_NAME}")
    for column in ("vendor", "normal", "abnormal"):
        table.add_column(column, justify="left" if column == "vendor" else "right")
    for vendor in dict.fromkeys(s.vendor for s in subjects):
        labels = [s.label for s in subjects if s.vendor == vendor]
        table.add_row(vendor, str(labels.count(0)), str(labels.count(1)))
    return table
