"""A synthetic multi-vendor cine CMR cohort, written in the exact on-disk layouts of the downloads.

Why it exists: ACDC, M&Ms-1 and M&Ms-2 may not be shipped (they hold per-subject health data), yet
every stage must run end to end without them. ``write_synthetic_cohort`` writes three trees that
copy the downloaded layouts and their header quirks (see the dataset reference notes), filled with
cine short-axis phantoms whose anatomy and motion carry the disease label, and whose appearance
carries the scanner vendor, so the four vendor clients are non-IID the way real sites are.

The layouts and label numbers here are written from the reference notes, deliberately not read
from ``data_manifests/``: the readers use those tables, and a test on synthetic trees only proves
something if the two sides were written independently.

Phantom model (all lengths in mm, so hearts keep their size whatever the scanner geometry):
the LV is a truncated ellipsoidal shell (cavity and myocardium) whose base descends towards the
fixed apex in systole; its endocardial radius follows the subject's ejection fraction and the
myocardial volume is conserved, so the wall thickens. The RV is an ellipse wrapped around the
septum (a crescent), shorter than the LV. Above the base the atria appear. A smooth raised-cosine
cycle goes from end-diastole (frame of largest volume) to end-systole and back.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from rich.table import Table
from scipy import ndimage

from cmrfed import paths
from cmrfed.atomic import write_json
from cmrfed.errors import DataError, UsageError
from cmrfed.lock import folder_lock
from cmrfed.outputs import COHORT, new_output
from cmrfed.provenance import versions

MIN_SUBJECTS = 5
MAX_SUBJECTS = 150  # ACDC ids 101-150 hold the testing split; M&Ms-2 code ranges hold 360
MIN_IN_PLANE = 32
MIN_SLICES = 4
MIN_FRAMES, MAX_FRAMES = 6, 60
NORMAL = "NOR"
DATASETS = ("acdc", "mnms", "mnms2")

# Layout facts of the downloads (reference notes), written out here on purpose (module docstring).
ACDC_ROOT = Path("acdc") / "database"
MNMS_ROOT = Path("mnms") / "OpenDataset"
MNMS2_ROOT = Path("mnms2") / "MnM2"
MNMS_CSV_NAME = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_CSV_HEADER = ("", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age",
                   "Pathology", "Sex", "Height", "Weight")
MNMS2_CSV_NAME = "dataset_information.csv"
MNMS2_CSV_HEADER = ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD")
MNMS2_EMPTY_ROWS = 3000  # the real file is spreadsheet-padded to about a million `,,,,` rows
MNMS2_CODE_RANGES = (("train", 1, 160), ("val", 161, 200), ("test", 201, 360))
MNMS2_NOT_IN_TRAIN = frozenset({"RV", "TRI"})  # these diseases only occur from code 161 on
# Label numbers each dataset uses (LV cavity, LV myocardium, RV cavity).
LABEL_NUMBERS = {
    "acdc": {"lv": 3, "myo": 2, "rv": 1},
    "mnms": {"lv": 1, "myo": 2, "rv": 3},
    "mnms2": {"lv": 1, "myo": 2, "rv": 3},
}
_CANONICAL = {"lv": 1, "myo": 2, "rv": 3}  # how the renderer numbers labels internally

# Every vendor group of a dataset gets at least this share of normal subjects: the real shares
# (about a quarter) would leave the small clients without normals to split 60/20/20 by label.
NORMAL_SHARE_FLOOR = 0.45


# --- who is in the cohort -------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """One vendor of one dataset: its spelling there, its client, its real share and label mix.

    ``floor`` keeps the smaller clients (Canon exists only in M&Ms-1; Philips and GE are split
    between the two M&Ms releases) at about five normal and five abnormal subjects at the default
    size; the rest of a dataset is shared out by the real proportions ``weight``.
    """

    vendor: str
    client: str
    weight: float
    floor: int
    mix: tuple[tuple[str, int], ...]


_SITES: dict[str, tuple[_Site, ...]] = {
    # ACDC has no vendor column: every scan is a Siemens (Aera 1.5 T, Trio Tim 3 T); 30 per group.
    "acdc": (
        _Site("Siemens", "siemens", 1.0, 0,
              (("NOR", 30), ("MINF", 30), ("DCM", 30), ("HCM", 30), ("RV", 30))),
    ),
    # M&Ms-1 open release: subjects and pathologies per vendor letter (reference notes).
    "mnms": (
        _Site("A", "siemens", 95, 0, (("ARV", 12), ("DCM", 37), ("HCM", 25), ("NOR", 21))),
        _Site("B", "philips", 125, 5, (("DCM", 51), ("HCM", 37), ("HHD", 4), ("NOR", 33))),
        _Site("C", "ge", 75, 6, (("AHS", 3), ("ARV", 2), ("HCM", 8), ("HHD", 19), ("IHD", 4),
                                 ("NOR", 21), ("Other", 18))),
        _Site("D", "canon", 50, 10, (("ARV", 1), ("DCM", 9), ("HCM", 15), ("HHD", 1), ("IHD", 1),
                                     ("LVNC", 2), ("NOR", 14), ("Other", 7))),
    ),
    # M&Ms-2: the reference gives the disease mix of all 360, not per vendor; vendor shares are
    # approximate (Siemens most common).
    "mnms2": tuple(
        _Site(vendor, client, weight, floor,
              (("NOR", 75), ("LV", 60), ("HCM", 60), ("ARR", 35), ("FALL", 35), ("CIA", 35),
               ("RV", 30), ("TRI", 30)))
        for vendor, client, weight, floor in (
            ("SIEMENS", "siemens", 0.5, 0),
            ("Philips Medical Systems", "philips", 0.25, 6),
            ("GE MEDICAL SYSTEMS", "ge", 0.25, 6),
        )
    ),
}
_MNMS_VENDOR_NAME = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
_MNMS_CENTRES = {"A": (1,), "B": (2, 3), "C": (4,), "D": (5,)}
# Share of each vendor's subjects per release folder (the labelled training set is A and B only;
# C's training subjects are the unlabelled ones; D appears in validation and testing only).
_MNMS_FOLDERS = {
    "A": (("Training/Labeled", 0.6), ("Validation", 0.1), ("Testing", 0.3)),
    "B": (("Training/Labeled", 0.6), ("Validation", 0.1), ("Testing", 0.3)),
    "C": (("Validation", 0.3), ("Testing", 0.7)),
    "D": (("Validation", 0.3), ("Testing", 0.7)),
}
MNMS_UNLABELLED = "Training/Unlabeled"
_MNMS2_SCANNERS = {
    "SIEMENS": (("Symphony", 1.5), ("SymphonyTim", 1.5), ("TrioTim", 3.0), ("Avanto Fit", 1.5)),
    "Philips Medical Systems": (("Achieva", 1.5), ("Achieva", 3.0)),
    "GE MEDICAL SYSTEMS": (("Signa Explorer", 1.5), ("Signa HDxt", 1.5)),
}
# The same heart may be released twice: M&Ms-1 pathology -> the M&Ms-2 code for it.
_SHARED_DIAGNOSIS = {"NOR": "NOR", "HCM": "HCM", "DCM": "LV"}


@dataclass(frozen=True)
class SynthSubject:
    """One written subject, as a reader should find it.

    ``subject_id`` is the folder name (``patient007``, ``A0S9V9``, ``007``); ``vendor`` is the
    dataset's own spelling (ACDC has none on disk and is recorded as ``Siemens``); ``split`` is
    the release folder (ACDC ``training``/``testing``, M&Ms-1 ``Training/Labeled`` ...) or, for
    M&Ms-2, the code range (``train``/``val``/``test``); ``path`` is the subject folder relative
    to OUT; ``labelled`` is False for the unlabelled M&Ms-1 subjects (ED = ES = 0, empty labels);
    ``quirks`` names header oddities planted in this subject's files.
    """

    dataset: str
    subject_id: str
    vendor: str
    client: str
    pathology: str
    label: int
    split: str
    path: str
    labelled: bool = True
    quirks: tuple[str, ...] = ()


@dataclass(frozen=True)
class DuplicatePair:
    """An M&Ms-2 subject whose short-axis images are an exact copy of an M&Ms-1 subject's."""

    mnms: str
    mnms2: str
    client: str


