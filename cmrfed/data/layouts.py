"""Readers of the three public cine CMR datasets, exactly as each lays itself out on disk.

Scanning a dataset (``scan_dataset``) turns its folder and metadata into :class:`Subject` records:
which files hold ED and ES, the vendor (-> federated client) and pathology (-> label) from the
declared tables. Reading a subject (``read_subject``) loads the voxels of those frames and applies
the dataset's quirks (reference/datasets.md): ACDC frame numbers start at 1; M&Ms-1 indexes a 4-D
file from 0 and its CSV indices are re-derived from the labelled frames where labels exist; M&Ms-2
codes are un-padded integers in a spreadsheet-padded CSV. Every layout detail comes from
``layouts.toml``; the code holds only the logic.

Per-subject problems are collected as :class:`Invalid` records instead of being raised, so the
caller decides between stopping (the default) and ``--skip-invalid``.
"""

from __future__ import annotations

import csv
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmrfed.data.dicom import read_dicom_cine
from cmrfed.data.nifti import NiftiVolume, labels_onto, read_nifti, same_grid
from cmrfed.data.tables import Tables
from cmrfed.errors import DataError

DATASET_NAMES = {"acdc": "ACDC", "mnms": "M&Ms-1", "mnms2": "M&Ms-2"}


@dataclass(frozen=True)
class FrameSource:
    """Where one cardiac phase lives: a 3-D file, or a frame of a 4-D cine (a NIfTI file or a
    DICOM series folder) that ED and ES then share."""

    image: Path
    labels: Path | None
    file_index: int | None  # 0-based frame of a 4-D ``image``; None for a 3-D file or where the
    # two labelled frames of a 4-D label file will give it
    cine_index: int | None  # 0-based frame of the subject's cine, when the dataset says it


@dataclass(frozen=True)
class Subject:
    """One subject as its dataset declares it, before any voxel is read."""

    subject_id: str
    dataset: str
    vendor: str
    client: str
    pathology: str
    label: int
    base: Path  # relative source paths are relative to this (the folder holding the dataset root)
    ed: FrameSource
    es: FrameSource
    cine: Path | None
    lv_label: int
    frames_from: Path  # the metadata file ED/ES came from, named in errors
    rederive_frames: bool  # M&Ms-1, CSV sites: trust the labelled frames over the CSV indices
    series: str | None = None  # the SeriesInstanceUID to read where ``image`` is a DICOM folder
    row: str | None = None  # a CSV site's "SITE.csv row N (subject S)", put before its errors
    attrs: tuple[tuple[str, str | int], ...] = ()  # more to record in the shard (a CSV's row, extras)


@dataclass(frozen=True)
class Invalid:
    """A subject that cannot be used, and why (one line naming the file)."""

    subject_id: str
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    dataset: str
    given: Path
    root: Path
    subjects: tuple[Subject, ...]
    invalid: tuple[Invalid, ...]
    warnings: tuple[str, ...]
    record: dict[str, Any] = field(default_factory=dict)  # more for the manifest (a CSV's sha256)


@dataclass(frozen=True)
class SubjectFrames:
    """The voxels a subject contributes, in its original grid, with what was read to get them."""

    ed: np.ndarray
    es: np.ndarray
    spacing: tuple[float, float, float]
    ed_labels: np.ndarray | None  # None when no LV label exists at ED
    cine: np.ndarray | None  # (x, y, z, t), read only when the label-free centre is needed
    ed_index: int | None  # 0-based frame indices into the cine, None where the dataset omits them
    es_index: int | None
    sources: tuple[tuple[str, str], ...]  # (path relative to Subject.base, sha256)
    warnings: tuple[str, ...]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # of the ED image, as SimpleITK reads it
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- dataset roots


def _looks_like(dataset: str, folder: Path, layout: dict[str, Any]) -> bool:
    if dataset == "acdc":
        return any((folder / split).is_dir() for split in layout["splits"])
    if dataset == "mnms":
        return any((folder / split).is_dir() for split in layout["splits"]) or bool(
            _find_csvs(folder, layout["csv_glob"])
        )
    return (folder / layout["subjects_dir"]).is_dir() or (folder / layout["csv"]).is_file()


