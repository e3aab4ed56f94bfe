"""Who is in the synthetic cohort: sites, label mixes, splits, subject ids and metadata.

Why a module of its own: the plan is a pure function of the seed and the size, drawn before any
image is rendered (``plan_cohort``), so it can be read, tested and changed without the phantom or
the file writers. The layout and label facts are written from the dataset reference notes, not
read from ``data_manifests/`` (see cmrfed/data/synth.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmrfed import paths
from cmrfed.errors import DataError

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
    heterogeneity: dict[str, Any] | None = None  # the dial's record (cmrfed/data/synth_dial.py)

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
            "heterogeneity": self.heterogeneity,
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
                            tuple(raw["shape"]), subjects, duplicate, raw.get("heterogeneity"))
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: run `cmrfed synth --out {out}` first") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a cmrfed synth summary ({exc}); re-run cmrfed synth") from exc


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


def _floored_normals(count: int, mix: Sequence[tuple[str, int]], normal_floor: float) -> int:
    """Normals of a vendor group today: at least ``normal_floor`` of it, else the real share, and
    (from two subjects on) at least one abnormal."""
    total = sum(n for _, n in mix)
    real_normal = dict(mix).get(NORMAL, 0) / total
    normals = min(count, math.ceil(count * max(real_normal, normal_floor)))
    return min(normals, count - 1) if count >= 2 else normals


@dataclass(frozen=True)
class LabelShift:
    """The label-shift knob: each site's normal share moved away from the pooled share.

    ``today`` holds each site's (client's) normal share in the default cohort (the real
    per-vendor mixes, the small vendors' normals floored) and ``pooled`` the share of the whole
    cohort. A (dataset, vendor) group of a site gets ``group_today + (level - 1) * (site_today -
    pooled)``: at 1 today's mix exactly, at 0 every site the pooled mix, and larger values push
    each site further the way it already leans. Counts are rounded and keep one subject of each
    label in a group of two or more.
    """

    level: float = 1.0
    pooled: float = 0.0
    today: tuple[tuple[str, float], ...] = ()

    def normals(self, today: int, count: int, client: str) -> int:
        if count == 0:
            return 0
        lean = dict(self.today)[client] - self.pooled
        share = today / count + (self.level - 1.0) * lean
        low, high = (1, count - 1) if count >= 2 else (0, count)
        return int(min(max(round(count * share), low), high))


def _pathology_deck(count: int, mix: Sequence[tuple[str, int]], normals: int) -> list[str]:
    """``count`` pathology codes: ``normals`` normals, the abnormal rest by the real mix."""
    abnormal = [(code, n) for code, n in mix if code != NORMAL]
    deck = [NORMAL] * normals
    for (code, _), n in zip(abnormal, _largest_remainder(count - normals, [n for _, n in abnormal]),
                            strict=True):
        deck += [code] * n
    return deck


def _acdc_normals(n: int) -> int:
    """ACDC's normals in the default cohort: its five groups are equal (NOR listed first)."""
    return _largest_remainder(n, [w for _, w in _SITES["acdc"][0].mix])[0]


def _today_normals(n: int) -> list[tuple[str, int, int]]:
    """(client, normals, subjects) of every (dataset, vendor) group of the default cohort of size
    ``n``."""
    groups = [(_SITES["acdc"][0].client, _acdc_normals(n), n)]
    for dataset in ("mnms", "mnms2"):
        sites = _SITES[dataset]
        groups += [(site.client, _floored_normals(count, site.mix, NORMAL_SHARE_FLOOR), count)
                   for site, count in zip(sites, _vendor_counts(n, sites), strict=True)]
    return groups


def label_shift(n: int, level: float) -> LabelShift:
    """The knob at ``level`` for a cohort of ``n`` subjects per dataset: the pooled normal share
    and each site's, in the default cohort."""
    groups = _today_normals(n)
    normals, subjects = Counter[str](), Counter[str]()
    for client, group_normals, count in groups:
        normals[client] += group_normals
        subjects[client] += count
    today = tuple((client, normals[client] / subjects[client]) for client in subjects)
    return LabelShift(level, sum(normals.values()) / sum(subjects.values()), today)


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


def _plan_acdc(n: int, rng: np.random.Generator, shift: LabelShift) -> list[_Planned]:
    site = _SITES["acdc"][0]
    assert site.mix[0][0] == NORMAL  # the deck below lists normals first, as the mix does
    per_group = Counter(_pathology_deck(n, site.mix, shift.normals(_acdc_normals(n), n, site.client)))
    entries: list[tuple[str, str]] = []
    for code, count in ((code, per_group[code]) for code, _ in site.mix):
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


def _plan_mnms(n: int, rng: np.random.Generator, shift: LabelShift) -> list[_Planned]:
    sites = _SITES["mnms"]
    entries: list[tuple[_Site, str, str]] = []
    for site, count in zip(sites, _vendor_counts(n, sites), strict=True):
        normals = shift.normals(_floored_normals(count, site.mix, NORMAL_SHARE_FLOOR), count,
                                 site.client)
        deck = _pathology_deck(count, site.mix, normals)
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


def _plan_mnms2(n: int, rng: np.random.Generator, shift: LabelShift) -> list[_Planned]:
    sites = _SITES["mnms2"]
    entries: list[tuple[_Site, str]] = []
    for site, count in zip(sites, _vendor_counts(n, sites), strict=True):
        normals = shift.normals(_floored_normals(count, site.mix, NORMAL_SHARE_FLOOR), count,
                                 site.client)
        entries += [(site, code) for code in _pathology_deck(count, site.mix, normals)]
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


def plan_cohort(seed: int, subjects: int, label_shift_level: float = 1.0
                ) -> tuple[list[_Planned], DuplicatePair | None]:
    """Who is in the cohort: a pure function of the seed, the size and the label-shift knob, drawn
    before any image."""
    rng = np.random.default_rng(seed)
    shift = label_shift(subjects, label_shift_level)
    acdc = _plan_acdc(subjects, rng, shift)
    mnms = _plan_mnms(subjects, rng, shift)
    mnms2 = _plan_mnms2(subjects, rng, shift)
    mnms2, duplicate = _plant_duplicate(mnms, mnms2, rng)
    return acdc + mnms + mnms2, duplicate
