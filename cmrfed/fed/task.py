"""Framework-free pieces every engine shares: the run's model and each client's data.

The in-process engine, the Flower apps and ``evaluate`` all build the model and the data with
these functions, so a site's model is the same object whichever way the run is driven.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cmrfed.data.augment import augment_spec
from cmrfed.data.shards import Manifest, load_split, verify_shard
from cmrfed.errors import UsageError
from cmrfed.fed.cache import CacheKey, ViewsKey, load_or_compute, load_or_compute_views
from cmrfed.fed.client import Client, SplitTensors, TrainConfig, state_of
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import GLOBAL, LOCAL, MethodSpec, resolve_method
from cmrfed.fed.sampling import training_sites
from cmrfed.fed.strategy import TensorState
from cmrfed.fed.views import CachedViews, OnTheFlyViews, ViewSource, row_ids, view_seeds
from cmrfed.fed.windows import split_tensors
from cmrfed.model.cinema import backbone_fingerprint, load_backbone
from cmrfed.model.classifier import CineMAClassifier, tensor_group
from cmrfed.model.lora import AdapterSpec, inject_lora

SPLITS = ("train", "val", "test")


@dataclass
class RunModel:
    """The model workspace of a run and the seeded initial adapter + head state."""

    model: CineMAClassifier
    spec: MethodSpec
    initial_state: TensorState
    depth: int
    start_block: int  # index of the first adapted block
    fingerprint: str  # of the frozen backbone weights, before injection


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_run_model(cfg: FederateConfig, input_shape: tuple[int, int, int]) -> RunModel:
    """Backbone + LoRA adapters of the method + head, all initialised from the run seed.

    Every client builds this identically from the seed (FFA-LoRA relies on it: its frozen A
    is the same everywhere without ever being sent). A method that trains the backbone
    (``central-full``) gets no LoRA and holds every encoder weight; nothing of it is frozen, so
    its ``start_block`` is 0 (no cache) whatever ``--blocks`` says.
    """
    spec = resolve_method(cfg.method, cfg.head)
    encoder = load_backbone(cfg.backbone, input_shape=input_shape, seed=cfg.seed)
    fingerprint = backbone_fingerprint(encoder)
    depth = len(encoder.encoder.blocks)
    n_blocks = depth if cfg.blocks == "all" or spec.trains_backbone else int(cfg.blocks)
    if n_blocks > depth:
        raise UsageError(f"--blocks {n_blocks} exceeds the encoder's {depth} blocks")
    if spec.adapters:
        adapters = [AdapterSpec(GLOBAL, cfg.rank, cfg.alpha)]
        if LOCAL in spec.adapters:
            adapters.append(AdapterSpec(LOCAL, cfg.effective_local_rank, cfg.effective_local_alpha))
        inject_lora(encoder, n_blocks, adapters, seed=cfg.seed, targets=cfg.targets)
    model = CineMAClassifier(encoder, n_classes=2, seed=cfg.seed)
    names = [n for n, _ in model.named_parameters() if tensor_group(n) in spec.groups]
    return RunModel(
        model=model,
        spec=spec,
        initial_state=state_of(model, names),
        depth=depth,
        start_block=depth - n_blocks,
        fingerprint=fingerprint,
    )


def load_client_data(
    prepared: Path,
    manifest: Manifest,
    client: str,
    run_model: RunModel,
    cfg: FederateConfig,
    device: torch.device,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, SplitTensors]:
    """A client's splits as model inputs: cached trunk features when the cache is on (and there
    is a frozen trunk to cache), raw images otherwise."""
    if uses_cache(cfg, run_model):
        key = CacheKey(
            backbone_fingerprint=run_model.fingerprint,
            start_block=run_model.start_block,
            input_shape=tuple(manifest.shape),
            dtype=cfg.cache_dtype,
        )
        cached = load_or_compute(
            prepared, client, splits, manifest.shard_sha256[client],
            run_model.model.backbone, key, device,
        )
        return {
            name: split_tensors(item.subject_ids, item.labels, item.window_subject,
                                (item.hidden, item.skips), run_model.start_block)
            for name, item in cached.items()
        }
    out = {}
    for name in splits:
        arrays = load_split(prepared, client, name)
        out[name] = split_tensors(arrays.subject_ids, arrays.labels, arrays.window_subject,
                                  (torch.from_numpy(arrays.images),))
    return out


def uses_cache(cfg: FederateConfig, run_model: RunModel) -> bool:
    """The cache is used when it is on and there is a frozen trunk to cache."""
    return cfg.cache and run_model.start_block > 0


def train_views(
    prepared: Path,
    manifest: Manifest,
    client: str,
    train: SplitTensors,
    run_model: RunModel,
    cfg: FederateConfig,
    device: torch.device,
) -> ViewSource | None:
    """The augmented views a client trains on (None without augmentation): K cached trunk views
    per train subject, built on first use, or on-the-fly augmentation without the cache."""
    spec = augment_spec(cfg.augment)
    if spec is None:
        return None
    rows = row_ids(train.subject_ids, train.window_subject)
    seeds = view_seeds(cfg.augment_seed, client, rows, cfg.augment_views)
    if not uses_cache(cfg, run_model):  # the train split holds the images themselves
        return OnTheFlyViews(cfg.augment_views, train.inputs[0], seeds, spec)
    if cfg.augment_views == 0:
        raise UsageError("--augment-views 0 (a fresh augmentation every step) cannot use the feature "
                         "cache; pass --no-cache, or cache K >= 1 views")
    key = ViewsKey(
        base=CacheKey(run_model.fingerprint, run_model.start_block, tuple(manifest.shape), cfg.cache_dtype),
        augment=spec, n_views=cfg.augment_views, augment_seed=cfg.augment_seed,
    )

    def load() -> tuple[torch.Tensor, torch.Tensor]:
        return load_or_compute_views(prepared, client, rows, seeds,
                                     manifest.shard_sha256[client], run_model.model.backbone, key, device)

    return CachedViews(cfg.augment_views, load)


def train_config(cfg: FederateConfig) -> TrainConfig:
    """The local-training options of a run."""
    return TrainConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, class_balanced=cfg.class_balanced,
                       label_smoothing=cfg.label_smoothing, schedule=cfg.lr_schedule,
                       layer_decay=cfg.layer_decay)


def build_client(
    cfg: FederateConfig,
    prepared: Path,
    manifest: Manifest,
    name: str,
    run_model: RunModel,
    device: torch.device,
    splits: tuple[str, ...] = SPLITS,
) -> tuple[Client, dict[str, SplitTensors]]:
    """One site from its shard: its data and a :class:`Client` at the seeded initial state.

    Its index (which seeds its shuffles) is its position in the manifest, so a site run by
    Flower trains exactly as the same site in-process.
    """
    verify_shard(prepared, manifest, name)
    data = load_client_data(prepared, manifest, name, run_model, cfg, device, splits=splits)
    views = train_views(prepared, manifest, name, data["train"], run_model, cfg, device)
    client = Client(name, manifest.clients.index(name), run_model.spec, run_model.initial_state,
                    data["train"], data.get("val"), train_config(cfg), cfg.seed, views=views)
    return client, data


def build_clients(
    cfg: FederateConfig,
    prepared: Path,
    manifest: Manifest,
    run_model: RunModel,
    device: torch.device,
) -> tuple[list[Client], dict[str, dict[str, SplitTensors]]]:
    """Every manifest client but the ``--holdout`` one (whose shard is never opened), all
    starting from the seeded initial state."""
    clients, data = [], {}
    for name in training_sites(manifest.clients, cfg.holdout):
        client, data[name] = build_client(cfg, prepared, manifest, name, run_model, device)
        clients.append(client)
    return clients, data