@dataclass(frozen=True)
class SynthSummary:
    """What ``write_synthetic_cohort`` wrote: options, every subject, the planted duplicate."""

    out: Path
    seed: int
    subjects_per_dataset: int
    shape: tuple[int, int, int]
    subjects: tuple[SynthSubject, ...]
    duplicate: DuplicatePair | None

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Subjects per (dataset, vendor spelling, pathology)."""
        return dict(sorted(Counter((s.dataset, s.vendor, s.pathology) for s in self.subjects).items()))

    def client_label_counts(self, labelled_only: bool = True) -> dict[tuple[str, int], int]:
        """Subjects per (client, binary label); by default only those with ED/ES labels."""
        chosen = (s for s in self.subjects if s.labelled or not labelled_only)
        return dict(sorted(Counter((s.client, s.label) for s in chosen).items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "subjects_per_dataset": self.subjects_per_dataset,
            "shape": list(self.shape),
            "duplicate": asdict(self.duplicate) if self.duplicate else None,
            "subjects": [asdict(s) | {"quirks": list(s.quirks)} for s in self.subjects],
        }


def read_synth_summary(out: str | Path) -> SynthSummary:
    """Load the summary a previous ``cmrfed synth`` wrote into OUT."""
    path = paths.synth_summary_path(Path(out))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        subjects = tuple(SynthSubject(**(s | {"quirks": tuple(s["quirks"])})) for s in raw["subjects"])
        duplicate = DuplicatePair(**raw["duplicate"]) if raw["duplicate"] else None
        return SynthSummary(Path(out), int(raw["seed"]), int(raw["subjects_per_dataset"]),
                            tuple(raw["shape"]), subjects, duplicate)
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: run `cmrfed synth --out {out}` first") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a cmrfed synth summary ({exc}); re-run cmrfed synth") from exc


# --- how each vendor's scanner looks ---------------------------------------------------------


@dataclass(frozen=True)
class ScannerLook:
    """A vendor's protocol and image chain: geometry ranges and the intensity transfer."""

    fov_mm: tuple[float, float]       # in-plane field of view; spacing = fov / matrix
    matrix_scale: float               # in-plane matrix = --shape x, y times this
    coverage_mm: tuple[float, float]  # stack coverage; slice thickness = coverage / slices
    slice_offset: int                 # slices relative to --shape z
    frames: tuple[int, int]           # cine frames per cycle, inclusive range
    gamma: float                      # intensity transfer curve exponent
    gain: float                       # stored value of full blood signal
    noise: float                      # noise sigma relative to blood signal (Rician magnitude)
    bias: float                       # strength of the smooth multiplicative coil bias field
    myocardium: float                 # myocardium / blood signal (SSFP contrast)


LOOKS: dict[str, ScannerLook] = {
    "siemens": ScannerLook((135, 150), 1.0, (80, 92), 0, (14, 18), 1.0, 450, 0.035, 0.15, 0.28),
    "philips": ScannerLook((140, 155), 1.125, (84, 96), 1, (18, 22), 0.8, 1800, 0.05, 0.25, 0.33),
    "ge": ScannerLook((145, 160), 0.875, (80, 92), -1, (11, 14), 1.3, 1100, 0.065, 0.3, 0.24),
    "canon": ScannerLook((135, 150), 1.0625, (84, 96), 0, (13, 16), 0.9, 700, 0.045, 0.2, 0.3),
}


# --- what each diagnosis does to the heart ----------------------------------------------------


@dataclass(frozen=True)
class Archetype:
    """Anatomy and motion of a diagnosis: (mean, sd) draws per subject, in mm and fractions."""

    lv_radius: tuple[float, float]     # ED mid-ventricular endocardial radius
    wall: tuple[float, float]          # ED LV wall thickness
    lv_ef: tuple[float, float]         # ejection fraction of the contracting myocardium
    rv_scale: tuple[float, float]      # RV size relative to a normal RV
    rv_ef: tuple[float, float]
    sphericity: float = 2.6            # LV length / epicardial radius (dilated hearts are rounder)
    septal: float = 0.0                # extra septal wall thickness (asymmetric hypertrophy)
    infarct: bool = False              # a thinned, akinetic sector (scar)
    trabeculation: float = 0.0         # spongy apical endocardium (non-compaction)
    rv_wall: float = 3.0               # RV free wall thickness
    rv_aneurysm: bool = False          # akinetic free-wall bulge (arrhythmogenic RV)