def resolve_root(dataset: str, given: Path, layout: dict[str, Any]) -> Path:
    """The dataset root (``database``, ``OpenDataset``, ``MnM2``) given it or the folder above it."""
    flag = f"--{dataset}"
    if not given.is_dir():
        raise DataError(
            f"{given}: {flag} folder does not exist; pass the downloaded {DATASET_NAMES[dataset]} folder"
        )
    inside = given / layout["root"]
    if inside.is_dir() and _looks_like(dataset, inside, layout):
        return inside
    if _looks_like(dataset, given, layout):
        return given
    raise DataError(
        f"{given}: does not hold the {DATASET_NAMES[dataset]} dataset (no {layout['root']}/ with its"
        f" expected contents); check {flag}"
    )


def _find_csvs(folder: Path, pattern: str) -> list[Path]:
    """CSV files matching ``pattern`` case-insensitively (release names differ in case)."""
    return sorted(p for p in folder.glob("*.csv") if fnmatch.fnmatch(p.name.lower(), pattern.lower()))


def _read_csv(path: Path, columns: dict[str, str], required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a metadata CSV as {role: value}, after checking every required column exists."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or ()]
            missing = [columns[role] for role in required if columns[role] not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(repr(m) for m in missing)};"
                    f" found {header}. Use the CSV of the dataset release or fix layouts.toml"
                )
            rows = []
            for row in reader:
                clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                rows.append({role: clean.get(name, "") for role, name in columns.items()})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the metadata CSV ({exc})") from exc


def _as_int(text: str, what: str, where: Path) -> int:
    try:
        value = float(text)
    except ValueError as exc:
        raise DataError(f"{where}: {what} {text!r} is not an integer") from exc
    if not value.is_integer():
        raise DataError(f"{where}: {what} {text!r} is not an integer")
    return int(value)


def _labels_or_none(path: Path) -> Path | None:
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- ACDC


