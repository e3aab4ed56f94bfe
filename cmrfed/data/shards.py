"""The prepared-data contract: HDF5 shards per client and ``manifest.json`` (docs/pipeline.md).

``prepare`` writes them; training and evaluation read them only through ``load_manifest``,
``verify_shard`` and ``load_split``, so the on-disk format is known in this one module.

Shard layout (``format_version`` 2): root attrs ``format_version``, ``client``, ``spacing``,
``shape``, ``normalisation``, ``cmrfed_version``; one group ``/subjects/<subject_id>`` per subject
with dataset ``image`` (2, x, y, z) uint8 (ED, ES; ``floor(255 v)`` of each volume rescaled to
[0, 1], as CineMA stores them; x, y at most ``shape``, z every slice) and the subject's attrs.
:func:`load_split` turns them into model inputs (:func:`cmrfed.data.model_input.model_input`).
Format 1 (float32, padded and cropped to ``shape``) is refused: re-run ``cmrfed prepare``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cmrfed import __version__
from cmrfed.atomic import sha256_file, write_json
from cmrfed.data.model_input import model_input
from cmrfed.errors import DataError, UsageError
from cmrfed.outputs import MANIFEST_KIND
from cmrfed.paths import manifest_path, shard_path

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("test", "val")
"""The splits a model is scored on (``evaluate --split``); train is what it learnt from."""
SUBJECTS_GROUP = "subjects"
IMAGE_DATASET = "image"
_RERUN = "re-run `cmrfed prepare`"
# one chunk per channel; gzip level 1 stores 26 % of the bytes, level 4 only 25.6 % but 30 % slower
_IMAGE_STORAGE: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


@dataclass(frozen=True)
class ShardEntry:
    """One subject to write: its id, its attrs (str / int / float / sequences) and the file
    holding its image (written by :func:`write_image_file`)."""

    subject_id: str
    attrs: dict[str, Any]
    image_file: Path


@dataclass(frozen=True)
class ManifestSubject:
    subject_id: str
    dataset: str
    client: str
    split: str
    label: int
    pathology: str
    vendor: str


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` as the later stages need it; ``raw`` keeps everything else it records."""

    path: Path
    sha256: str
    format_version: int
    clients: tuple[str, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    seed: int
    subjects: tuple[ManifestSubject, ...]
    shard_sha256: dict[str, str]
    raw: dict[str, Any]


@dataclass(frozen=True)
class SplitArrays:
    """One client's split in sorted subject order: labels (n,) per subject, and the model inputs
    (rows, 2, X, Y, Z) float32, one row per z window; ``window_subject`` (rows,) gives each row's
    subject index. A subject of at most Z slices has one window, so when every subject does,
    rows are subjects (``single_window``)."""

    subject_ids: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    window_subject: np.ndarray

    @property
    def single_window(self) -> bool:
        return len(self.window_subject) == len(self.subject_ids)


def _attr_value(value: Any) -> Any:
    """h5py-storable form: strings as UTF-8 str, sequences of str as a string array."""
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    if isinstance(value, list | tuple):
        return np.asarray(value)
    return value


def _create_image(group: h5py.Group, shape: tuple[int, ...]) -> h5py.Dataset:
    return group.create_dataset(IMAGE_DATASET, shape=shape, dtype=np.uint8,
                                chunks=(1, *shape[1:]), **_IMAGE_STORAGE)


def write_image_file(path: Path, image: np.ndarray) -> None:
    """One subject's (2, x, y, z) uint8 image alone in a small HDF5 file, compressed as in a shard.

    Workers write these so that compression runs in parallel; :func:`write_shard` then copies
    the compressed chunks as they are, without decompressing or compressing again.
    """
    with h5py.File(path, "w") as handle:
        if image.dtype != np.uint8:
            raise TypeError(f"shard images are uint8, got {image.dtype}")
        _create_image(handle, image.shape)[...] = image


def _copy_image(source: Path, group: h5py.Group) -> None:
    with h5py.File(source, "r") as handle:
        image = handle[IMAGE_DATASET]
        target = _create_image(group, image.shape)
        for channel in range(image.shape[0]):
            offset = (channel, *([0] * (image.ndim - 1)))
            filter_mask, chunk = image.id.read_direct_chunk(offset)
            target.id.write_direct_chunk(offset, chunk, filter_mask)


def write_shard(path: Path, client: str, params: dict[str, Any], entries: Iterable[ShardEntry]) -> int:
    """Write one client's shard; entries are written in the order given. Returns their number.

    The file's bytes depend only on the entries and their order (h5py tracks no times by
    default), so the same inputs give the same shard checksum.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with h5py.File(path, "w") as shard:
        shard.attrs["format_version"] = FORMAT_VERSION
        shard.attrs["client"] = client
        shard.attrs["cmrfed_version"] = __version__
        for key, value in params.items():
            shard.attrs[key] = _attr_value(value)
        subjects = shard.create_group(SUBJECTS_GROUP)
        for entry in entries:
            group = subjects.create_group(entry.subject_id)
            _copy_image(entry.image_file, group)
            for key, value in entry.attrs.items():
                group.attrs[key] = _attr_value(value)
            count += 1
    return count


def write_manifest(prepared: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (with its kind and format version) atomically."""
    path = manifest_path(prepared)
    write_json(path, {"kind": MANIFEST_KIND, "format_version": FORMAT_VERSION, **manifest})
    return path


def load_manifest(prepared: Path) -> Manifest:
    """Read and check ``PREPARED/manifest.json``; a missing or foreign file is a DataError."""
    path = manifest_path(prepared)
    if not path.is_file():
        raise DataError(f"{prepared}: no manifest.json; run `cmrfed prepare` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON manifest ({exc}); {_RERUN}") from exc
    if not isinstance(raw, dict) or raw.get("kind") != MANIFEST_KIND:
        raise DataError(f"{path}: not a cmrfed prepared-data manifest; point to a `cmrfed prepare` output")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: manifest format {raw.get('format_version')} but this cmrfed reads"
            f" {FORMAT_VERSION}; {_RERUN}"
        )
    try:
        options = raw["options"]
        subjects = tuple(
            ManifestSubject(
                subject_id=s["subject_id"], dataset=s["dataset"], client=s["client"], split=s["split"],
                label=int(s["label"]), pathology=s["pathology"], vendor=s["vendor"],
            )
            for s in raw["subjects"]
        )
        return Manifest(
            path=path,
            sha256=sha256_file(path),
            format_version=int(raw["format_version"]),
            clients=tuple(raw["clients"]),
            shape=tuple(int(v) for v in options["shape"]),
            spacing=tuple(float(v) for v in options["spacing"]),
            seed=int(options["seed"]),
            subjects=subjects,
            shard_sha256={client: entry["sha256"] for client, entry in raw["shards"].items()},
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: manifest lacks or mangles {exc}; {_RERUN}") from exc


def verify_shard(prepared: Path, manifest: Manifest, client: str) -> Path:
    """The client's shard path, after checking it exists and matches the manifest's sha256."""
    if client not in manifest.shard_sha256:
        raise DataError(f"{manifest.path}: no shard for client {client!r} (has {list(manifest.clients)})")
    path = shard_path(prepared, client)
    if not path.is_file():
        raise DataError(f"{path}: shard missing; {_RERUN}")
    if sha256_file(path) != manifest.shard_sha256[client]:
        raise DataError(f"{path}: sha256 differs from manifest.json (changed since prepared); {_RERUN}")
    return path


def _read_split(prepared: Path, client: str, split: str, with_labels: bool,
                ) -> tuple[list[str], list[np.ndarray], np.ndarray | None, tuple[int, ...]]:
    """The subject ids of ``client``'s ``split`` (sorted), each subject's model-input windows, their
    labels only ``with_labels`` (no other attribute than ``split`` is read otherwise), the shape."""
    if split not in SPLITS:
        raise UsageError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = shard_path(prepared, client)
    if not path.is_file():
        raise DataError(f"{path}: shard missing; {_RERUN}")
    labels = None
    try:
        with h5py.File(path, "r") as shard:
            version = shard.attrs.get("format_version")
            if version != FORMAT_VERSION:
                raise DataError(
                    f"{path}: shard format {version} but this cmrfed reads {FORMAT_VERSION}"
                    f" (uint8 images, preprocessed as CineMA does); {_RERUN}"
                )
            shape = tuple(int(v) for v in shard.attrs["shape"])
            subjects = shard[SUBJECTS_GROUP]
            chosen = sorted(name for name in subjects if subjects[name].attrs["split"] == split)
            windows = [model_input(subjects[name][IMAGE_DATASET][()], shape) for name in chosen]
            if with_labels:
                labels = np.array([int(subjects[name].attrs["label"]) for name in chosen], dtype=np.int64)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc}); {_RERUN}") from exc
    return chosen, windows, labels, shape


def _stack(windows: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(windows) if windows else np.empty((0, 2, *shape), dtype=np.float32)


def load_split(prepared: Path, client: str, split: str) -> SplitArrays:
    """All subjects of ``client`` in ``split``, sorted by subject_id, as model inputs."""
    chosen, windows, labels, shape = _read_split(prepared, client, split, with_labels=True)
    assert labels is not None
    window_subject = np.repeat(np.arange(len(chosen)), [len(w) for w in windows]).astype(np.int64)
    return SplitArrays(subject_ids=tuple(chosen), images=_stack(windows, shape), labels=labels,
                       window_subject=window_subject)


def load_images(prepared: Path, client: str, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(subject id of each row, model inputs (rows, 2, X, Y, Z)) of ``client``'s ``split``, sorted
    by subject_id, one row per z window as :func:`load_split` makes them.

    Images only: no label or other subject attribute is read but ``split`` (self-supervised
    pretraining must never see a label).
    """
    chosen, windows, _, shape = _read_split(prepared, client, split, with_labels=False)
    ids = tuple(name for name, w in zip(chosen, windows, strict=True) for _ in range(len(w)))
    return ids, _stack(windows, shape)
