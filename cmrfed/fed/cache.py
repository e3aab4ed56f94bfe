"""Frozen-trunk feature cache.

With the last N of the encoder's blocks adapted, the conv stem, the first ``depth - N`` blocks
and the fusion's skip projections are a pure function of the image (the backbone is frozen and
has no stochastic layers at training time). We compute them once per subject and reuse them
across rounds, local epochs, methods and seeds; training then runs only the adapted blocks, the
fusion norm and the head.

A cache file is keyed by (backbone weights fingerprint, start block, input shape, storage dtype,
precision of the trunk's forward pass: :mod:`cmrfed.precision`) and records the sha256 of the
shard it was computed from: any change of key or shard makes a new file, and a stale file is
never read. Files are written atomically.

Augmentation: the trunk is just as much a pure function of an *augmented* image, so K seeded
augmented views of every training subject are cached too, in a file of their own keyed by the
plain key plus the augmentation recipe, K and the augmentation seed (:class:`ViewsKey`). The views
are seeded by (augmentation seed, client, subject, view), not by the run seed, so one views file
serves every method and every run seed of a study; validation and test use the plain features.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import torch
from torch import nn

from cmrfed.atomic import atomic_file
from cmrfed.data.augment import AugmentSpec, augment_batch
from cmrfed.data.shards import SPLITS, load_split
from cmrfed.errors import DataError
from cmrfed.fed.views import row_ids
from cmrfed.paths import feature_cache_dir
from cmrfed.precision import FP32, autocast

CACHE_FORMAT_VERSION = 1
T = TypeVar("T")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached features depend on."""

    backbone_fingerprint: str
    start_block: int
    input_shape: tuple[int, int, int]
    dtype: str
    precision: str = FP32  # the trunk runs under bf16 autocast or in float32

    def digest(self) -> str:
        parts = [CACHE_FORMAT_VERSION, self.backbone_fingerprint, self.start_block,
                 list(self.input_shape), self.dtype]
        if self.precision != FP32:  # fp32 keys keep the digest they had before --precision
            parts.append(self.precision)
        text = json.dumps(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ViewsKey:
    """What the cached augmented views depend on besides the plain key."""

    base: CacheKey
    augment: AugmentSpec
    n_views: int
    augment_seed: int

    def digest(self) -> str:
        text = json.dumps([self.base.digest(), "views", self.augment.to_dict(), self.n_views,
                           self.augment_seed])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CachedSplit:
    subject_ids: tuple[str, ...]
    labels: np.ndarray
    hidden: torch.Tensor  # (rows, 1 + N, D): tokens entering block ``start_block``
    skips: torch.Tensor  # (rows, N, D): summed fusion skip projections
    window_subject: np.ndarray  # (rows,): subject index of each z-window row (SplitArrays)


def cache_path(prepared: Path, key: CacheKey, client: str) -> Path:
    return feature_cache_dir(prepared) / key.digest() / f"{client}.h5"


def _to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """HDF5 has no bfloat16: store its bit pattern as uint16."""
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.uint16).numpy()
    return tensor.to(_TORCH_DTYPES[dtype]).numpy()


def _from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


