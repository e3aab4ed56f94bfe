"""A synthetic multi-vendor cine CMR cohort, written in the exact on-disk layouts of the downloads.

Why it exists: ACDC, M&Ms-1 and M&Ms-2 may not be shipped (they hold per-subject health data), yet
every stage must run end to end without them. ``write_synthetic_cohort`` writes three trees that
copy the downloaded layouts and their header quirks (see the dataset reference notes), filled with
cine short-axis phantoms whose anatomy and motion carry the disease label, and whose appearance
carries the scanner vendor, so the four vendor clients are non-IID the way real sites are.

The layouts and label numbers here are written from the reference notes, deliberately not read
from ``data_manifests/``: the readers use those tables, and a test on synthetic trees only proves
something if the two sides were written independently.

The work is split along its seams: who is in the cohort (cmrfed/data/synth_plan.py), how a
subject's heart and scanner look (cmrfed/data/synth_phantom.py) and how a subject is written in
its dataset's layout (cmrfed/data/synth_writers.py). This module puts them together and keeps the
public names of all three importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.table import Table

from cmrfed import paths
from cmrfed.atomic import write_json
from cmrfed.data.synth_dial import (
    OPTION_NAMES,
    REALISTIC,
    Heterogeneity,
    apply_concept_shift,
    dial_record,
    looks_at,
)
from cmrfed.data.synth_phantom import (
    ARCHETYPES,
    LOOKS,
    Archetype,
    ScannerLook,
    _render_subject,
    contraction_curve,
)
from cmrfed.data.synth_plan import (
    ARCHETYPE_OF,
    DATASETS,
    MAX_FRAMES,
    MAX_SUBJECTS,
    MIN_FRAMES,
    MIN_IN_PLANE,
    MIN_SLICES,
    MIN_SUBJECTS,
    NORMAL,
    DuplicatePair,
    SynthSubject,
    SynthSummary,
    _label,
    _Planned,
    label_shift,
    plan_cohort,
    read_synth_summary,
)
from cmrfed.data.synth_writers import (
    LABEL_NUMBERS,
    _write_acdc,
    _write_mnms,
    _write_mnms2,
    _write_mnms2_csv,
    _write_mnms_csv,
)
from cmrfed.errors import UsageError
from cmrfed.lock import folder_lock
from cmrfed.outputs import COHORT, new_output
from cmrfed.provenance import versions

__all__ = [
    "ARCHETYPES", "ARCHETYPE_OF", "DATASETS", "LABEL_NUMBERS", "LOOKS", "MAX_SUBJECTS", "MIN_SUBJECTS",
    "NORMAL", "REALISTIC", "Archetype", "DuplicatePair", "Heterogeneity", "ScannerLook", "SynthSubject",
    "SynthSummary", "cohort_table", "contraction_curve", "plan_cohort", "read_synth_summary",
    "write_synthetic_cohort",
]

_WRITERS = {"acdc": _write_acdc, "mnms": _write_mnms, "mnms2": _write_mnms2}
_WORKERS = min(4, os.cpu_count() or 1)  # numpy and zlib release the GIL: threads overlap


def _write_subject(root: Path, seed: int, planned: _Planned, shape: tuple[int, int, int],
                   frames: int | None, looks: dict[str, ScannerLook]) -> tuple[int, int]:
    """Render and write one subject; return its 0-based ED and ES indices (for the CSVs)."""
    dataset = planned.subject.dataset
    rendered = _render_subject(seed, planned, shape, frames, long_axis=dataset == "mnms2", looks=looks)
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
                           overwrite: bool = False, dial: Heterogeneity | None = None) -> SynthSummary:
    """Write the ACDC, M&Ms-1 and M&Ms-2 trees of a synthetic cohort under ``out``, atomically.

    ``subjects`` is per dataset; ``shape`` is the nominal matrix (each vendor's protocol scales it
    and changes the slice count); ``frames`` fixes the cine length (default: per vendor); ``dial``
    sets how far the sites differ (cmrfed/data/synth_dial.py; default: today's cohort). The
    same seed and dial give byte-identical files. An existing ``out`` is refused unless ``overwrite``.
    """
    _check_options(seed, subjects, shape, frames)
    dial = dial or Heterogeneity()
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    planned, duplicate = plan_cohort(seed, subjects, dial.label_shift)
    planned, relabelled = apply_concept_shift(planned, seed, dial.concept_shift)
    looks = looks_at(dial.appearance)
    record = dial_record(dial, label_shift(subjects, dial.label_shift).pooled, looks, relabelled)
    summary = SynthSummary(Path(out), seed, subjects, shape,
                           tuple(p.subject for p in planned), duplicate, record)
    with folder_lock(out), new_output(out, COHORT, overwrite) as tmp:
        # Each subject renders from its own random streams, so the worker order changes nothing.
        with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            frames_of = list(pool.map(lambda entry: _write_subject(tmp, seed, entry, shape, frames, looks),
                                      planned))
        mnms_rows = [(entry, ed, es) for entry, (ed, es) in zip(planned, frames_of, strict=True)
                     if entry.subject.dataset == "mnms"]
        _write_mnms_csv(tmp, mnms_rows)
        _write_mnms2_csv(tmp, [p for p in planned if p.subject.dataset == "mnms2"])
        write_json(paths.synth_summary_path(tmp),
                   summary.to_json() | {"options": {"seed": seed, "subjects": subjects,
                                                    "shape": list(shape), "frames": frames}
                                                   | dial.to_dict(),
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
    if summary.heterogeneity:
        caption += "; dial: " + ", ".join(f"{name.replace('_', ' ')} {summary.heterogeneity[name]:g}"
                                          for name in OPTION_NAMES)
    if summary.duplicate:
        caption += (f"; planted duplicate: M&Ms-1 {summary.duplicate.mnms} = M&Ms-2 "
                    f"{summary.duplicate.mnms2} ({summary.duplicate.client})")
    table.caption = caption
    return table
