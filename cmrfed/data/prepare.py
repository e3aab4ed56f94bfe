"""The ``cmrfed prepare`` stage: dataset trees as downloaded -> per-client shards + manifest.json.

Each subject is read as its dataset lays it out (:mod:`cmrfed.data.layouts`), preprocessed by
CineMA's rules (:mod:`cmrfed.data.preprocess`: identical to CineMA's preprocessing where an LV
label exists at ED; a label-free crop centre of cmrfed's own where not), fingerprinted so that
a scan present in two datasets is found and kept in one split, and assigned a split per client,
stratified by label and seeded.
The whole output folder is built under a temporary name and renamed at the end
(:func:`cmrfed.atomic.atomic_dir`): a failure leaves nothing behind, an old output stays intact.

Results never depend on ``workers``: each subject is processed by a pure function, results are
consumed in subject order, and every random choice comes from the seed.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cmrfed.atomic import atomic_dir, sha256_file
from cmrfed.data.csvsite import scan_csv
from cmrfed.data.layouts import DatasetScan, Invalid, Subject, read_subject, scan_dataset
from cmrfed.data.preprocess import NORMALISATION, fingerprint, preprocess
from cmrfed.data.shards import SPLITS, ShardEntry, write_image_file, write_manifest, write_shard
from cmrfed.data.tables import DATASETS, Tables, load_tables
from cmrfed.errors import DataError, UsageError
from cmrfed.lock import folder_lock
from cmrfed.outputs import PREPARED, check_replaceable
from cmrfed.paths import SHARDS_DIR, shard_path
from cmrfed.provenance import versions

DUPLICATE_SIMILARITY = 0.999  # cosine of ED fingerprints above which two subjects are one scan
LABEL_NAMES = {0: "normal", 1: "abnormal"}
_SCRATCH = ".scratch"

Triple = tuple[float, float, float]
Shape = tuple[int, int, int]


@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``cmrfed prepare`` was asked to do; recorded in the manifest."""

    out: Path
    acdc: Path | None = None
    mnms: Path | None = None
    mnms2: Path | None = None
    csv: tuple[Path, ...] = ()  # site CSVs (cmrfed.data.csvsite)
    spacing: Triple = (1.0, 1.0, 10.0)
    shape: Shape = (192, 192, 16)
    split: Triple = (0.6, 0.2, 0.2)
    seed: int = 0
    workers: int = 1
    skip_invalid: bool = False
    overwrite: bool = False
    tables: Path | None = None

    def inputs(self) -> dict[str, Path]:
        given = {"acdc": self.acdc, "mnms": self.mnms, "mnms2": self.mnms2}
        return {name: Path(given[name]) for name in DATASETS if given[name] is not None}


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class _Outcome:
    """What a worker sends back: attrs and fingerprint of a subject (image left in scratch), or why not."""

    subject_id: str
    error: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    fingerprint: np.ndarray | None = None
    warnings: tuple[str, ...] = ()