def _read_info(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the subject's Info.cfg ({exc.strerror})") from exc
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _acdc_subject(folder: Path, root: Path, layout: dict[str, Any], tables: Tables) -> Subject:
    code = folder.name
    subject_id = f"acdc_{code}"
    info_path = folder / layout["info_file"]
    if not info_path.is_file():
        raise DataError(f"{info_path}: missing; every ACDC subject folder needs its Info.cfg")
    info = _read_info(info_path)
    keys = layout["info_keys"]
    for role in ("ed", "es", "pathology"):
        if keys[role] not in info:
            raise DataError(f"{info_path}: no `{keys[role]}:` line; use an ACDC release that has it")
    base = int(layout["frame_base"])
    ed, es = (_as_int(info[keys[r]], r.upper(), info_path) for r in ("ed", "es"))
    n_frames = _as_int(info[keys["frames"]], "NbFrame", info_path) if keys["frames"] in info else None
    for name, frame in (("ED", ed), ("ES", es)):
        if frame < base or (n_frames is not None and frame >= base + n_frames):
            top = f"{base + n_frames - 1}" if n_frames is not None else "NbFrame"
            raise DataError(f"{info_path}: {name} frame {frame} is out of range {base}..{top}")

    def phase(frame: int) -> FrameSource:
        fields = {"subject": code, "frame": frame}
        labels = folder / layout["frame_labels"].format(**fields)
        return FrameSource(folder / layout["frame_image"].format(**fields), _labels_or_none(labels),
                           file_index=None, cine_index=frame - base)

    where = str(info_path)
    vendor = layout.get("vendor", "*")
    return Subject(
        subject_id=subject_id,
        dataset="acdc",
        vendor=vendor,
        client=tables.client_for("acdc", vendor, where),
        pathology=info[keys["pathology"]],
        label=tables.label_for("acdc", info[keys["pathology"]], where),
        base=root.parent,
        ed=phase(ed),
        es=phase(es),
        cine=folder / layout["cine"].format(subject=code),
        lv_label=int(layout["labels"]["lv"]),
        frames_from=info_path,
        rederive_frames=False,
    )


def _scan_acdc(root: Path, layout: dict[str, Any], tables: Tables) -> tuple[list, list, list]:
    subjects, invalid = [], []
    for split in layout["splits"]:
        for folder in sorted((root / split).glob(layout["subject_glob"])):
            if not folder.is_dir():
                continue
            try:
                subjects.append(_acdc_subject(folder, root, layout, tables))
            except DataError as exc:
                invalid.append(Invalid(f"acdc_{folder.name}", str(exc)))
    return subjects, invalid, []


# ----------------------------------------------------------------------------- M&Ms-1


def _scan_mnms(root: Path, layout: dict[str, Any], tables: Tables) -> tuple[list, list, list]:
    warnings: list[str] = []
    found = _find_csvs(root, layout["csv_glob"])
    if not found:
        raise DataError(
            f"{root}: no metadata CSV matching {layout['csv_glob']!r}; copy the dataset's"
            " information CSV into this folder"
        )
    csv_path = found[-1]
    if len(found) > 1:
        warnings.append(f"{root}: several metadata CSVs; using the latest-named {csv_path.name}")
    columns = layout["csv_columns"]
    rows = _read_csv(csv_path, columns, ("subject", "vendor", "ed", "es", "pathology"))
    by_code = {row["subject"]: row for row in rows if row["subject"]}

    subjects, invalid, seen = [], [], set()
    for split in layout["splits"]:
        for folder in sorted(p for p in (root / split).glob("*") if p.is_dir()):
            code = folder.name
            subject_id = f"mnms_{code}"
            if subject_id in seen:
                warnings.append(f"{folder}: {code} already found in another split; ignoring this copy")
                continue
            seen.add(subject_id)
            try:
                row = by_code.get(code)
                if row is None:
                    raise DataError(f"{csv_path}: no row for subject {code} ({folder})")
                image = folder / layout["image"].format(subject=code)
                labels = _labels_or_none(folder / layout["labels_file"].format(subject=code))
                base = int(layout["frame_base"])
                ed = _as_int(row["ed"], f"ED of {code}", csv_path) - base
                es = _as_int(row["es"], f"ES of {code}", csv_path) - base
                where = f"{csv_path} (subject {code})"
                subjects.append(Subject(
                    subject_id=subject_id,
                    dataset="mnms",
                    vendor=row["vendor"],
                    client=tables.client_for("mnms", row["vendor"], where),
                    pathology=row["pathology"],
                    label=tables.label_for("mnms", row["pathology"], where),
                    base=root.parent,
                    ed=FrameSource(image, labels, file_index=ed, cine_index=ed),
                    es=FrameSource(image, labels, file_index=es, cine_index=es),
                    cine=image,
                    lv_label=int(layout["labels"]["lv"]),
                    frames_from=csv_path,
                    rederive_frames=True,
                ))
            except DataError as exc:
                invalid.append(Invalid(subject_id, str(exc)))
    return subjects, invalid, warnings


# ----------------------------------------------------------------------------- M&Ms-2


def _scan_mnms2(root: Path, layout: dict[str, Any], tables: Tables) -> tuple[list, list, list]:
    csv_path = root / layout["csv"]
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: metadata CSV not found; copy the dataset's {layout['csv']} here")
    digits = int(layout["subject_digits"])
    rows = _read_csv(csv_path, layout["csv_columns"], ("subject", "vendor", "pathology"))
    by_code = {}
    for row in rows:
        if row["subject"]:  # the spreadsheet pads the file with empty rows
            by_code[str(_as_int(row["subject"], "SUBJECT_CODE", csv_path)).zfill(digits)] = row

    subjects, invalid = [], []
    for folder in sorted(p for p in (root / layout["subjects_dir"]).glob("*") if p.is_dir()):
        code = folder.name
        subject_id = f"mnms2_{code}"
        try:
            row = by_code.get(code)
            if row is None:
                raise DataError(f"{csv_path}: no row for subject {code} ({folder})")
            where = f"{csv_path} (subject {code})"

            def file(key: str, code: str = code, folder: Path = folder) -> Path:
                return folder / layout[key].format(subject=code)

            subjects.append(Subject(
                subject_id=subject_id,
                dataset="mnms2",
                vendor=row["vendor"],
                client=tables.client_for("mnms2", row["vendor"], where),
                pathology=row["pathology"],
                label=tables.label_for("mnms2", row["pathology"], where),
                base=root.parent,
                ed=FrameSource(file("ed_image"), _labels_or_none(file("ed_labels")), None, None),
                es=FrameSource(file("es_image"), _labels_or_none(file("es_labels")), None, None),
                cine=file("cine"),
                lv_label=int(layout["labels"]["lv"]),
                frames_from=csv_path,
                rederive_frames=False,
            ))
        except DataError as exc:
            invalid.append(Invalid(subject_id, str(exc)))
    return subjects, invalid, []


_SCANNERS = {"acdc": _scan_acdc, "mnms": _scan_mnms, "mnms2": _scan_mnms2}


def scan_dataset(dataset: str, given: Path, tables: Tables) -> DatasetScan:
    """Every subject of one dataset folder; dataset-level problems raise, subject-level are listed."""
    layout = tables.layouts[dataset]
    root = resolve_root(dataset, Path(given), layout)
    subjects, invalid, warnings = _SCANNERS[dataset](root, layout, tables)
    if not subjects and not invalid:
        raise DataError(f"{root}: no {DATASET_NAMES[dataset]} subject folders found; check --{dataset}")
    return DatasetScan(
        dataset=dataset,
        given=Path(given),
        root=root,
        subjects=tuple(sorted(subjects, key=lambda s: s.subject_id)),
        invalid=tuple(sorted(invalid, key=lambda i: i.subject_id)),
        warnings=tuple(warnings),
    )


# ----------------------------------------------------------------------------- reading voxels


def _check_index(subject: Subject, name: str, index: int, n_frames: int) -> None:
    if not 0 <= index < n_frames:
        raise DataError(
            f"{subject.frames_from}: {subject.subject_id} {name} index {index} is out of range"
            f" 0..{n_frames - 1} of {subject.ed.image.name}"
        )


def _labelled_frames(labels: NiftiVolume, lv: int) -> list[tuple[int, int]]:
    """(frame, LV voxel count) of every frame holding any label."""
    found = []
    for t in range(labels.n_frames):
        frame = labels.frame(t)
        if frame.any():
            found.append((t, int(np.count_nonzero(frame == lv))))
    return found


def _most_changed_frame(cine: NiftiVolume, ed: int) -> int:
    """The frame that differs most from ED: without labels, the best guess at end-systole."""
    reference = cine.frame(ed)
    change = [float(np.mean((cine.frame(t).astype(np.float64) - reference) ** 2))
              for t in range(cine.n_frames)]
    return int(np.argmax(change))


def _read_labels(path: Path | None, subject: Subject, ndim: int | tuple[int, ...],
                 warnings: list[str]) -> NiftiVolume | None:
    if path is None:
        warnings.append(f"{subject.subject_id}: no ground-truth labels; used the label-free centre")
        return None
    if path.stat().st_size == 0:
        warnings.append(f"{path}: label file is empty; used the label-free centre for {subject.subject_id}")
        return None
    return read_nifti(path, ndim=ndim, labels=True)


def _check_same_grid(subject: Subject, image: NiftiVolume, other: NiftiVolume) -> None:
    if image.array.shape[: other.array.ndim] != other.array.shape:
        raise DataError(
            f"{other.path}: shape {other.array.shape} does not match {image.path.name}"
            f" {image.array.shape} ({subject.subject_id})"
        )


def read_cine(path: Path, series: str | None = None) -> NiftiVolume:
    """A 4-D cine from a NIfTI file or from a folder holding its DICOM series."""
    return read_dicom_cine(path, series) if path.is_dir() else read_nifti(path, ndim=4)


def _labels_on_cine_grid(subject: Subject, cine: NiftiVolume, labels: NiftiVolume,
                         warnings: list[str]) -> NiftiVolume:
    """The labels on the cine's voxels: as stored where both share one grid, else resampled by
    world position (a segmentation exported by another tool than the cine's)."""
    if labels.array.ndim == 4 and labels.n_frames != cine.n_frames:
        raise DataError(f"{labels.path}: {labels.n_frames} frames where {cine.path.name} has"
                        f" {cine.n_frames} ({subject.subject_id}); give a 3-D ED label file or one"
                        " with the cine's frames")
    if same_grid(cine, labels):
        return labels
    warnings.append(f"{labels.path}: on another voxel grid than {cine.path.name}; resampled onto it"
                    f" (nearest neighbour, by world position) for {subject.subject_id}")
    return NiftiVolume(labels.path, labels_onto(labels, cine), cine.spacing, labels.sha256,
                       cine.origin, cine.direction, cine.orientation_from)


def _read_4d_subject(
    subject: Subject, read: list[NiftiVolume], warnings: list[str]
) -> tuple[NiftiVolume, NiftiVolume | None, int, int]:
    """One 4-D cine (M&Ms-1, CSV sites): ED/ES are 0-based indices into it, re-derived from the
    labelled frames of a 4-D label file (the larger LV is ED); a 3-D label file labels ED."""
    cine = read_cine(subject.ed.image, subject.series)
    read.append(cine)
    labels = _read_labels(subject.ed.labels, subject, (3, 4), warnings)
    if labels is not None:
        read.append(labels)
        labels = _labels_on_cine_grid(subject, cine, labels, warnings)
    ed, es = subject.ed.file_index, subject.es.file_index
    if labels is not None and labels.array.ndim == 4 and subject.rederive_frames:
        labelled = _labelled_frames(labels, subject.lv_label)
        if len(labelled) == 2:
            (t0, v0), (t1, v1) = labelled
            derived = (t0, t1) if v0 >= v1 else (t1, t0)
            if ed is not None and es is not None and derived != (ed, es):
                warnings.append(
                    f"{subject.subject_id}: {subject.frames_from.name} gives ED/ES {ed}/{es} but the"
                    f" labelled frames give {derived[0]}/{derived[1]} (larger LV = ED); used the labels"
                )
            ed, es = derived
    if ed is None or es is None:
        found = len(_labelled_frames(labels, subject.lv_label)) if labels is not None else 0
        raise DataError(f"{subject.frames_from}: {subject.subject_id} has no ED/ES frame indices and"
                        f" its label file does not give them ({found} labelled frame(s), two needed);"
                        " give ed and es")
    _check_index(subject, "ED", ed, cine.n_frames)
    _check_index(subject, "ES", es, cine.n_frames)
    if labels is not None and not labels.frame(ed).any():
        what = f"no labels at ED frame {ed}" if labels.array.any() else "label file is empty (all 0)"
        warnings.append(f"{subject.ed.labels}: {what}; used the label-free centre for {subject.subject_id}")
        labels = None
    if labels is None and ed == es:
        es = _most_changed_frame(cine, ed)
        warnings.append(f"{subject.subject_id}: ED = ES = {ed} and no labels; used frame {es}"
                        " (largest change from ED) as ES")
    return cine, labels, ed, es


def read_subject(subject: Subject) -> SubjectFrames:
    """Load a subject's ED and ES volumes, ED labels and, if the crop needs it, the cine.

    A CSV site's errors start with the subject's row (``Subject.row``), so that one line names
    the CSV row and subject whatever file or check failed."""
    try:
        return _read_subject(subject)
    except DataError as exc:
        if subject.row is None:
            raise
        raise DataError(f"{subject.row}: {exc}") from exc


def _read_subject(subject: Subject) -> SubjectFrames:
    warnings: list[str] = []
    read: list[NiftiVolume] = []
    if subject.ed.image == subject.es.image:
        cine, labels, ed_index, es_index = _read_4d_subject(subject, read, warnings)
        ed, es = cine.frame(ed_index), cine.frame(es_index)
        ed_labels = labels.frame(ed_index) if labels is not None else None
        spacing, cine_array = cine.spacing, cine.array
        geometry = cine
    else:
        ed_volume = read_nifti(subject.ed.image, ndim=3)
        es_volume = read_nifti(subject.es.image, ndim=3)
        _check_same_grid(subject, ed_volume, es_volume)
        read += [ed_volume, es_volume]
        labels = _read_labels(subject.ed.labels, subject, 3, warnings)
        if labels is not None:
            _check_same_grid(subject, ed_volume, labels)
            read.append(labels)
        ed, es, spacing = ed_volume.array, es_volume.array, ed_volume.spacing
        geometry = ed_volume
        ed_labels = labels.array if labels is not None else None
        cine_array = None
        ed_index, es_index = subject.ed.cine_index, subject.es.cine_index
    if ed_labels is not None and not np.any(ed_labels == subject.lv_label):
        warnings.append(f"{subject.subject_id}: no LV label at ED; used the label-free centre")
        ed_labels = None
    if ed_labels is None and cine_array is None:
        cine_array = _optional_cine(subject, ed.shape, read, warnings)
    if geometry.orientation_from == "nibabel":
        warnings.append(f"{geometry.path}: SimpleITK cannot read its orientation; took it from"
                        " nibabel's affine (CineMA's resampling depends on it)")
    return SubjectFrames(
        ed=ed,
        es=es,
        spacing=spacing,
        ed_labels=ed_labels,
        cine=cine_array if ed_labels is None else None,
        ed_index=ed_index,
        es_index=es_index,
        sources=tuple((v.path.relative_to(subject.base).as_posix(), v.sha256) for v in read),
        warnings=tuple(warnings),
        origin=geometry.origin,
        direction=geometry.direction,
    )


def _optional_cine(subject: Subject, shape: tuple[int, ...], read: list[NiftiVolume],
                   warnings: list[str]) -> np.ndarray | None:
    """The cine for the label-free centre, or None (the ED/ES pair then stands in for it)."""
    if subject.cine is None or not subject.cine.is_file():
        warnings.append(f"{subject.subject_id}: no cine file; label-free centre from ED and ES only")
        return None
    cine = read_nifti(subject.cine, ndim=4)
    if cine.array.shape[:3] != tuple(shape):
        warnings.append(f"{cine.path}: grid differs from ED; label-free centre from ED and ES only")
        return None
    read.append(cine)
    return cine.array
