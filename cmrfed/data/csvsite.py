"""A site's own exams listed in a CSV (``cmrfed prepare --csv SITE.csv``) -> Subject records.

A hospital joining a consortium has cines exported from its PACS (DICOM, or NIfTI converted from
it) and a list of diagnoses, in no public layout. One CSV row per subject says where the cine is
and what it shows; the rows become the same :class:`~cmrfed.data.layouts.Subject` records the
public datasets give, so reading, CineMA's preprocessing, shards and the manifest are shared.

Columns (header names fixed; any other column is kept in the shard and named in the manifest):

- ``subject`` (required): unique within its site; the subject id is ``<site>_<subject>``;
- ``site`` (required): the client the subject belongs to, a lowercase identifier;
- ``label`` (0 normal / 1 abnormal) or ``pathology`` (a code of the ``[csv]`` table of
  ``labels.toml``, extendable with ``--tables``): one of them; with both, they must agree;
- ``image`` (required): relative to the CSV, a 4-D NIfTI cine (x, y, z, t) or a folder holding
  one DICOM cine series (:mod:`cmrfed.data.dicom`);
- ``ed``, ``es``: 0-based frame indices, needed unless ``seg`` gives them;
- ``seg``: a label file, 3-D for the ED frame or 4-D with two labelled frames (the larger LV is
  ED, as in M&Ms-1); it places CineMA's crop and, when 4-D, gives ED and ES;
- ``lv_label`` (default 1): the LV value in ``seg``; ``series``: the SeriesInstanceUID to read
  when the folder holds several; ``vendor``: recorded.

Row problems are :class:`~cmrfed.data.layouts.Invalid` records naming ``SITE.csv row N (subject
S)`` (the header is row 1, as a spreadsheet numbers it); a file that is not a usable CSV raises.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

from cmrfed.data.layouts import DatasetScan, FrameSource, Invalid, Subject
from cmrfed.data.tables import CLIENT_NAME, CLIENT_NAME_RULE, SITE_LABELS, Tables
from cmrfed.errors import DataError

DATASET = SITE_LABELS
REQUIRED = ("subject", "site", "image")
LABEL_COLUMNS = ("label", "pathology")
COLUMNS = ("subject", "site", "label", "pathology", "image", "ed", "es", "seg", "lv_label", "series",
           "vendor")
DEFAULT_LV_LABEL = 1
SUBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
LABELS = {"0": 0, "1": 1}


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]], bytes]:
    """Header, (row number, {column: value}) per non-empty row, and the file's bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: CSV file not found; check --csv") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8-sig")
        reader = csv.DictReader(text.splitlines())
        header = [(name or "").strip() for name in reader.fieldnames or ()]
        rows = []
        for row in reader:
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if any(clean.values()):  # a spreadsheet's trailing empty rows
                rows.append((reader.line_num, clean))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({exc})") from exc
    missing = [c for c in REQUIRED if c not in header]
    if not any(c in header for c in LABEL_COLUMNS):
        missing.append("label or pathology")
    if missing:
        named = ", ".join(repr(m) for m in missing)
        raise DataError(f"{path} row 1 (the header): missing column(s) {named}; found {header}. A site"
                        " CSV needs subject, site, label or pathology, and image")
    return header, rows, raw


def _index(text: str, column: str) -> int | None:
    if text == "":
        return None
    if not text.isdigit():
        raise DataError(f"{column} {text!r} is not a 0-based frame index (0, 1, 2 ...)")
    return int(text)


def _label(row: dict[str, str], tables: Tables, path: Path) -> tuple[int, str]:
    """(binary label, pathology code) of a row from ``label`` and/or ``pathology``."""
    given, code = row.get("label", ""), row.get("pathology", "")
    if given == "" and code == "":
        raise DataError("no label and no pathology; give label 0/1 or a pathology code")
    if given != "" and given not in LABELS:
        raise DataError(f"label {given!r} is not 0 (normal) or 1 (abnormal)")
    if code == "":
        return LABELS[given], ""
    mapped = tables.label_for(DATASET, code, f"{path}")
    if given != "" and LABELS[given] != mapped:
        raise DataError(f"label {given} disagrees with pathology {code!r} (label {mapped} in the"
                        f" {DATASET} table of labels.toml); fix one of them")
    return mapped, code