def parse_split(text: str) -> Triple:
    """``0.6,0.2,0.2`` -> fractions of train, val, test (non-negative, summing to 1)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"--split {text!r}: takes three fractions like 0.6,0.2,0.2") from exc
    _check_split(values)
    return values  # type: ignore[return-value]


def _check_split(values: tuple[float, ...]) -> None:
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6 or values[0] == 0:
        raise UsageError(f"--split {values}: three non-negative fractions summing to 1, train > 0")


# ----------------------------------------------------------------------------- per subject


def _scratch_file(scratch: Path, subject_id: str) -> Path:
    return scratch / f"{subject_id}.h5"


def _process(subject: Subject, spacing: Triple, shape: Shape, scratch: Path) -> _Outcome:
    """Read, preprocess and stash one subject; a DataError becomes an outcome, not a crash."""
    try:
        frames = read_subject(subject)
        result = preprocess(frames, subject.lv_label, spacing, shape)
    except DataError as exc:
        return _Outcome(subject.subject_id, error=str(exc))
    write_image_file(_scratch_file(scratch, subject.subject_id), result.image)
    attrs = {
        "dataset": subject.dataset,
        "vendor": subject.vendor,
        "pathology": subject.pathology,
        "label": subject.label,
        "original_spacing": list(frames.spacing),
        "original_shape": list(frames.ed.shape),
        "source": subject.ed.image.parent.relative_to(subject.base).as_posix(),
        "source_files": [path for path, _ in frames.sources],
        "source_sha256": [digest for _, digest in frames.sources],
        "ed_frame": -1 if frames.ed_index is None else frames.ed_index,
        "es_frame": -1 if frames.es_index is None else frames.es_index,
        "centre_from": result.centre_from,
        "crop_start": list(result.crop_start),
        "n_slices": int(result.image.shape[3]),
        **dict(subject.attrs),
    }
    warnings = frames.warnings + tuple(f"{subject.subject_id}: {w}" for w in result.warnings)
    return _Outcome(subject.subject_id, attrs=attrs, fingerprint=fingerprint(result.image), warnings=warnings)


def _single_threaded_itk() -> None:
    """Worker initialiser: parallelism comes from the processes; ITK's own thread pool in every
    worker would only oversubscribe the cores (the images are small)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_all(subjects: Sequence[Subject], work: Callable[[Subject], _Outcome], workers: int,
             console: Console) -> Iterator[_Outcome]:
    """Outcomes in subject order (whatever ``workers``), with a progress bar."""
    columns = (TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("subjects", total=len(subjects))
        if workers == 1:
            for subject in subjects:
                yield work(subject)
                progress.advance(task)
            return
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_single_threaded_itk)
        try:
            for outcome in pool.map(work, subjects):
                yield outcome
                progress.advance(task)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- across subjects


