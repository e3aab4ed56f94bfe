"""Framework-free pieces every engine shares: the run's model and each client's data.

The in-process engine, the Flower apps and ``evaluate`` all build the model and the data with
these functions, so a site's model is the same object whichever way the run is driven.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cmrfed.data.shards import Manifest, load_split, verify_shard
from cmrfed.errors import UsageError
from cmrfed.fed.cache import CacheKey, load_or_compute
from cmrfed.fed.client import Client, SplitTensors, TrainConfig, state_of
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import GLOBAL, LOCAL, MethodSpec, resolve_method
from cmrfed.fed.participation import training_sites
from cmrfed.fed.strategy import TensorState
from cmrfed.fed.windows import split_tensors
from cmrfed.model.cinema import backbone_fingerprint, load_backbone
from cmrfed.model.classifier import CineMAClassifier, param_group
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
    is the same everywhere without ever being sent).
    """
    spec = resolve_method(cfg.method, cfg.head)
    encoder = load_backbone(cfg.backbone, input_shape=input_shape, seed=cfg.seed)
    fingerprint = backbone_fingerprint(encoder)
    depth = len(encoder.encoder.blocks)
    n_blocks = depth if cfg.blocks == "all" else int(cfg.blocks)
    if n_blocks > depth:
        raise UsageError(f"--blocks {n_blocks} exceeds the encoder's {depth} blocks")
    adapters = [AdapterSpec(GLOBAL, cfg.rank, cfg.alpha)]
    if LOCAL in spec.adapters:
        adapters.append(AdapterSpec(LOCAL, cfg.effective_local_rank, cfg.effective_local_alpha))
    inject_lora(encoder, n_blocks, adapters, seed=cfg.seed, targets=cfg.targets)
    model = CineMAClassifier(encoder, n_classes=2, seed=cfg.seed)
    names = [n for n, _ in model.named_parameters() if param_group(n) is not None]
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
    if cfg.cache and run_model.start_block > 0:
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


def train_config(cfg: FederateConfig) -> TrainConfig:
    """The local-training options of a run."""
    return TrainConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, class_balanced=cfg.class_balanced)


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
    client = Client(name, manifest.clients.index(name), run_model.spec, run_model.initial_state,
                    data["train"], data.get("val"), train_config(cfg), cfg.seed)
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
