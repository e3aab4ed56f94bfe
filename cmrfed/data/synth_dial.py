"""The heterogeneity dial of the synthetic cohort: three independent knobs, how far its sites differ.

Why: personalised federated methods pay only where sites differ, and differ in a way a shared
model cannot absorb. Each knob has a physical meaning; 0 makes the sites alike in that respect,
larger values make them differ more.

- ``appearance``: each vendor's image chain (field of view, matrix and slice coverage, i.e. the
  resolution; cine frames; intensity transfer curve; gain; noise, i.e. SNR; coil bias field;
  myocardium/blood contrast) is ``(1 - a) * common + a * vendor``, the common chain being the mean
  of the four vendors'. 1 is today's vendor profiles; above 1 the vendors are pushed apart
  (clipped to physical ranges).
- ``label_shift``: each site's normal/abnormal mix moves from the pooled mix of the cohort (0) to
  today's per-vendor mixes (1) and beyond (cmrfed/data/synth_plan.py, :class:`LabelShift`).
- ``concept_shift``: sites draw the abnormal boundary at their own cut-off on a phenotype, as
  centres apply different diagnostic criteria. The phenotype is the ED LV wall thickness of the
  rendered heart; the common cut-off is :data:`REFERENCE_CUTOFF_MM` and site ``k`` uses
  ``REFERENCE_CUTOFF_MM + c * CUTOFF_OFFSET_MM[k]``. Only subjects whose diagnosis is judged on
  the wall (normal, hypertrophic, hypertensive, athlete's hearts) and whose wall lies between the
  two cut-offs are called differently: a lenient site (lower cut-off) calls them abnormal, a strict
  one (higher cut-off) normal. The heart and its images stay the same; only the written diagnosis
  changes. At 0 every site uses the common rule, the diagnosis itself.

Today's cohort labels every site by diagnosis, i.e. concept shift 0, so the defaults, which write
today's cohort byte for byte, are appearance 1, label shift 1, concept shift 0. The realistic
vendor profile (:data:`REALISTIC`) adds the criteria spread of concept shift 1.

Every draw stays on the subjects' own seeded streams: the knobs change values, never the number
or order of random draws, so a cohort is a function of the seed and the three levels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cmrfed.data.synth_phantom import LOOKS, ScannerLook, wall_thickness_mm
from cmrfed.data.synth_plan import NORMAL, _label, _Planned
from cmrfed.errors import UsageError

MAX_LEVEL = 5.0
REFERENCE_CUTOFF_MM = 12.0  # the common wall-thickness cut-off of LV hypertrophy
# Each site's departure from it at concept shift 1 (mm): Siemens and GE sites call thinner walls
# hypertrophic (from 10.5 and 11 mm), Philips and Canon sites only thicker ones (13.5 mm, and the
# classic 15 mm of hypertrophic cardiomyopathy). Normal walls here are 8 +- 0.8 mm, hypertensive
# ones 11 +- 1 mm, hypertrophic ones 15 +- 2 mm (synth_phantom.ARCHETYPES).
CUTOFF_OFFSET_MM = {"siemens": -1.5, "ge": -1.0, "philips": 1.5, "canon": 3.0}
WALL_JUDGED = frozenset({"normal", "hypertrophic", "hypertensive", "athlete"})
HYPERTROPHY_CODE = "HCM"  # the code every dataset has for a thick-walled heart
OPTION_NAMES = {"appearance": "--appearance", "label_shift": "--label-shift",
                "concept_shift": "--concept-shift"}


@dataclass(frozen=True)
class Heterogeneity:
    """The three knobs (module docstring); the defaults write today's cohort."""

    appearance: float = 1.0
    label_shift: float = 1.0
    concept_shift: float = 0.0

    def __post_init__(self) -> None:
        for name, option in OPTION_NAMES.items():
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= MAX_LEVEL):
                raise UsageError(f"{option} takes a number from 0 (sites alike) to {MAX_LEVEL:g}, "
                                 f"got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in OPTION_NAMES}


REALISTIC = Heterogeneity(appearance=1.0, label_shift=1.0, concept_shift=1.0)
"""Today's vendor image chains and label mixes, and centres' criteria one offset apart."""


# --- appearance ---------------------------------------------------------------------------------

# Physical floors (and ceilings) for a look pushed beyond today's vendors.
_LOOK_BOUNDS: dict[str, tuple[float, float]] = {
    "fov_mm": (80.0, 400.0), "matrix_scale": (0.5, 2.0), "coverage_mm": (50.0, 160.0),
    "slice_offset": (-3, 3), "frames": (6, 60), "gamma": (0.3, 3.0), "gain": (100.0, 30000.0),
    "noise": (0.005, 0.3), "bias": (0.0, 1.0), "myocardium": (0.1, 0.6),
}


def _blend(common: float, vendor: float, level: float, bounds: tuple[float, float]) -> float:
    """``(1 - level) * common + level * vendor`` (exactly ``vendor`` at 1), within ``bounds``."""
    return min(max((1.0 - level) * common + level * vendor, bounds[0]), bounds[1])


def _common_look() -> ScannerLook:
    """The mean of the vendors' looks: the image chain every site has at appearance 0."""
    values: dict[str, Any] = {}
    for spec in fields(ScannerLook):
        per_vendor = [getattr(look, spec.name) for look in LOOKS.values()]
        if isinstance(per_vendor[0], tuple):
            values[spec.name] = tuple(sum(v[i] for v in per_vendor) / len(per_vendor)
                                      for i in range(len(per_vendor[0])))
        else:
            values[spec.name] = sum(per_vendor) / len(per_vendor)
    return ScannerLook(**values)


COMMON_LOOK = _common_look()


_INTEGER_FIELDS = frozenset({"slice_offset", "frames"})


def look_at(client: str, level: float) -> ScannerLook:
    """``client``'s scanner look at appearance ``level``; slice offset and frames rounded."""
    vendor = LOOKS[client]
    values: dict[str, Any] = {}
    for spec in fields(ScannerLook):
        bounds = _LOOK_BOUNDS[spec.name]
        common, own = getattr(COMMON_LOOK, spec.name), getattr(vendor, spec.name)
        pairs = zip(common, own, strict=True) if isinstance(own, tuple) else [(common, own)]
        blended = [_blend(c, v, level, bounds) for c, v in pairs]
        if spec.name in _INTEGER_FIELDS:
            blended = [round(b) for b in blended]
        values[spec.name] = tuple(blended) if isinstance(own, tuple) else blended[0]
    low, high = values["frames"]
    values["frames"] = (low, max(low, high))
    return ScannerLook(**values)


def looks_at(level: float) -> dict[str, ScannerLook]:
    """Every client's look at appearance ``level`` (today's ``LOOKS`` at 1)."""
    return {client: look_at(client, level) for client in LOOKS}


# --- concept shift --------------------------------------------------------------------------------


def site_cutoff_mm(client: str, level: float) -> float:
    """The wall thickness from which ``client`` calls a heart hypertrophic, at concept shift ``level``."""
    return REFERENCE_CUTOFF_MM + level * CUTOFF_OFFSET_MM[client]


def site_call(label: int, wall_mm: float, cutoff_mm: float) -> int:
    """A site's binary call on a wall-judged heart: the common call, except between the common
    cut-off and the site's own, where a lenient site calls it abnormal and a strict one normal."""
    low, high = sorted((REFERENCE_CUTOFF_MM, cutoff_mm))
    if low <= wall_mm < high:
        return 1 if cutoff_mm < REFERENCE_CUTOFF_MM else 0
    return label


def apply_concept_shift(planned: list[_Planned], seed: int, level: float
                        ) -> tuple[list[_Planned], list[dict[str, Any]]]:
    """Each subject as its own site calls it at concept shift ``level``, and a record of every
    subject whose diagnosis changed (its wall, the site's cut-off, the code before and after)."""
    out: list[_Planned] = []
    changed: list[dict[str, Any]] = []
    for entry in planned:
        subject = entry.subject
        if entry.archetype not in WALL_JUDGED:
            out.append(entry)
            continue
        wall = wall_thickness_mm(seed, entry)
        cutoff = site_cutoff_mm(subject.client, level)
        call = site_call(subject.label, wall, cutoff)
        if call == subject.label:
            out.append(entry)
            continue
        code = HYPERTROPHY_CODE if call else NORMAL
        assert _label(code) == call
        out.append(replace(entry, subject=replace(subject, pathology=code, label=call)))
        changed.append({"dataset": subject.dataset, "subject_id": subject.subject_id,
                        "client": subject.client, "diagnosis": subject.pathology, "written": code,
                        "wall_mm": round(wall, 3), "cutoff_mm": round(cutoff, 3)})
    return out, changed


def dial_record(dial: Heterogeneity, pooled_normal_share: float, looks: dict[str, ScannerLook],
                relabelled: list[dict[str, Any]]) -> dict[str, Any]:
    """What the cohort summary records of the dial: the levels and what they made of each site."""
    return dial.to_dict() | {
        "pooled_normal_share": round(pooled_normal_share, 6),
        "looks": {client: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(look).items()}
                  for client, look in looks.items()},
        "reference_cutoff_mm": REFERENCE_CUTOFF_MM,
        "cutoffs_mm": {client: site_cutoff_mm(client, dial.concept_shift) for client in LOOKS},
        "relabelled": relabelled,
    }