def _existing(base: Path, text: str, column: str) -> Path:
    if Path(text).is_absolute():
        raise DataError(f"{column} {text!r}: give the path relative to the CSV's folder ({base})")
    path = base / text
    if not path.exists():
        raise DataError(f"{column} {text!r}: {path} not found (paths are relative to the CSV)")
    return path


def _subject(row: dict[str, str], path: Path, tables: Tables, number: int, where: str) -> Subject:
    site, name = row.get("site", ""), row.get("subject", "")
    if not CLIENT_NAME.fullmatch(site):
        raise DataError(f"site {site!r} is not {CLIENT_NAME_RULE}")
    if not SUBJECT_NAME.fullmatch(name):
        raise DataError(f"subject {name!r} is not a name of letters, digits, '.', '_' or '-'")
    label, pathology = _label(row, tables, path)
    base = path.parent
    if not row.get("image"):
        raise DataError("no image; give the cine's NIfTI file or DICOM folder")
    image = _existing(base, row["image"], "image")
    seg = _existing(base, row["seg"], "seg") if row.get("seg") else None
    if seg is not None and not seg.is_file():
        raise DataError(f"seg {row['seg']!r}: {seg} is a folder; give a NIfTI label file")
    ed, es = _index(row.get("ed", ""), "ed"), _index(row.get("es", ""), "es")
    if (ed is None) != (es is None):
        raise DataError("give both ed and es, or neither (a 4-D seg then gives them)")
    if ed is None and seg is None:
        raise DataError("no ed/es and no seg to find them in; give ed and es (0-based frames)")
    lv_text = row.get("lv_label", "")
    if lv_text and (not lv_text.isdigit() or int(lv_text) == 0):
        raise DataError(f"lv_label {lv_text!r} is not a label value (a positive integer; 0 is background)")
    return Subject(
        subject_id=f"{site}_{name}",
        dataset=DATASET,
        vendor=row.get("vendor", ""),
        client=site,
        pathology=pathology,
        label=label,
        base=base,
        ed=FrameSource(image, seg, file_index=ed, cine_index=ed),
        es=FrameSource(image, seg, file_index=es, cine_index=es),
        cine=image,
        lv_label=int(lv_text) if lv_text else DEFAULT_LV_LABEL,
        frames_from=path,
        rederive_frames=True,
        series=row.get("series") or None,
        row=where,
        attrs=(("csv_row", number),
               ("csv_extra", json.dumps({k: v for k, v in row.items() if k not in COLUMNS}))),
    )


def scan_csv(path: Path, tables: Tables) -> DatasetScan:
    """Every row of one site CSV as a Subject, or as an Invalid naming its row and subject.

    A subject repeated within a site is invalid at its second row (the first is kept)."""
    path = Path(path)
    header, rows, raw = _read_rows(path)
    subjects: list[Subject] = []
    invalid: list[Invalid] = []
    seen: dict[tuple[str, str], int] = {}
    for number, row in rows:
        where = f"{path} row {number} (subject {row.get('subject', '')!r})"
        key = (row.get("site", ""), row.get("subject", ""))
        try:
            if key in seen:
                raise DataError(f"duplicate subject: {key[1]!r} of site {key[0]!r} is already on row"
                                f" {seen[key]}; a subject is unique within its site")
            seen[key] = number
            subjects.append(_subject(row, path, tables, number, where))
        except DataError as exc:
            invalid.append(Invalid(f"{key[0]}_{key[1]}", f"{where}: {exc}"))
    extra = [c for c in header if c and c not in COLUMNS]
    return DatasetScan(
        dataset=DATASET, given=path, root=path.parent,
        subjects=tuple(subjects), invalid=tuple(invalid), warnings=(),
        record={"sha256": hashlib.sha256(raw).hexdigest(), "rows": len(rows), "extra_columns": extra},
    )