def find_duplicates(subject_ids: Sequence[str], prints: np.ndarray,
                    threshold: float = DUPLICATE_SIMILARITY) -> list[tuple[str, ...]]:
    """Groups (sorted, size > 1) of subjects whose fingerprints are near identical."""
    parent = list(range(len(subject_ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(subject_ids) > 1:
        similar = np.argwhere(np.triu(prints @ prints.T, k=1) > threshold)
        for i, j in similar:
            parent[root(int(j))] = root(int(i))
    groups: dict[int, list[str]] = {}
    for index, subject_id in enumerate(subject_ids):
        groups.setdefault(root(index), []).append(subject_id)
    return sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)


def split_counts(n: int, fractions: Triple) -> tuple[int, int, int]:
    """Largest-remainder apportionment of ``n`` units to train/val/test (ties: earlier split)."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(e + 1e-9)) for e in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def assign_splits(units: dict[str, list[tuple[tuple[str, ...], int]]], fractions: Triple,
                  seed: int) -> dict[str, str]:
    """subject_id -> split, per client and label stratum, seeded; a unit's members share a split.

    ``units`` maps client -> [(member subject_ids, label)]. Each (client, label) stratum has its
    own generator derived from the seed, so adding data to one client never reshuffles another.
    """
    split_of: dict[str, str] = {}
    for client, client_units in units.items():
        for label in sorted({label for _, label in client_units}):
            stratum = sorted(members for members, lab in client_units if lab == label)
            rng = np.random.default_rng([seed, _stable_int(client), label])
            order = rng.permutation(len(stratum))
            n_train, n_val, _ = split_counts(len(stratum), fractions)
            for rank, index in enumerate(order):
                split = SPLITS[0] if rank < n_train else SPLITS[1] if rank < n_train + n_val else SPLITS[2]
                for member in stratum[index]:
                    split_of[member] = split
    return split_of


def count_table(
    subjects: Sequence[dict[str, Any]], clients: Sequence[str]
) -> dict[str, dict[str, dict[str, int]]]:
    """{client: {split: {"0": n, "1": n}}} with every split and label present."""
    counts = {c: {s: {str(k): 0 for k in LABEL_NAMES} for s in SPLITS} for c in clients}
    for subject in subjects:
        counts[subject["client"]][subject["split"]][str(subject["label"])] += 1
    return counts


# ----------------------------------------------------------------------------- the stage


def _scan_inputs(options: PrepareOptions, tables: Tables) -> tuple[list[DatasetScan], list[Invalid]]:
    scans = [scan_dataset(name, path, tables) for name, path in options.inputs().items()]
    scans += [scan_csv(Path(path), tables) for path in options.csv]
    invalid = [item for scan in scans for item in scan.invalid]
    seen: dict[str, Subject] = {}
    kept = []
    for scan in scans:  # one subject id twice (two CSVs list it, or a CSV site named like a dataset)
        unique = []
        for subject in scan.subjects:
            first = seen.setdefault(subject.subject_id, subject)
            if first is subject:
                unique.append(subject)
            else:
                where, before = subject.row or subject.frames_from, first.row or first.frames_from
                invalid.append(Invalid(subject.subject_id, f"{where}: duplicate subject"
                                       f" {subject.subject_id}, already given by {before}"))
        kept.append(replace(scan, subjects=tuple(unique)))
    return kept, invalid


def _input_record(scans: Sequence[DatasetScan]) -> dict[str, Any]:
    """Where each input was read, per dataset; site CSVs as a list, with their sha256."""
    record: dict[str, Any] = {}
    for scan in scans:
        entry = {"given": str(scan.given.resolve()), "root": str(scan.root.resolve()), **scan.record}
        if scan.dataset in DATASETS:
            record[scan.dataset] = entry
        else:
            record.setdefault(scan.dataset, []).append(entry)
    return record


def _check_options(options: PrepareOptions) -> None:
    if not options.inputs() and not options.csv:
        raise UsageError("give at least one of --acdc, --mnms, --mnms2, --csv")
    if options.workers < 1:
        raise UsageError(f"--workers {options.workers}: must be at least 1")
    _check_split(tuple(options.split))


def _place(subjects: Sequence[Subject], duplicates: Sequence[tuple[str, ...]], options: PrepareOptions,
           warnings: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Client and split of every subject; a duplicate group follows its first member's client."""
    by_id = {s.subject_id: s for s in subjects}
    client_of = {s.subject_id: s.client for s in subjects}
    units: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    grouped = {member for group in duplicates for member in group}
    for group in duplicates:
        keeper = by_id[group[0]]
        for member in group[1:]:
            if client_of[member] != keeper.client:
                warnings.append(f"{member}: duplicate of {keeper.subject_id}; moved from client"
                                f" {client_of[member]} to {keeper.client} to keep them together")
                client_of[member] = keeper.client
        units.setdefault(keeper.client, []).append((group, keeper.label))
    for subject in subjects:
        if subject.subject_id not in grouped:
            units.setdefault(subject.client, []).append(((subject.subject_id,), subject.label))
    return client_of, assign_splits(units, options.split, options.seed)


def _preprocessing_params(options: PrepareOptions) -> dict[str, Any]:
    """How every image was made; stored in each shard's root attrs and in the manifest."""
    return {
        "spacing": list(options.spacing),
        "shape": list(options.shape),
        "normalisation": NORMALISATION,
        "channels": ["ED", "ES"],
        "axes": "X, Y, Z = ITK index order (numpy array of SimpleITK transposed)",
        "interpolation": "image linear, labels nearest (SimpleITK), pixel type kept",
        "resampling": "size round(n*s/t) half to even; origin + 0.5*(t-s) per world axis",
        "crop": "in-plane around the ED LV bounding box, start ceil((min+max)/2 - want/2),"
                " kept in bounds; no crop in z; padded at the end at load",
        "storage": "uint8 floor(255 v) per ED/ES",
    }


def prepare(options: PrepareOptions, console: Console | None = None) -> PrepareResult:
    """Run the stage; see the module docstring. Raises DataError / UsageError on bad input.

    The PREPARED folder is locked for the whole stage (:mod:`cmrfed.lock`)."""
    with folder_lock(options.out):
        return _prepare(options, console)


def _prepare(options: PrepareOptions, console: Console | None = None) -> PrepareResult:
    console = console or Console()
    _check_options(options)
    check_replaceable(Path(options.out), PREPARED, options.overwrite)  # before hours of work
    tables = load_tables(options.tables)
    scans, invalid = _scan_inputs(options, tables)
    if invalid and not options.skip_invalid:
        raise DataError(f"{invalid[0].reason} (--skip-invalid leaves such subjects out)")
    subjects = sorted((s for scan in scans for s in scan.subjects), key=lambda s: s.subject_id)
    by_id = {s.subject_id: s for s in subjects}
    skipped = list(invalid)
    warnings = [w for scan in scans for w in scan.warnings]

    with atomic_dir(options.out, overwrite=options.overwrite, kind=PREPARED) as tmp:
        scratch = tmp / _SCRATCH
        scratch.mkdir()
        work = functools.partial(_process, spacing=options.spacing, shape=options.shape, scratch=scratch)
        done: list[_Outcome] = []
        with contextlib.closing(_run_all(subjects, work, options.workers, console)) as outcomes:
            for outcome in outcomes:
                if outcome.error is None:
                    done.append(outcome)
                    warnings.extend(outcome.warnings)
                elif options.skip_invalid:
                    skipped.append(Invalid(outcome.subject_id, outcome.error))
                else:
                    raise DataError(f"{outcome.error} (--skip-invalid leaves such subjects out)")
        if not done:
            raise DataError("no usable subject in the inputs; see the skipped reasons above")

        ids = [o.subject_id for o in done]
        duplicates = find_duplicates(ids, np.stack([o.fingerprint for o in done]))
        client_of, split_of = _place([by_id[i] for i in ids], duplicates, options, warnings)
        used = set(client_of.values())
        clients = [c for c in tables.clients if c in used] + sorted(used - set(tables.clients))
        params = _preprocessing_params(options)
        attrs_of = {o.subject_id: {**o.attrs, "split": split_of[o.subject_id]} for o in done}
        shards = {}
        for client in clients:
            members = [i for i in ids if client_of[i] == client]
            path = shard_path(tmp, client)
            write_shard(path, client, params,
                        (ShardEntry(i, attrs_of[i], _scratch_file(scratch, i)) for i in members))
            shards[client] = {"path": f"{SHARDS_DIR}/{path.name}", "sha256": sha256_file(path),
                              "subjects": len(members)}
        shutil.rmtree(scratch)

        listed = [
            {"subject_id": i, "dataset": by_id[i].dataset, "client": client_of[i], "split": split_of[i],
             "label": by_id[i].label, "pathology": by_id[i].pathology, "vendor": by_id[i].vendor,
             "sources": [[path, digest] for path, digest in zip(attrs_of[i]["source_files"],
                                                                 attrs_of[i]["source_sha256"], strict=True)]}
            for i in ids
        ]
        manifest = {
            "versions": versions(),
            "options": {
                "spacing": list(options.spacing), "shape": list(options.shape),
                "split": list(options.split), "seed": options.seed, "workers": options.workers,
                "skip_invalid": options.skip_invalid, "tables": tables.source,
            },
            "inputs": _input_record(scans),
            "preprocessing": params,
            "clients": clients,
            "subjects": listed,
            "counts": count_table(listed, clients),
            "shards": shards,
            "duplicates": [{"subjects": list(g), "client": client_of[g[0]], "split": split_of[g[0]]}
                           for g in duplicates],
            "skipped": [{"subject_id": s.subject_id, "reason": s.reason} for s in skipped],
            "warnings": warnings,
        }
        write_manifest(tmp, manifest)
    print_summary(manifest, console)
    return PrepareResult(out=Path(options.out), manifest=manifest)


def print_summary(manifest: dict[str, Any], console: Console) -> None:
    """The closing rich table of counts per client x split x label, then what needs attention."""
    table = Table(title="Prepared subjects per client (normal / abnormal)")
    table.add_column("client")
    for split in (*SPLITS, "total"):
        table.add_column(split, justify="right")
    for client, per_split in manifest["counts"].items():
        cells = [f"{per_split[s]['0']} / {per_split[s]['1']}" for s in SPLITS]
        normal = sum(per_split[s]["0"] for s in SPLITS)
        abnormal = sum(per_split[s]["1"] for s in SPLITS)
        table.add_row(client, *cells, f"{normal} / {abnormal}")
    console.print(table)
    for group in manifest["duplicates"]:
        console.print(f"duplicate scan: {', '.join(group['subjects'])} -> kept together in "
                      f"{group['client']} / {group['split']}", highlight=False)
    for item in manifest["skipped"]:
        console.print(f"[yellow]skipped[/] {item['subject_id']}: {item['reason']}", highlight=False)
    if manifest["warnings"]:
        console.print(f"{len(manifest['warnings'])} warning(s), listed in manifest.json; first:"
                      f" {manifest['warnings'][0]}", highlight=False)