ARCHETYPES: dict[str, Archetype] = {
    "normal": Archetype((24, 1.8), (8.0, 0.8), (0.62, 0.04), (1.0, 0.07), (0.56, 0.05)),
    "dilated": Archetype((32, 2.5), (6.2, 0.7), (0.27, 0.07), (1.1, 0.1), (0.42, 0.07),
                         sphericity=2.2),
    "hypertrophic": Archetype((20, 1.8), (15.0, 2.0), (0.72, 0.04), (0.95, 0.07), (0.6, 0.05),
                              sphericity=2.4, septal=0.35),
    "infarct": Archetype((27, 2.0), (8.0, 0.8), (0.5, 0.06), (1.0, 0.08), (0.5, 0.06),
                         infarct=True),
    "ischaemic": Archetype((26, 2.0), (8.0, 0.8), (0.52, 0.06), (1.0, 0.08), (0.52, 0.06),
                           infarct=True),
    "hypertensive": Archetype((23.5, 1.8), (11.0, 1.0), (0.64, 0.04), (1.0, 0.07), (0.56, 0.05),
                              septal=0.1),
    "abnormal_rv": Archetype((22.5, 1.8), (7.8, 0.8), (0.6, 0.05), (1.45, 0.12), (0.33, 0.06)),
    "arrhythmogenic_rv": Archetype((23.5, 1.8), (7.8, 0.8), (0.58, 0.05), (1.35, 0.12),
                                   (0.35, 0.06), rv_aneurysm=True),
    "athlete": Archetype((27, 1.5), (9.5, 0.7), (0.6, 0.04), (1.2, 0.08), (0.55, 0.05)),
    "non_compaction": Archetype((27, 2.0), (7.5, 0.8), (0.42, 0.06), (1.0, 0.08), (0.5, 0.06),
                                trabeculation=0.14),
    "other": Archetype((26, 2.5), (9.0, 1.2), (0.5, 0.08), (1.1, 0.1), (0.5, 0.07)),
    "fallot": Archetype((22, 1.8), (7.8, 0.8), (0.58, 0.05), (1.4, 0.12), (0.38, 0.06),
                        rv_wall=6.0),
    "shunt": Archetype((22.5, 1.8), (7.8, 0.8), (0.62, 0.04), (1.35, 0.1), (0.58, 0.05)),
    "dilated_rv": Archetype((23, 1.8), (7.8, 0.8), (0.6, 0.05), (1.45, 0.12), (0.45, 0.06)),
    "tricuspid": Archetype((23, 1.8), (7.8, 0.8), (0.62, 0.05), (1.4, 0.12), (0.5, 0.06)),
}
# Each dataset's pathology codes -> archetype (codes clash across datasets: ACDC RV is an abnormal
# RV, M&Ms-2 RV a dilated one, M&Ms-2 LV a dilated LV).
ARCHETYPE_OF: dict[str, dict[str, str]] = {
    "acdc": {"NOR": "normal", "MINF": "infarct", "DCM": "dilated", "HCM": "hypertrophic",
             "RV": "abnormal_rv"},
    "mnms": {"NOR": "normal", "DCM": "dilated", "HCM": "hypertrophic", "HHD": "hypertensive",
             "ARV": "arrhythmogenic_rv", "IHD": "ischaemic", "AHS": "athlete",
             "LVNC": "non_compaction", "Other": "other"},
    "mnms2": {"NOR": "normal", "LV": "dilated", "HCM": "hypertrophic", "ARR": "arrhythmogenic_rv",
              "FALL": "fallot", "CIA": "shunt", "RV": "dilated_rv", "TRI": "tricuspid"},
}


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    """A subject to write: what it is, which random stream renders it, and its metadata."""

    subject: SynthSubject
    render_key: tuple[int, int]   # (dataset index, subject index): the subject's random stream
    archetype: str
    ed_shift: bool                # M&Ms-1: the cine does not start at ED
    meta: dict[str, Any]


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` (ties go to the earlier)."""
    weight_sum = float(sum(weights))
    if total <= 0 or weight_sum <= 0:
        return [0] * len(weights)
    quotas = [total * w / weight_sum for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _vendor_counts(total: int, sites: Sequence[_Site]) -> list[int]:
    """Floors first (scaled down for a small cohort), the rest by the real vendor shares."""
    floors = [site.floor for site in sites]
    if sum(floors) > total:
        floors = _largest_remainder(total, floors)
    extra = _largest_remainder(total - sum(floors), [site.weight for site in sites])
    return [f + e for f, e in zip(floors, extra, strict=True)]


def _pathology_deck(count: int, mix: Sequence[tuple[str, int]], normal_floor: float) -> list[str]:
    """``count`` pathology codes: normals at least ``normal_floor``, the rest by the real mix."""
    total = sum(n for _, n in mix)
    real_normal = dict(mix).get(NORMAL, 0) / total
    normals = min(count, math.ceil(count * max(real_normal, normal_floor)))
    if count >= 2:
        normals = min(normals, count - 1)
    abnormal = [(code, n) for code, n in mix if code != NORMAL]
    deck = [NORMAL] * normals
    for (code, _), n in zip(abnormal, _largest_remainder(count - normals, [n for _, n in abnormal]),
                            strict=True):
        deck += [code] * n
    return deck


def _split_counts(count: int, shares: Sequence[tuple[str, float]]) -> list[str]:
    folders: list[str] = []
    for (folder, _), n in zip(shares, _largest_remainder(count, [s for _, s in shares]), strict=True):
        folders += [folder] * n
    return folders


def _mnms_code(rng: np.random.Generator, taken: set[str]) -> str:
    """A 6-character M&Ms-1 code, letter-digit alternating like ``A0S9V9``."""
    letters, digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789"
    while True:
        code = "".join(letters[rng.integers(26)] if i % 2 == 0 else digits[rng.integers(10)]
                       for i in range(6))
        if code not in taken:
            taken.add(code)
            return code


def _label(pathology: str) -> int:
    return 0 if pathology == NORMAL else 1


def _plan_acdc(n: int, rng: np.random.Generator) -> list[_Planned]:
    site = _SITES["acdc"][0]
    codes = [code for code, _ in site.mix]
    per_group = _largest_remainder(n, [w for _, w in site.mix])
    entries: list[tuple[str, str]] = []
    for code, count in zip(codes, per_group, strict=True):
        n_train = math.ceil(count * 2 / 3)  # ACDC: 100 training, 50 testing
        entries += [(code, "training")] * n_train + [(code, "testing")] * (count - n_train)
    order = rng.permutation(len(entries))
    planned: list[_Planned] = []
    next_id = {"training": 1, "testing": 101}
    for index, position in enumerate(order):
        pathology, split = entries[position]
        number = next_id[split]
        next_id[split] += 1
        pid = f"patient{number:03d}"
        quirks = ("unscaled_sform",) if index % 2 == 0 else ()
        subject = SynthSubject("acdc", pid, site.vendor, site.client, pathology, _label(pathology),
                               split, (ACDC_ROOT / split / pid).as_posix(), True, quirks)
        meta = {"height": round(float(rng.normal(172, 9)), 1),
                "weight": round(float(rng.normal(76, 13)), 1)}
        planned.append(_Planned(subject, (0, index), ARCHETYPE_OF["acdc"][pathology], False, meta))
    return sorted(planned, key=lambda p: p.subject.subject_id)


def _plan_mnms(n: int, rng: np.random.Generator) -> list[_Planned]:
    sites = _SITES["mnms"]
    entries: list[tuple[_Site, str, str]] = []
    for site, count in zip(sites, _vendor_counts(n, sites), strict=True):
        deck = _pathology_deck(count, site.mix, NORMAL_SHARE_FLOOR)
        deck = [deck[i] for i in rng.permutation(len(deck))]
        # Fewer unlabelled than the real third of vendor C, so the GE client keeps its labels.
        unlabelled = max(1, round(count / 6)) if site.vendor == "C" and count >= 3 else 0
        folders = [MNMS_UNLABELLED] * unlabelled + _split_counts(count - unlabelled,
                                                                 _MNMS_FOLDERS[site.vendor])
        entries += [(site, code, folder) for code, folder in zip(deck, folders, strict=True)]
    taken: set[str] = set()
    planned: list[_Planned] = []
    for index, (site, pathology, folder) in enumerate(entries):
        code = _mnms_code(rng, taken)
        labelled = folder != MNMS_UNLABELLED
        subject = SynthSubject("mnms", code, site.vendor, site.client, pathology,
                               _label(pathology), folder, (MNMS_ROOT / folder / code).as_posix(),
                               labelled)
        centres = _MNMS_CENTRES[site.vendor]
        meta = {
            "centre": int(centres[rng.integers(len(centres))]),
            "age": int(rng.integers(18, 85)),
            "sex": "M" if rng.random() < 0.6 else "F",
            "height": None if rng.random() < 0.4 else round(float(rng.normal(170, 9)), 1),
            "weight": None if rng.random() < 0.05 else round(float(rng.normal(78, 14)), 1),
        }
        shifted = labelled and rng.random() < 0.3
        planned.append(_Planned(subject, (1, index), ARCHETYPE_OF["mnms"][pathology], shifted, meta))
    return planned


def _plan_mnms2(n: int, rng: np.random.Generator) -> list[_Planned]:
    sites = _SITES["mnms2"]
    entries: list[tuple[_Site, str]] = []
    for site, count in zip(sites, _vendor_counts(n, sites), strict=True):
        entries += [(site, code) for code in _pathology_deck(count, site.mix, NORMAL_SHARE_FLOOR)]
    entries = [entries[i] for i in rng.permutation(len(entries))]
    range_counts = _largest_remainder(n, [hi - lo + 1 for _, lo, hi in MNMS2_CODE_RANGES])
    # RV and TRI never fall in the training range: fill it with the other diseases first.
    allowed = [i for i, (_, code) in enumerate(entries) if code not in MNMS2_NOT_IN_TRAIN]
    train = allowed[: range_counts[0]]
    ordered = [entries[i] for i in train] + [e for i, e in enumerate(entries) if i not in train]
    planned: list[_Planned] = []
    position = 0
    for (split, low, _), count in zip(MNMS2_CODE_RANGES, range_counts, strict=True):
        for offset in range(count):
            site, pathology = ordered[position]
            code = f"{low + offset:03d}"
            scanners = _MNMS2_SCANNERS[site.vendor]
            scanner, field = scanners[rng.integers(len(scanners))]
            subject = SynthSubject("mnms2", code, site.vendor, site.client, pathology,
                                   _label(pathology), split,
                                   (MNMS2_ROOT / "dataset" / code).as_posix())
            meta = {"scanner": scanner, "field": field}
            planned.append(_Planned(subject, (2, position), ARCHETYPE_OF["mnms2"][pathology],
                                    False, meta))
            position += 1
    return planned


def _plant_duplicate(mnms: list[_Planned], mnms2: list[_Planned],
                     rng: np.random.Generator) -> tuple[list[_Planned], DuplicatePair | None]:
    """Make one M&Ms-2 subject render as an M&Ms-1 subject of the same vendor and diagnosis."""
    pairs = [(i, j) for i, one in enumerate(mnms) for j, two in enumerate(mnms2)
             if one.subject.labelled and one.subject.client == two.subject.client
             and _SHARED_DIAGNOSIS.get(one.subject.pathology) == two.subject.pathology]
    if not pairs:
        return mnms2, None
    i, j = pairs[rng.integers(len(pairs))]
    source, target = mnms[i], mnms2[j]
    copy = _Planned(target.subject, source.render_key, source.archetype, source.ed_shift,
                    target.meta)
    pair = DuplicatePair(source.subject.subject_id, target.subject.subject_id,
                         target.subject.client)
    return [*mnms2[:j], copy, *mnms2[j + 1:]], pair


def plan_cohort(seed: int, subjects: int) -> tuple[list[_Planned], DuplicatePair | None]:
    """Who is in the cohort: a pure function of the seed and the size, drawn before any image."""
    rng = np.random.default_rng(seed)
    acdc = _plan_acdc(subjects, rng)
    mnms = _plan_mnms(subjects, rng)
    mnms2 = _plan_mnms2(subjects, rng)
    mnms2, duplicate = _plant_duplicate(mnms, mnms2, rng)
    return acdc + mnms + mnms2, duplicate


# --- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heart:
    """One subject's heart, drawn once and shared by the short- and long-axis views."""

    ri0: float          # ED mid-ventricular endocardial radius
    re0: float          # ED epicardial radius
    li0: float          # ED endocardial length base -> apex
    le0: float          # ED epicardial length
    ef: float
    descent: float      # base descent at ES (long-axis shortening)
    rv_a0: float        # RV ellipse semi-axis towards the free wall, ED
    rv_b0: float        # RV ellipse semi-axis along the septum, ED
    rv_ef: float
    rv_length: float
    septal: float
    infarct_angle: float | None
    infarct_width: float
    trabeculation: float
    trab_lobes: int
    trab_phase: float
    rv_wall: float
    rv_aneurysm: bool
    es_fraction: float  # ES time as a fraction of the cycle


@dataclass(frozen=True)
class _Geometry:
    matrix: tuple[int, int, int]
    spacing: tuple[float, float, float]
    frames: int
    dt_ms: float
    origin: tuple[float, float, float]
    centre_mm: tuple[float, float]   # heart centre relative to the image centre
    theta: float                     # direction from LV to RV in the image plane
    base_mm: float                   # depth of the ED base plane below the first slice edge


def _draw(rng: np.random.Generator, mean_sd: tuple[float, float], low: float, high: float) -> float:
    return float(np.clip(rng.normal(*mean_sd), low, high))


def _draw_heart(archetype: Archetype, coverage: float, rng: np.random.Generator) -> _Heart:
    body = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    ri0 = body * _draw(rng, archetype.lv_radius, 14, 42)
    wall = body * _draw(rng, archetype.wall, 4, 22)
    ef = _draw(rng, archetype.lv_ef, 0.12, 0.82)
    re0 = ri0 + wall
    le0 = min(re0 * archetype.sphericity, 0.9 * coverage)
    li0 = le0 - wall
    rv_scale = body * _draw(rng, archetype.rv_scale, 0.8, 1.8)
    return _Heart(
        ri0=ri0, re0=re0, li0=li0, le0=le0, ef=ef, descent=0.2 * ef * li0,
        rv_a0=17.0 * rv_scale, rv_b0=38.0 * math.sqrt(rv_scale),
        rv_ef=_draw(rng, archetype.rv_ef, 0.15, 0.75), rv_length=0.78 * le0,
        septal=archetype.septal * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(0.0, 0.06)),
        infarct_angle=float(rng.uniform(0.6, 2 * math.pi - 0.6)) if archetype.infarct else None,
        infarct_width=float(rng.uniform(0.6, 1.0)),
        trabeculation=archetype.trabeculation * float(rng.uniform(0.8, 1.2)),
        trab_lobes=int(rng.integers(9, 14)), trab_phase=float(rng.uniform(0, 2 * math.pi)),
        rv_wall=archetype.rv_wall, rv_aneurysm=archetype.rv_aneurysm,
        es_fraction=float(rng.uniform(0.33, 0.42)),
    )


def _draw_geometry(look: ScannerLook, shape: tuple[int, int, int], frames: int | None,
                   coverage: float, rng: np.random.Generator) -> _Geometry:
    nx = max(MIN_IN_PLANE // 2, round(shape[0] * look.matrix_scale))
    ny = max(MIN_IN_PLANE // 2, round(shape[1] * look.matrix_scale))
    nz = max(3, shape[2] + look.slice_offset + int(rng.integers(0, 2)))
    fov = float(rng.uniform(*look.fov_mm))
    in_plane = round(fov / max(nx, ny), 4)
    thickness = round(coverage / nz * 2) / 2  # scanners prescribe thickness in 0.5 mm steps
    n_frames = frames if frames is not None else int(rng.integers(look.frames[0], look.frames[1] + 1))
    rr_ms = float(rng.uniform(750, 1100))
    origin = (round(float(rng.uniform(-40, 40)) + nx * in_plane / 2, 3),
              round(float(rng.uniform(-40, 40)) + ny * in_plane / 2, 3),
              round(float(rng.uniform(-60, 0)), 3))
    centre = (float(rng.normal(0, 0.04)) * fov, float(rng.normal(0, 0.04)) * fov)
    return _Geometry((nx, ny, nz), (in_plane, in_plane, thickness), n_frames,
                     round(rr_ms / n_frames, 3), origin, centre,
                     float(rng.uniform(-0.5, 0.5)) + math.pi, float(rng.uniform(0.1, 0.4)) * thickness)


def contraction_curve(frames: int, es_fraction: float) -> tuple[np.ndarray, int]:
    """Contraction (0 at ED, 1 at ES) per frame: raised cosines down to ES and back; ES index."""
    es = int(np.clip(round(es_fraction * frames), 2, frames - 2))
    t = np.arange(frames, dtype=np.float64)
    systole = 0.5 * (1 - np.cos(np.pi * t / es))
    diastole = 0.5 * (1 + np.cos(np.pi * (t - es) / (frames - es)))
    return np.where(t <= es, systole, diastole), es


def _inside(distance: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``distance`` edge-widths inside a
    boundary: a linear ramp, cheaper than a logistic and as good at one voxel's scale."""
    return np.clip(0.5 + 0.5 * distance, 0.0, 1.0)


def _smoothstep(x: np.ndarray | float, low: float, high: float) -> np.ndarray:
    y = np.clip((np.asarray(x) - low) / (high - low), 0.0, 1.0)
    return y * y * (3 - 2 * y)


@dataclass(frozen=True)
class _Polar:
    """In-plane coordinates relative to the LV centre, rotated so angle 0 points to the RV."""

    u: np.ndarray
    v: np.ndarray
    r: np.ndarray
    phi: np.ndarray


def _polar(x: np.ndarray, y: np.ndarray, theta: float) -> _Polar:
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    return _Polar(u, v, np.hypot(u, v), np.arctan2(v, u))


def _lv_radii(heart: _Heart, phi: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray, float, float]:
    """Endo/epicardial equatorial radii per angle at contraction c, infarct weight, lengths."""
    wall0 = (heart.re0 - heart.ri0) * (1 + heart.septal * np.cos(phi))
    scar = np.zeros_like(phi)
    if heart.infarct_angle is not None:
        closeness = np.cos(phi - heart.infarct_angle)
        scar = np.clip((closeness - math.cos(heart.infarct_width)) * 4.0, 0.0, 1.0)
        wall0 = wall0 * (1 - 0.5 * scar)
    ri0 = heart.ri0
    re0 = ri0 + wall0
    li_es = heart.li0 - heart.descent
    k_remote = math.sqrt((1 - heart.ef) * heart.li0 / li_es)
    li = heart.li0 - heart.descent * c
    le = heart.le0 - heart.descent * c
    ri = ri0 * (1 + (k_remote - 1) * c * (1 - scar))
    # the myocardium keeps its volume: a thinner cavity means a thicker wall
    re = np.sqrt((re0**2 * heart.le0 - ri0**2 * heart.li0 + ri**2 * li) / le)
    return ri, re, scar, li, le


def _heart_fractions(heart: _Heart, polar: _Polar, depth: np.ndarray, c: float, edge: float,
                     with_labels: bool) -> dict[str, np.ndarray]:
    """Soft tissue fractions (blood, wall) and, if asked, hard labels of the heart at contraction c.

    ``depth`` is the distance below the ED base plane; the base descends by ``descent * c``.
    """
    ri_eq, re_eq, _, li, le = _lv_radii(heart, polar.phi, c)
    d = depth - heart.descent * c
    inside_i = (d >= 0) & (d <= li)
    inside_e = (d >= 0) & (d <= le)
    taper_i = np.sqrt(np.clip(1 - (d / li) ** 2, 0, 1))
    taper_e = np.sqrt(np.clip(1 - (d / le) ** 2, 0, 1))
    ri = ri_eq * taper_i
    if heart.trabeculation > 0:
        lobes = 0.5 * (1 + np.sin(heart.trab_lobes * polar.phi + heart.trab_phase))
        ri = ri * (1 - heart.trabeculation * lobes * _smoothstep(d / li, 0.3, 0.6))
    ri = np.where(inside_i, ri, -50.0)
    re = np.where(inside_e, re_eq * taper_e, -50.0)
    endo = _inside((ri - polar.r) / edge)
    epi = np.maximum(_inside((re - polar.r) / edge), endo)

    # RV: an ellipse wrapped around the septum, minus the LV; it shortens and narrows in systole.
    rv_len = heart.rv_length - 1.2 * heart.descent * c
    k_rv = 1 + (math.sqrt(1 - heart.rv_ef) - 1) * c
    taper_rv = np.sqrt(np.clip(1 - (d / rv_len) ** 2, 0, 1)) * ((d >= 0) & (d <= rv_len))
    a = heart.rv_a0 * k_rv * taper_rv + 1e-3
    b = heart.rv_b0 * k_rv * taper_rv + 1e-3
    septum = heart.re0 * np.sqrt(np.clip(1 - (depth / heart.le0) ** 2, 0, 1))
    centre_u = septum + 0.2 * heart.rv_a0 * taper_rv
    rho = np.sqrt(((polar.u - centre_u) / a) ** 2 + (polar.v / b) ** 2)
    rv_cavity = _inside((1 - rho) * np.sqrt(a * b) / edge)
    rho_wall = np.sqrt(((polar.u - centre_u) / (a + heart.rv_wall)) ** 2
                       + (polar.v / (b + heart.rv_wall)) ** 2)
    rv_outer = _inside((1 - rho_wall) * np.sqrt(a * b) / edge) * (taper_rv > 0)
    if heart.rv_aneurysm:  # an akinetic free-wall bulge keeps its diastolic size
        bulge_r = 0.35 * heart.rv_a0 * taper_rv + 1e-3
        du = polar.u - (centre_u + heart.rv_a0 * taper_rv * 0.9)
        dv = polar.v - 0.45 * heart.rv_b0 * taper_rv
        bulge = _inside((bulge_r - np.hypot(du, dv)) / edge) * (taper_rv > 0)
        rv_cavity = np.maximum(rv_cavity, bulge)
        rv_outer = np.maximum(rv_outer, _inside((bulge_r + heart.rv_wall - np.hypot(du, dv)) / edge)
                              * (taper_rv > 0))
    rv_cavity = rv_cavity * (1 - epi)
    rv_outer = np.maximum(rv_outer * (1 - epi), rv_cavity)

    # Atria: above the (descending) base plane, blood pools labelled background; only the few
    # slices above the base need them.
    blood = endo + rv_cavity
    above = np.flatnonzero((d < 0) & (d > -25))
    if above.size:
        la = _inside((0.85 * heart.ri0 - polar.r) / edge)
        ra = _inside((1 - np.sqrt(((polar.u - heart.re0 - 0.2 * heart.rv_a0) / heart.rv_a0) ** 2
                                   + (polar.v / (0.8 * heart.rv_b0)) ** 2)) * heart.rv_a0 / edge)
        atria = np.maximum(la, ra) * (1 - epi[..., above]) * (1 - rv_outer[..., above])
        blood[..., above] += atria
    wall = (epi - endo) + (rv_outer - rv_cavity)
    parts = {"blood": blood, "wall": wall, "heart": np.clip(blood + wall, 0, 1)}
    if with_labels:
        labels = np.zeros(np.broadcast_shapes(endo.shape, rv_cavity.shape), dtype=np.uint8)
        labels[rv_cavity > 0.5] = _CANONICAL["rv"]
        labels[epi > 0.5] = _CANONICAL["myo"]
        labels[endo > 0.5] = _CANONICAL["lv"]
        parts["labels"] = labels
    return parts


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]
                  ) -> np.ndarray:
    """A smooth random field of unit-ish amplitude (coil bias, tissue texture)."""
    grid = rng.standard_normal(coarse)
    field = ndimage.zoom(grid, [s / g for s, g in zip(shape, coarse, strict=True)], order=1,
                         mode="nearest", grid_mode=True)
    return field[tuple(slice(0, s) for s in shape)]


def _background(x: np.ndarray, y: np.ndarray, fov: float, rng: np.random.Generator,
                liver: np.ndarray, edge: float) -> np.ndarray:
    """Chest around the heart: body tissue with texture, subcutaneous fat, lungs, air, liver."""
    body_a, body_b = fov * rng.uniform(0.56, 0.64), fov * rng.uniform(0.44, 0.5)
    by = fov * rng.uniform(0.02, 0.08)
    body_rho = np.sqrt((x / body_a) ** 2 + ((y - by) / body_b) ** 2)
    body = _inside((1 - body_rho) * body_b / edge)
    fat = _inside((body_rho - 1 + 10.0 / body_b) * body_b / edge) * body
    texture = 1 + 0.15 * _smooth_field(rng, x.shape, (10, 10, 1)[: x.ndim])
    image = body * 0.3 * texture + fat * 0.45
    for side in (-1, 1):
        lx = side * fov * rng.uniform(0.36, 0.42)
        rho = np.sqrt(((x - lx) / (fov * 0.14)) ** 2 + ((y - by) / (fov * 0.3)) ** 2)
        lung = _inside((1 - rho) * fov * 0.14 / edge)
        image = image * (1 - lung) + 0.04 * lung
    liver_mask = _inside((1 - np.sqrt(((x + fov * 0.2) / (fov * 0.35)) ** 2
                                       + ((y - fov * 0.25) / (fov * 0.2)) ** 2)) * 20 / edge)
    return image * (1 - liver_mask * liver) + 0.42 * liver_mask * liver


def _scanner_chain(signal: np.ndarray, look: ScannerLook, bias: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Bias field, transfer curve, Rician magnitude noise and gain, stored as int16."""
    shaped = np.clip(signal * bias, 0, None)
    if look.gamma != 1.0:
        shaped **= look.gamma
    real = rng.standard_normal(shaped.shape, dtype=np.float32)
    real *= look.noise
    real += shaped
    imag = rng.standard_normal(shaped.shape, dtype=np.float32)
    imag *= look.noise
    magnitude = np.hypot(real, imag)
    magnitude *= look.gain
    np.clip(magnitude, 0, np.iinfo(np.int16).max, out=magnitude)
    return np.rint(magnitude, out=magnitude).astype(np.int16)


@dataclass(frozen=True)
class _Rendered:
    cine: np.ndarray            # (x, y, z, t) int16
    labels_ed: np.ndarray       # (x, y, z) uint8, canonical numbering
    labels_es: np.ndarray
    ed: int
    es: int
    geometry: _Geometry
    long_axis: _LongAxis | None


@dataclass(frozen=True)
class _LongAxis:
    cine: np.ndarray            # (x, y, 1, t) int16
    labels_ed: np.ndarray       # (x, y, 1) uint8
    labels_es: np.ndarray
    spacing: tuple[float, float, float]


def _render_short_axis(heart: _Heart, geometry: _Geometry, look: ScannerLook,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    nx, ny, nz = geometry.matrix
    sx, sy, sz = geometry.spacing
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
    depth = ((np.arange(nz, dtype=np.float32) + 0.5) * sz - geometry.base_mm)[None, None, :]
    fov = max(nx * sx, ny * sy)
    edge = 0.5 * sx
    xx, yy = np.broadcast_arrays(x, y)
    xx, yy = xx[..., 0], yy[..., 0]
    liver = _smoothstep(depth / heart.le0, 0.5, 1.0)
    background = _background(xx[..., None], yy[..., None], fov, rng, liver, edge)
    polar = _polar(x - geometry.centre_mm[0], y - geometry.centre_mm[1], geometry.theta)
    bias = np.exp(look.bias * _smooth_field(rng, (nx, ny, nz), (3, 3, 2))).astype(np.float32)
    curve, es = contraction_curve(geometry.frames, heart.es_fraction)
    cine = np.empty((nx, ny, nz, geometry.frames), dtype=np.int16)
    labels: dict[int, np.ndarray] = {}
    for t, c in enumerate(curve):
        parts = _heart_fractions(heart, polar, depth, float(c), edge, with_labels=t in (0, es))
        blood_signal = 1.0 - 0.05 * c  # inflow brightness drops a little in systole
        signal = (background * (1 - parts["heart"]) + blood_signal * parts["blood"]
                  + look.myocardium * parts["wall"]).astype(np.float32)
        cine[..., t] = _scanner_chain(signal, look, bias, rng)
        if t in (0, es):
            labels[t] = parts["labels"]
    return cine, labels[0], labels[es], es


def _render_long_axis(heart: _Heart, geometry: _Geometry, look: ScannerLook,
                      rng: np.random.Generator) -> _LongAxis:
    """A 4-chamber view: LV on the image right, RV on the left, atria above the base."""
    nx, ny, _ = geometry.matrix
    spacing = geometry.spacing[0]
    fov = max(nx, ny) * spacing
    edge = 0.5 * spacing
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * spacing)[:, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * spacing)[None, :]
    xx, yy = np.broadcast_arrays(x, y)
    background = _background(np.asarray(xx), np.asarray(yy), fov, rng, np.zeros(1), edge)
    bias = np.exp(look.bias * _smooth_field(rng, (nx, ny), (3, 3))).astype(np.float32)
    top = -0.45 * heart.le0  # base plane, image y grows towards the apex
    curve, es = contraction_curve(geometry.frames, heart.es_fraction)
    cine = np.empty((nx, ny, 1, geometry.frames), dtype=np.int16)
    labels: dict[int, np.ndarray] = {}
    rv_half0 = 0.6 * heart.rv_a0
    rv_x = -(heart.re0 + rv_half0 + heart.rv_wall)
    for t, c in enumerate(curve):
        ri, re, _, li, le = _lv_radii(heart, np.array([math.pi / 2]), float(c))
        base = top + heart.descent * c
        d = y - base
        endo = _inside((ri[0] * np.sqrt(np.clip(1 - (d / li) ** 2, 0, 1)) - np.abs(x)) / edge)
        endo = endo * (d >= 0)
        epi = _inside((re[0] * np.sqrt(np.clip(1 - (d / le) ** 2, 0, 1)) - np.abs(x)) / edge)
        epi = np.maximum(epi * (d >= 0), endo)
        rv_len = heart.rv_length - 1.2 * heart.descent * c
        rv_half = rv_half0 * (1 + (math.sqrt(1 - heart.rv_ef) - 1) * c)
        d_rv = y - (top + 1.2 * heart.descent * c)
        rv_w = rv_half * np.sqrt(np.clip(1 - (d_rv / rv_len) ** 2, 0, 1)) * (d_rv >= 0)
        rv_cavity = _inside((rv_w - np.abs(x - rv_x)) / edge) * (1 - epi) * (rv_w > 0)
        rv_outer = np.maximum(_inside((rv_w + heart.rv_wall - np.abs(x - rv_x)) / edge)
                              * (1 - epi) * (rv_w > 0), rv_cavity)
        la = _inside((1 - np.hypot(x / (0.9 * heart.ri0), (y - base + 20) / 20)) * 15 / edge)
        ra = _inside((1 - np.hypot((x - rv_x) / (1.1 * rv_half0), (y - base + 18) / 18)) * 12
                      / edge)
        atria = np.maximum(la, ra) * (d < 0)
        blood = endo + rv_cavity + atria
        wall = (epi - endo) + (rv_outer - rv_cavity)
        heart_part = np.clip(blood + wall, 0, 1)
        signal = (background * (1 - heart_part) + (1 - 0.05 * c) * blood
                  + look.myocardium * wall).astype(np.float32)
        cine[:, :, 0, t] = _scanner_chain(signal, look, bias, rng)
        if t in (0, es):
            frame_labels = np.zeros((nx, ny, 1), dtype=np.uint8)
            frame_labels[..., 0][rv_cavity > 0.5] = _CANONICAL["rv"]
            frame_labels[..., 0][epi > 0.5] = _CANONICAL["myo"]
            frame_labels[..., 0][endo > 0.5] = _CANONICAL["lv"]
            labels[t] = frame_labels
    return _LongAxis(cine, labels[0], labels[es], (spacing, spacing, 8.0))


def _render_subject(seed: int, planned: _Planned, shape: tuple[int, int, int],
                   frames: int | None, long_axis: bool) -> _Rendered:
    """Render one subject from its own random streams (independent of every other subject).

    Stream 0 draws the heart and the scan geometry, 1 the short-axis image noise and texture,
    2 the long-axis view; so a copy rendered from the same key is identical, LA or not.
    """
    look = LOOKS[planned.subject.client]
    streams = [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*planned.render_key, k)))
               for k in range(3)]
    coverage = float(streams[0].uniform(*look.coverage_mm))
    heart = _draw_heart(ARCHETYPES[planned.archetype], coverage, streams[0])
    geometry = _draw_geometry(look, shape, frames, coverage, streams[0])
    shift = int(streams[0].integers(1, geometry.frames)) if planned.ed_shift else 0
    cine, labels_ed, labels_es, es = _render_short_axis(heart, geometry, look, streams[1])
    cine = np.roll(cine, shift, axis=3)
    la = None
    if long_axis:
        la = _render_long_axis(heart, geometry, look, streams[2])
        la = _LongAxis(np.roll(la.cine, shift, axis=3), la.labels_ed, la.labels_es, la.spacing)
    return _Rendered(cine, labels_ed, labels_es, shift, (es + shift) % geometry.frames, geometry, la)


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


_WRITERS = {"acdc": _write_acdc, "mnms": _write_mnms, "mnms2": _write_mnms2}
_WORKERS = min(4, os.cpu_count() or 1)  # numpy and zlib release the GIL: threads overlap


def _write_subject(root: Path, seed: int, planned: _Planned, shape: tuple[int, int, int],
                   frames: int | None) -> tuple[int, int]:
    """Render and write one subject; return its 0-based ED and ES indices (for the CSVs)."""
    dataset = planned.subject.dataset
    rendered = _render_subject(seed, planned, shape, frames, long_axis=dataset == "mnms2")
    _WRITERS[dataset](root, planned, rendered)
    return rendered.ed, rendered.es


def _check_options(seed: int, subjects: int, shape: Sequence[int], frames: int | None) -> None:
    if seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed}")
    if not MIN_SUBJECTS <= subjects <= MAX_SUBJECTS:
        raise UsageError(f"--subjects takes {MIN_SUBJECTS} to {MAX_SUBJECTS} subjects per dataset,"
                         f" got {subjects}")
    if len(shape) != 3 or min(shape[:2]) < MIN_IN_PLANE or shape[2] < MIN_SLICES:
        raise UsageError(f"--shape takes X,Y,Z with X, Y >= {MIN_IN_PLANE} and Z >= {MIN_SLICES},"
                         f" got {','.join(map(str, shape))}")
    if frames is not None and not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise UsageError(f"--frames takes {MIN_FRAMES} to {MAX_FRAMES} frames, got {frames}")


def write_synthetic_cohort(out: str | Path, seed: int = 0, subjects: int = 24,
                           shape: tuple[int, int, int] = (96, 96, 8), frames: int | None = None,
                           overwrite: bool = False) -> SynthSummary:
    """Write the ACDC, M&Ms-1 and M&Ms-2 trees of a synthetic cohort under ``out``, atomically.

    ``subjects`` is per dataset; ``shape`` is the nominal matrix (each vendor's protocol scales it
    and changes the slice count); ``frames`` fixes the cine length (default: per vendor). The
    same seed gives byte-identical files. An existing ``out`` is refused unless ``overwrite``.
    """
    _check_options(seed, subjects, shape, frames)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    planned, duplicate = plan_cohort(seed, subjects)
    summary = SynthSummary(Path(out), seed, subjects, shape,
                           tuple(p.subject for p in planned), duplicate)
    with folder_lock(out), new_output(out, COHORT, overwrite) as tmp:
        # Each subject renders from its own random streams, so the worker order changes nothing.
        with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            frames_of = list(pool.map(lambda entry: _write_subject(tmp, seed, entry, shape, frames),
                                      planned))
        mnms_rows = [(entry, ed, es) for entry, (ed, es) in zip(planned, frames_of, strict=True)
                     if entry.subject.dataset == "mnms"]
        _write_mnms_csv(tmp, mnms_rows)
        _write_mnms2_csv(tmp, [p for p in planned if p.subject.dataset == "mnms2"])
        write_json(paths.synth_summary_path(tmp),
                   summary.to_json() | {"options": {"seed": seed, "subjects": subjects,
                                                    "shape": list(shape), "frames": frames},
                                        "versions": versions()})
    return summary


def cohort_table(summary: SynthSummary) -> Table:
    """Subjects per dataset x vendor x pathology, for the CLI to print."""
    clients = {(s.dataset, s.vendor): s.client for s in summary.subjects}
    table = Table(title=f"synthetic cohort in {summary.out} (seed {summary.seed})")
    for column in ("dataset", "vendor", "client", "pathology", "label"):
        table.add_column(column)
    table.add_column("subjects", justify="right")
    for (dataset, vendor, pathology), count in summary.counts().items():
        table.add_row(dataset, vendor, clients[(dataset, vendor)], pathology,
                      str(_label(pathology)), str(count))
    per_client = summary.client_label_counts()
    caption = ", ".join(f"{client} {per_client.get((client, 0), 0)} normal / "
                        f"{per_client.get((client, 1), 0)} abnormal"
                        for client in dict.fromkeys(s.client for s in summary.subjects))
    if summary.duplicate:
        caption += (f"; planted duplicate: M&Ms-1 {summary.duplicate.mnms} = M&Ms-2 "
                    f"{summary.duplicate.mnms2} ({summary.duplicate.client})")
    table.caption = caption
    return table