@torch.no_grad()
def compute_trunks(
    encoder: nn.Module, images: np.ndarray, start_blocks: Sequence[int], device: torch.device,
    batch_size: int, precision: str = FP32,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run the frozen part of the encoder once for several start blocks: stem, skips and blocks
    ``[0, b)`` for each ``b`` of ``start_blocks``, each block run once. A start block's features are
    bit for bit those of a pass that stops there (the same blocks on the same tensors, in order)."""
    encoder.eval()
    starts = sorted(set(start_blocks))
    hidden: dict[int, list[torch.Tensor]] = {b: [] for b in starts}
    skips = []
    for begin in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[begin : begin + batch_size]).to(device, torch.float32)
        with autocast(precision, device):
            h, s = encoder.embed(batch)
            done = 0
            for start in starts:
                h = encoder.forward_blocks(h, done, start)
                done = start
                hidden[start].append(h.cpu())
        skips.append(s.cpu())
    skip = torch.cat(skips)
    return {b: (torch.cat(hidden[b]), skip) for b in starts}


def compute_trunk(
    encoder: nn.Module, images: np.ndarray, start_block: int, device: torch.device, batch_size: int,
    precision: str = FP32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen part of the encoder: stem, skips and blocks ``[0, start_block)``."""
    return compute_trunks(encoder, images, (start_block,), device, batch_size, precision)[start_block]


def _compute_splits(prepared: Path, client: str, encoder: nn.Module, keys: Sequence[CacheKey],
                    device: torch.device, batch_size: int) -> dict[int, dict[str, CachedSplit]]:
    """Every split of ``client`` through the trunk, for each key's start block (one pass)."""
    starts = sorted({k.start_block for k in keys})
    computed: dict[int, dict[str, CachedSplit]] = {b: {} for b in starts}
    for split in SPLITS:
        arrays = load_split(prepared, client, split)
        if len(arrays.subject_ids):
            trunks = compute_trunks(encoder, arrays.images, starts, device, batch_size, keys[0].precision)
        else:
            trunks = dict.fromkeys(starts, (torch.zeros(0), torch.zeros(0)))
        for start, (hidden, skips) in trunks.items():
            computed[start][split] = CachedSplit(arrays.subject_ids, arrays.labels, hidden, skips,
                                                 arrays.window_subject)
    return computed


def load_or_compute(
    prepared: Path,
    client: str,
    splits: tuple[str, ...],
    shard_sha256: str,
    encoder: nn.Module,
    key: CacheKey,
    device: torch.device,
    batch_size: int = 4,
) -> dict[str, CachedSplit]:
    """The cached trunk features of ``client``'s ``splits``, computing and storing them if the
    cache has no valid entry (a missing file, another shard checksum, or missing splits)."""
    def compute() -> dict[str, CachedSplit]:
        return _compute_splits(prepared, client, encoder, (key,), device, batch_size)[key.start_block]

    return _trunk_file(prepared, client, splits, shard_sha256, key, compute)


def precompute(prepared: Path, client: str, shard_sha256: str, encoder: nn.Module,
               keys: Sequence[CacheKey], device: torch.device, batch_size: int = 4) -> None:
    """Write the missing cache files of ``keys`` (keys equal but for their start block) for
    ``client`` in one pass of the trunk: the blocks below the lowest start block run once, not once
    per key (a study with a blocks ablation). Each file holds what :func:`load_or_compute` computes
    alone. ``encoder`` must leave every block below the highest start block frozen, as the run model
    with the fewest adapted blocks does (the blocks below a start block are the same plain backbone
    blocks in every run model)."""
    if len({replace(k, start_block=0) for k in keys}) != 1:
        raise ValueError("precompute: the keys differ in more than their start block")
    joint: dict[int, dict[str, CachedSplit]] = {}

    def compute(start: int) -> dict[str, CachedSplit]:
        if not joint:  # only when some file is missing or stale
            joint.update(_compute_splits(prepared, client, encoder, keys, device, batch_size))
        return joint[start]

    for key in keys:
        _trunk_file(prepared, client, SPLITS, shard_sha256, key,
                    lambda start=key.start_block: compute(start))


def _trunk_file(prepared: Path, client: str, splits: tuple[str, ...], shard_sha256: str, key: CacheKey,
                compute: Callable[[], dict[str, CachedSplit]]) -> dict[str, CachedSplit]:
    record = {"backbone_fingerprint": key.backbone_fingerprint, "start_block": key.start_block,
              "input_shape": list(key.input_shape), "dtype": key.dtype,
              "precision": key.precision}
    return _cached(CacheFile(cache_path(prepared, key, client), prepared, shard_sha256, record),
                   lambda handle: _read_splits(handle, splits, key.dtype), compute,
                   lambda handle, computed: _write_splits(handle, computed, key.dtype))


@dataclass(frozen=True)
class CacheFile:
    """One cache file: where, the PREPARED folder it belongs to, the shard checksum it was
    computed from and the key it records."""

    path: Path
    prepared: Path
    shard_sha256: str
    key: dict[str, Any]


def _cached(file: CacheFile, read: Callable[[h5py.File], T | None], compute: Callable[[], T],
            write: Callable[[h5py.File, T], None]) -> T:
    """The one cache pipeline (plain features and augmented views alike): read the file when it
    is valid, else compute, write atomically and read back what was written."""
    stored = _read(file, read)
    if stored is not None:
        return stored
    computed = compute()
    try:
        with atomic_file(file.path) as tmp, h5py.File(tmp, "w") as handle:
            handle.attrs["format_version"] = CACHE_FORMAT_VERSION
            handle.attrs["shard_sha256"] = file.shard_sha256
            handle.attrs["key"] = json.dumps(file.key)
            write(handle, computed)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise DataError(f"cannot write the feature cache {file.path} ({exc.strerror}): the PREPARED "
                        f"folder {file.prepared} is read-only; pass --no-cache, or make it writable") from exc
    stored = _read(file, read)
    assert stored is not None  # just written
    return stored


def _read(file: CacheFile, read: Callable[[h5py.File], T | None]) -> T | None:
    """A valid cache file's content, or None: missing, computed from another shard, or
    unreadable or incomplete (e.g. truncated by a crash of another process) all mean recompute."""
    if not file.path.exists():
        return None
    try:
        with h5py.File(file.path, "r") as handle:
            if handle.attrs.get("shard_sha256") != file.shard_sha256:
                return None
            return read(handle)
    except (OSError, KeyError):
        return None


def _write_splits(handle: h5py.File, splits: dict[str, CachedSplit], dtype: str) -> None:
    for name, split in splits.items():
        group = handle.create_group(name)
        group.create_dataset("subject_ids", data=np.array(split.subject_ids, dtype="S"))
        group.create_dataset("labels", data=split.labels.astype(np.int64))
        group.create_dataset("window_subject", data=split.window_subject.astype(np.int64))
        if len(split.subject_ids):
            group.create_dataset("hidden", data=_to_storage(split.hidden, dtype))
            group.create_dataset("skips", data=_to_storage(split.skips, dtype))


def _read_splits(handle: h5py.File, splits: tuple[str, ...], dtype: str) -> dict[str, CachedSplit] | None:
    out = {}
    for name in splits:
        if name not in handle or "window_subject" not in handle[name]:
            return None
        group = handle[name]
        ids = tuple(s.decode() for s in group["subject_ids"][()])
        labels = group["labels"][()]
        if ids:
            hidden = _from_storage(group["hidden"][()], dtype)
            skips = _from_storage(group["skips"][()], dtype)
        else:
            hidden = skips = torch.zeros(0)
        out[name] = CachedSplit(ids, labels, hidden, skips, group["window_subject"][()])
    return out


def views_path(prepared: Path, key: ViewsKey, client: str) -> Path:
    return feature_cache_dir(prepared) / key.digest() / f"{client}.views.h5"


@torch.no_grad()
def compute_views(
    encoder: nn.Module, images: np.ndarray, seeds: torch.Tensor, spec: AugmentSpec, start_block: int,
    device: torch.device, batch_size: int, precision: str = FP32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (K, n, 1 + N, D), skips (K, n, N, D)): the frozen trunk on view k of every subject,
    view k of subject i augmented from ``seeds[i, k]``."""
    hidden, skips = [], []
    tensor = torch.from_numpy(images)
    for k in range(seeds.shape[1]):
        augmented = torch.cat([
            augment_batch(tensor[b : b + batch_size], seeds[b : b + batch_size, k].tolist(), spec)
            for b in range(0, len(tensor), batch_size)
        ])
        h, s = compute_trunk(encoder, augmented.numpy(), start_block, device, batch_size, precision)
        hidden.append(h)
        skips.append(s)
    return torch.stack(hidden), torch.stack(skips)


def load_or_compute_views(
    prepared: Path,
    client: str,
    subject_ids: tuple[str, ...],
    seeds: torch.Tensor,
    shard_sha256: str,
    encoder: nn.Module,
    key: ViewsKey,
    device: torch.device,
    batch_size: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K cached trunk views of ``client``'s train split (``subject_ids``: its input rows, as
    :func:`row_ids` names them), computing and storing them when the cache has no valid file
    (missing, another shard checksum, or other rows)."""
    dtype = key.base.dtype

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        arrays = load_split(prepared, client, "train")
        if row_ids(arrays.subject_ids, arrays.window_subject) != subject_ids:
            raise ValueError(f"client {client!r}: the train split changed while building its views")
        return compute_views(encoder, arrays.images, seeds, key.augment, key.base.start_block, device,
                             batch_size, key.base.precision)

    def read(handle: h5py.File) -> tuple[torch.Tensor, torch.Tensor] | None:
        if tuple(s.decode() for s in handle["subject_ids"][()]) != subject_ids:
            return None
        return _from_storage(handle["hidden"][()], dtype), _from_storage(handle["skips"][()], dtype)

    def write(handle: h5py.File, views: tuple[torch.Tensor, torch.Tensor]) -> None:
        handle.create_dataset("subject_ids", data=np.array(subject_ids, dtype="S"))
        handle.create_dataset("hidden", data=_to_storage(views[0], dtype))
        handle.create_dataset("skips", data=_to_storage(views[1], dtype))

    record = {"base": key.base.digest(), "augment": key.augment.to_dict(), "n_views": key.n_views,
              "augment_seed": key.augment_seed}
    return _cached(CacheFile(views_path(prepared, key, client), prepared, shard_sha256, record),
                   read, compute, write)
