"""Writing a rendered subject in its dataset's download layout: NIfTI files, Info.cfg and the CSVs.

The header quirks of the downloads (ACDC's unscaled sform, the M&Ms-1 dated CSV with its unnamed
index column, the spreadsheet-padded M&Ms-2 CSV) are planted here, from the reference notes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from cmrfed.data.synth_phantom import _CANONICAL, _Rendered
from cmrfed.data.synth_plan import (
    _MNMS_VENDOR_NAME,
    MNMS2_CSV_HEADER,
    MNMS2_CSV_NAME,
    MNMS2_EMPTY_ROWS,
    MNMS2_ROOT,
    MNMS_CSV_HEADER,
    MNMS_CSV_NAME,
    MNMS_ROOT,
    _Planned,
)

# Label numbers each dataset uses (LV cavity, LV myocardium, RV cavity).
LABEL_NUMBERS = {
    "acdc": {"lv": 3, "myo": 2, "rv": 1},
    "mnms": {"lv": 1, "myo": 2, "rv": 3},
    "mnms2": {"lv": 1, "myo": 2, "rv": 3},
}


# --- writing ----------------------------------------------------------------------------------


def _relabel(labels: np.ndarray, dataset: str) -> np.ndarray:
    """Canonical label numbers -> the dataset's own (ACDC numbers RV 1 ... LV 3)."""
    lookup = np.zeros(4, dtype=np.uint8)
    for name, number in _CANONICAL.items():
        lookup[number] = LABEL_NUMBERS[dataset][name]
    return lookup[labels]


def _save_nifti(path: Path, data: np.ndarray, spacing: Sequence[float],
                origin: Sequence[float], dt_ms: float | None = None,
                unscaled_sform: bool = False) -> None:
    """A gzipped NIfTI as scanners' converters write it (LPS flipped to RAS, mm and ms).

    ``unscaled_sform`` plants the ACDC quirk: an sform of diag(-1, -1, 1) without scaling while
    the qform and the header zooms carry the real spacing.
    """
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_qform(affine, code=1)
    header.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]) if unscaled_sform else affine, code=1)
    zooms = tuple(spacing) + ((dt_ms,) if data.ndim == 4 and dt_ms is not None else ())
    header.set_zooms(zooms + (1.0,) * (data.ndim - len(zooms)))
    header.set_xyzt_units("mm", "msec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, None, header=header), path)


def _write_acdc(root: Path, planned: _Planned, rendered: _Rendered) -> None:
    subject = planned.subject
    folder = root / subject.path
    geo = rendered.geometry
    quirk = "unscaled_sform" in subject.quirks
    pid = subject.subject_id
    _save_nifti(folder / f"{pid}_4d.nii.gz", rendered.cine, geo.spacing, geo.origin, geo.dt_ms,
                quirk)
    for index, labels in ((rendered.ed, rendered.labels_ed), (rendered.es, rendered.labels_es)):
        stem = f"{pid}_frame{index + 1:02d}"
        _save_nifti(folder / f"{stem}.nii.gz", rendered.cine[..., index], geo.spacing, geo.origin,
                    unscaled_sform=quirk)
        _save_nifti(folder / f"{stem}_gt.nii.gz", _relabel(labels, "acdc"), geo.spacing,
                    geo.origin, unscaled_sform=quirk)
    info = (f"ED: {rendered.ed + 1}\nES: {rendered.es + 1}\nGroup: {subject.pathology}\n"
            f"Height: {planned.meta['height']}\nNbFrame: {geo.frames}\n"
            f"Weight: {planned.meta['weight']}\n")
    (folder / "Info.cfg").write_text(info, encoding="utf-8")


def _write_mnms(root: Path, planned: _Planned, rendered: _Rendered) -> None:
    subject = planned.subject
    folder = root / subject.path
    geo = rendered.geometry
    code = subject.subject_id
    _save_nifti(folder / f"{code}_sa.nii.gz", rendered.cine, geo.spacing, geo.origin, geo.dt_ms)
    labels = np.zeros(rendered.cine.shape, dtype=np.uint8)
    if subject.labelled:
        labels[..., rendered.ed] = _relabel(rendered.labels_ed, "mnms")
        labels[..., rendered.es] = _relabel(rendered.labels_es, "mnms")
    _save_nifti(folder / f"{code}_sa_gt.nii.gz", labels, geo.spacing, geo.origin, geo.dt_ms)


def _write_mnms2(root: Path, planned: _Planned, rendered: _Rendered) -> None:
    folder = root / planned.subject.path
    geo = rendered.geometry
    code = planned.subject.subject_id
    _save_nifti(folder / f"{code}_SA_CINE.nii.gz", rendered.cine, geo.spacing, geo.origin,
                geo.dt_ms)
    for phase, index, labels in (("ED", rendered.ed, rendered.labels_ed),
                                 ("ES", rendered.es, rendered.labels_es)):
        _save_nifti(folder / f"{code}_SA_{phase}.nii.gz", rendered.cine[..., index], geo.spacing,
                    geo.origin)
        _save_nifti(folder / f"{code}_SA_{phase}_gt.nii.gz", _relabel(labels, "mnms2"),
                    geo.spacing, geo.origin)
    la = rendered.long_axis
    assert la is not None
    _save_nifti(folder / f"{code}_LA_CINE.nii.gz", la.cine, la.spacing, geo.origin, geo.dt_ms)
    for phase, index, labels in (("ED", rendered.ed, la.labels_ed),
                                 ("ES", rendered.es, la.labels_es)):
        _save_nifti(folder / f"{code}_LA_{phase}.nii.gz", la.cine[..., index], la.spacing,
                    geo.origin)
        _save_nifti(folder / f"{code}_LA_{phase}_gt.nii.gz", _relabel(labels, "mnms2"),
                    la.spacing, geo.origin)


def _write_mnms_csv(root: Path, rows: list[tuple[_Planned, int, int]]) -> None:
    """The dated information CSV: unnamed index column, 0-based ED/ES, some Height blank."""
    path = root / MNMS_ROOT / MNMS_CSV_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda row: row[0].subject.subject_id)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MNMS_CSV_HEADER)
        for index, (planned, ed_index, es_index) in enumerate(ordered):
            subject, meta = planned.subject, planned.meta
            ed, es = (ed_index, es_index) if subject.labelled else (0, 0)
            writer.writerow((index, subject.subject_id, _MNMS_VENDOR_NAME[subject.vendor],
                             subject.vendor, meta["centre"], ed, es, meta["age"],
                             subject.pathology, meta["sex"],
                             "" if meta["height"] is None else meta["height"],
                             "" if meta["weight"] is None else meta["weight"]))


def _write_mnms2_csv(root: Path, planned: list[_Planned]) -> None:
    """Un-padded integer codes, then the empty rows a spreadsheet export leaves behind."""
    path = root / MNMS2_ROOT / MNMS2_CSV_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MNMS2_CSV_HEADER)
        for entry in sorted(planned, key=lambda p: int(p.subject.subject_id)):
            writer.writerow((int(entry.subject.subject_id), entry.subject.pathology,
                             entry.subject.vendor, entry.meta["scanner"], entry.meta["field"]))
        handle.write(",,,,\n" * MNMS2_EMPTY_ROWS)


