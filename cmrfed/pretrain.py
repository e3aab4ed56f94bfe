"""``cmrfed pretrain``: CineMA's masked-autoencoder pretraining of the SAX encoder (images only),
and an optional second stage that fine-tunes it for disease detection (``--objective disease``).

The two stages mirror the paper's setting: CineMA's encoder was pretrained as an MAE on UK
Biobank cines and then fine-tuned for disease detection before any hospital adapts it with LoRA.
The hospitals' federated LoRA then adapts features that already respond to disease, as in that
setting, rather than features learnt only to fill in hidden patches. Each stage reads its own
PREPARED folders; neither needs the sites' data (and must not get it).

CineMA's recipe (``cinema/mae/config.yaml`` and ``pretrain.py`` in mathpluscode/CineMA): mask
ratio 0.75, the decoder of the encoder's size, MSE on hidden patches, AdamW betas (0.9, 0.95),
weight decay 0.05 (not on biases, norms and tokens, timm's rule), lr 1e-3 with linear warm-up
then half-cosine to 1e-6 updated every step, gradient clip 5.0, and with probability 0.5 a random
affine (scale within 0.2 per axis, rotation about z in [-180, 180] degrees, translation up to
48, 48, 0 voxels of 1 mm, i.e. 48 mm: converted to voxels with the data's spacing) followed by a
min-max rescale. (CineMA's ``pretrain.py`` builds its transform from a zoom alone; its
config lists the rotation and translation, which are what is implemented here.)

Input channels. CineMA pretrains one frame per sample (one channel) and, when fine-tuning on ED
+ ES, repeats the first conv's weight over the two channels. With that copy the stem computes
``W * ED + W * ES = W * (ED + ES)``: a frozen backbone then sees only the sum of the two frames
and cannot tell a heart that contracts from one that does not, and cmrfed keeps the backbone
frozen (only LoRA on the last blocks and the head train). So cmrfed pretrains on the pair the
classifier reads: each sample is a subject's (ED, ES) as two channels, one mask for both, and
the decoder reconstructs both frames of every hidden patch (CineMA's MAE code handles several
input channels the same way: its pixel head predicts patch voxels x channels). The first conv is
(C, 2, 4, 4, 1) and loads into the classifier's 2-channel stem as it is, with no repeat rule.

Only the ``train`` split of each PREPARED folder is read; for the MAE only its images (see
:func:`cmrfed.data.shards.load_images`): labels never enter. The disease stage starts from
``--init`` (the MAE's output) and trains the whole encoder and CineMA's head with CineMA's
fine-tuning loss (cross-entropy, label smoothing 0.1; class-balanced weights as cmrfed's sites
use), the same optimiser and schedule, and CineMA's fine-tuning augmentation (the sites' ``--augment
cinema``); only the encoder is written. ``--augment none`` turns a stage's augmentation off. Every
random draw (shuffle,
augmentation, masks) comes from a generator derived from (seed, epoch), and a checkpoint
(model, optimiser, progress) is replaced atomically after every epoch, so ``--resume`` after a
kill gives the same bytes as an uninterrupted run.

Output: BACKBONE.safetensors holding the encoder alone under CineMA's keys (what ``--backbone
PATH`` loads; the positional table is left out and rebuilt from its formula), in float32 or
float16, with metadata: the recipe, the data's hashes, the seed, the masked reconstruction loss
before and after, and the command that regenerates it.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cmrfed import paths
from cmrfed.atomic import atomic_dir, atomic_file, sha256_file, write_json
from cmrfed.data.augment import AUGMENT_CHOICES, AugmentSpec, augment_batch
from cmrfed.data.shards import load_images, load_manifest, load_split, verify_shard
from cmrfed.errors import DataError, UsageError
from cmrfed.fed.client import class_weights
from cmrfed.fed.task import resolve_device
from cmrfed.model.cinema import (
    POS_EMBED_KEY,
    SIZES,
    CineMASaxEncoder,
    build_encoder,
    load_backbone,
    resolve_checkpoint,
)
from cmrfed.model.classifier import CineMAClassifier
from cmrfed.model.mae import MASK_RATIO, build_mae
from cmrfed.precision import FP32, autocast, resolve_precision
from cmrfed.provenance import versions
from cmrfed.seeding import derive_seed, seeded_generator

OUTPUT_KIND = "cmrfed pretrained backbone"
OBJECTIVES = ("mae", "disease")
LABEL_SMOOTHING = 0.1  # CineMA's classification fine-tuning
SPLIT = "train"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that shapes the weights (recorded in the output and the checkpoint)."""

    data: tuple[str, ...]
    size: str = "tiny"
    objective: str = "mae"
    init: str = ""
    epochs: int = 800
    warmup_epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 5.0
    mask_ratio: float = MASK_RATIO
    layer_decay: float = 0.75  # disease objective only (CineMA's fine-tuning)
    augment: str = "cinema"  # CineMA's augmentation of the objective's stage, or "none"
    aug_prob: float = 0.5
    scale_range: float = 0.2
    rotate_deg: float = 180.0
    translate_mm: tuple[float, float, float] = (48.0, 48.0, 0.0)
    seed: int = 0
    dtype: str = "float32"
    # of the forward pass (cmrfed/precision.py), recorded resolved. float32 by default: bf16 MAE
    # pretraining on a CPU is not bitwise repeatable (two identical runs differ; torch 2.13), and
    # pretraining promises that --resume gives the bytes of an uninterrupted run
    precision: str = FP32

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.size not in SIZES:
            raise UsageError(f"--size {self.size!r}: choose one of {', '.join(SIZES)}")
        if not self.data:
            raise UsageError("--data: give at least one PREPARED folder")
        if self.epochs < 1 or self.batch_size < 1 or not 0 <= self.warmup_epochs <= self.epochs:
            raise UsageError("--epochs and --batch-size must be positive and --warmup-epochs "
                             "between 0 and --epochs")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UsageError(f"--mask-ratio {self.mask_ratio}: must be in [0, 1)")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.augment not in AUGMENT_CHOICES:
            raise UsageError(f"--augment {self.augment!r}: choose one of {', '.join(AUGMENT_CHOICES)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
        values.setdefault("precision", FP32)  # a checkpoint from before --precision: float32
        return cls(**values)

    def command(self, out: str) -> str:
        """The ``cmrfed pretrain`` command line that makes these weights."""
        data = [arg for folder in self.data for arg in ("--data", folder)]
        start = ["--objective", self.objective] if self.objective != "mae" else []
        start += ["--init", self.init] if self.init else []
        start += ["--layer-decay", repr(self.layer_decay)] if self.objective == "disease" else []
        start += ["--augment", self.augment] if self.augment != "cinema" else []
        parts = ["cmrfed", "pretrain", *data, *start, "--size", self.size, "--epochs", str(self.epochs),
                 "--warmup-epochs", str(self.warmup_epochs), "--batch-size", str(self.batch_size),
                 "--lr", repr(self.lr), "--mask-ratio", repr(self.mask_ratio), "--seed", str(self.seed),
                 "--dtype", self.dtype, "--precision", self.precision, "--out", out]
        return shlex.join(parts)


@dataclass(frozen=True)
class PretrainData:
    """The training images of every PREPARED folder, and what identifies them."""

    images: torch.Tensor  # (n, 2, X, Y, Z) float32
    labels: torch.Tensor | None  # (n,) int64, only for the disease objective
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    records: list[dict[str, Any]]


def load_pretrain_data(folders: tuple[str, ...], with_labels: bool = False) -> PretrainData:
    """Every client's ``train`` images of every folder (checked against its manifest), in a fixed
    order (folder, client, subject id). Labels are read only ``with_labels`` (the disease
    objective); the MAE never reads them."""
    arrays, labels, records = [], [], []
    shape = spacing = None
    for folder in folders:
        prepared = Path(folder)
        manifest = load_manifest(prepared)
        if shape is None:
            shape, spacing = manifest.shape, manifest.spacing
        elif (manifest.shape, manifest.spacing) != (shape, spacing):
            raise UsageError(f"--data {folder}: prepared at shape {manifest.shape}, spacing "
                             f"{manifest.spacing} but {folders[0]} at {shape}, {spacing}; prepare "
                             f"every folder at the same --shape and --spacing")
        count = 0
        for client in manifest.clients:
            verify_shard(prepared, manifest, client)
            if with_labels:
                split = load_split(prepared, client, SPLIT)
                images = split.images
                labels.append(split.labels[split.window_subject])  # one per z window
            else:
                images = load_images(prepared, client, SPLIT)[1]
            arrays.append(images)
            count += len(images)
        records.append({"folder": prepared.name, "manifest_sha256": manifest.sha256,
                        "shard_sha256": dict(manifest.shard_sha256), "n_train_images": count})
    images = np.concatenate(arrays) if arrays else np.empty((0,))
    if len(images) == 0:
        raise DataError(f"--data {' '.join(folders)}: no subject in a train split; prepare the "
                        f"pretraining cohort with e.g. --split 1,0,0")
    assert shape is not None and spacing is not None
    label_tensor = torch.from_numpy(np.concatenate(labels)) if with_labels else None
    return PretrainData(torch.from_numpy(images), label_tensor, spacing, shape, records)


# --- augmentation ----------------------------------------------------------------------------------
def random_affine(images: torch.Tensor, spacing: tuple[float, float, float], cfg: PretrainConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """With probability ``aug_prob`` per sample, resample (B, C, X, Y, Z) under a random affine in
    millimetres (scale, rotation about z, translation; zero outside), then min-max each sample.

    Every draw is made for every sample, so the stream does not depend on which were chosen.
    """
    batch = images.shape[0]
    chosen = torch.rand(batch, generator=generator) < cfg.aug_prob
    scale = 1 + (torch.rand(batch, 3, generator=generator) * 2 - 1) * cfg.scale_range
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(cfg.rotate_deg)
    shift = (torch.rand(batch, 3, generator=generator) * 2 - 1) * torch.tensor(cfg.translate_mm)
    out = images.clone()
    if chosen.any():
        size = images.shape[2:]
        half = torch.tensor([n * s / 2 for n, s in zip(size, spacing, strict=True)], dtype=torch.float64)
        axes = [(torch.arange(n, dtype=torch.float64) * 2 + 1) / n - 1 for n in size]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) * half  # (X, Y, Z, 3) mm
        for b in torch.nonzero(chosen).flatten().tolist():
            cos, sin = math.cos(angle[b]), math.sin(angle[b])
            rotation = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
            # output point p = R S q + t  ->  input point q = S^-1 R^T (p - t)
            source = ((grid - shift[b].double()) @ rotation) / scale[b].double()
            norm = (source / half).flip(-1).float()  # grid_sample wants (z, y, x) for (X, Y, Z) dims
            out[b] = F.grid_sample(images[b:b + 1], norm.unsqueeze(0), mode="bilinear",
                                   padding_mode="zeros", align_corners=False)[0]
    low = out.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = out.amax(dim=(1, 2, 3, 4), keepdim=True)
    return (out - low) / (high - low).clamp_min(1e-8)


def augment_stage(images: torch.Tensor, data: PretrainData, cfg: PretrainConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """A training batch under the stage's augmentation, every draw from ``generator``: for the MAE
    CineMA's pretraining affine (:func:`random_affine`); for the disease objective CineMA's
    classification fine-tuning augmentation (gamma, noise, in-plane affine: the same
    :func:`cmrfed.data.augment.augment_batch` the sites' ``--augment cinema`` uses), one seed per
    sample. ``--augment none`` leaves the images as prepared."""
    if cfg.augment == "none":
        return images
    if cfg.objective == "mae":
        return random_affine(images, data.spacing, cfg, generator)
    seeds = torch.randint(0, 2**62, (len(images),), generator=generator).tolist()
    return augment_batch(images, seeds, AugmentSpec())


# --- optimisation ----------------------------------------------------------------------------------
def learning_rate(cfg: PretrainConfig, progress: float) -> float:
    """Linear warm-up over ``warmup_epochs`` then half-cosine to ``min_lr`` (``progress`` in epochs)."""
    if progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    cosine = math.cos(math.pi * (progress - cfg.warmup_epochs) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + cosine)


def layer_id(name: str, depth: int) -> int:
    """0 for the stem and cls token, i + 1 for block i, depth + 1 for what follows (norms, fusion,
    head): the layers of CineMA's (BEiT's) layer-wise learning-rate decay."""
    name = name.removeprefix("backbone.")
    if name.startswith("enc_down_dict.") or name == "encoder.cls_token":
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def build_optimizer(model: nn.Module, cfg: PretrainConfig, depth: int) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and tokens (timm's ``param_groups_weight_decay``)
    and, for the disease objective, CineMA's layer-wise lr decay: layer l trains at
    ``lr * layer_decay ** (depth + 1 - l)`` (``lr_scale`` of its group)."""
    decay_rate = cfg.layer_decay if cfg.objective == "disease" else 1.0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim <= 1 or name.endswith("token")
        layer = layer_id(name, depth) if decay_rate != 1.0 else 0
        group = groups.setdefault((layer, plain), {
            "params": [], "weight_decay": 0.0 if plain else cfg.weight_decay,
            "lr_scale": decay_rate ** (depth + 1 - layer) if decay_rate != 1.0 else 1.0})
        group["params"].append(param)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], item[0][1]))
    return torch.optim.AdamW([group for _, group in ordered], lr=cfg.lr, betas=cfg.betas)


class MaeObjective:
    """CineMA's MAE: masked reconstruction of both frames; images only."""

    name = "mae"

    def __init__(self, encoder: CineMASaxEncoder, cfg: PretrainConfig) -> None:
        self.model: nn.Module = build_mae(encoder, mask_ratio=cfg.mask_ratio, seed=cfg.seed)
        self.backbone = encoder

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor:
        return self.model(images, generator)[0]


class DiseaseObjective:
    """Supervised fine-tuning for disease detection, as CineMA fine-tunes its encoder: the whole
    encoder and CineMA's head train (the positional table stays fixed), cross-entropy with label
    smoothing 0.1, weighted by inverse class frequency (cmrfed's rule for imbalanced sites)."""

    name = "disease"

    def __init__(self, encoder: CineMASaxEncoder, cfg: PretrainConfig, labels: torch.Tensor) -> None:
        self.model = CineMAClassifier(encoder, n_classes=2, seed=cfg.seed)
        for name, param in encoder.named_parameters():
            param.requires_grad_(name != POS_EMBED_KEY)
        self.backbone = encoder
        self.weight = class_weights(labels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor:
        assert labels is not None
        logits = self.model(images)
        return F.cross_entropy(logits, labels.to(logits.device), weight=self.weight.to(logits.device),
                               label_smoothing=LABEL_SMOOTHING)


@torch.no_grad()
def fixed_loss(objective: MaeObjective | DiseaseObjective, data: PretrainData, seed: int,
               device: torch.device, precision: str = FP32, batch_size: int = 64) -> float:
    """The objective's mean loss over the training images with no augmentation and, for the MAE,
    fixed masks: the same number before and after training measures what was learnt."""
    generator = seeded_generator(seed, "evaluation-masks")
    objective.model.eval()
    total = 0.0
    for start in range(0, len(data.images), batch_size):
        images = data.images[start:start + batch_size].to(device)
        labels = None if data.labels is None else data.labels[start:start + batch_size]
        with autocast(precision, device):
            loss = objective.loss(images, labels, generator)
        total += loss.float().item() * len(images)
    objective.model.train()
    return total / len(data.images)


# --- checkpoint ------------------------------------------------------------------------------------
def _write_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                      cfg: PretrainConfig, progress: dict[str, Any]) -> None:
    """Model, optimiser and progress after an epoch, replaced atomically as one folder."""
    state = optimizer.state_dict()
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optim/{index}/{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "config.json", cfg.to_dict())
        write_json(tmp / "progress.json", {**progress, "param_groups": state["param_groups"]})


def _read_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     device: torch.device) -> dict[str, Any]:
    try:
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: unreadable checkpoint ({exc}); start again without --resume") from exc
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, slot = key.split("/")
            slots.setdefault(int(index), {})[slot] = value.to(device) if slot != "step" else value
    optimizer.load_state_dict({"state": slots, "param_groups": progress.pop("param_groups")})
    return progress


def _check_resume(cfg: PretrainConfig, folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise UsageError(f"{folder}: no checkpoint to resume; start without --resume")
    recorded = PretrainConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
    if recorded != cfg:
        diff = sorted(k for k, v in cfg.to_dict().items() if recorded.to_dict().get(k) != v)
        raise UsageError(f"{folder}: --resume with options that differ from the checkpoint ({diff})")


# --- the stage -------------------------------------------------------------------------------------
def _initial_encoder(cfg: PretrainConfig, data: PretrainData) -> tuple[CineMASaxEncoder, dict[str, str]]:
    """The encoder training starts from: ``--init`` (e.g. an MAE output) or the seeded random init
    of ``--size``; with what identifies the starting weights."""
    in_chans, shape = data.images.shape[1], data.shape
    if not cfg.init:
        return build_encoder(cfg.size, in_chans=in_chans, input_shape=shape, seed=cfg.seed), {}
    encoder = load_backbone(cfg.init, input_shape=shape, seed=cfg.seed, in_chans=in_chans)
    if encoder.size.name != cfg.size:
        raise UsageError(f"--init {cfg.init}: a {encoder.size.name} encoder, but --size {cfg.size}")
    path = resolve_checkpoint(cfg.init)
    with safe_open(str(path), framework="pt") as handle:
        recorded = handle.metadata() or {}
    return encoder, {"init_sha256": sha256_file(path), "init_command": recorded.get("command", "")}


def _export(out: Path, backbone: CineMASaxEncoder, cfg: PretrainConfig, data: PretrainData,
            progress: dict[str, Any], command: str, init: dict[str, str]) -> None:
    """The encoder alone, CineMA keys, no positional table, with its provenance as metadata."""
    tensors = {k: v.detach().to("cpu", DTYPES[cfg.dtype]).contiguous()
               for k, v in backbone.state_dict().items() if k != POS_EMBED_KEY}
    metadata = {
        "kind": OUTPUT_KIND,
        "objective": cfg.objective,
        "size": cfg.size,
        "in_chans": str(backbone.in_chans),
        "input_shape": json.dumps(list(data.shape)),
        "spacing": json.dumps(list(data.spacing)),
        "seed": str(cfg.seed),
        "recipe": json.dumps({k: v for k, v in cfg.to_dict().items() if k != "data"}),
        "data": json.dumps(data.records),
        "loss_start": repr(progress["loss_start"]),
        "loss_end": repr(progress["loss_end"]),
        "train_loss_per_epoch": json.dumps(progress["train_loss"]),
        "command": command,
        **init,
        "versions": json.dumps(versions()),
    }
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def pretrain(cfg: PretrainConfig, out: str | Path, device: str = "auto", resume: bool = False,
             overwrite: bool = False, command: str | None = None,
             console: Console | None = None) -> Path:
    """Train ``cfg.size``'s encoder with ``cfg.objective`` on the train split of ``cfg.data``
    (CineMA's MAE on images only, or disease fine-tuning on images and labels); write OUT."""
    console = console or Console()
    out = Path(out)
    folder = paths.pretrain_checkpoint_dir(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: name the backbone file BACKBONE.safetensors")
    torch_device = resolve_device(device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, torch_device))  # recorded resolved
    if resume:
        _check_resume(cfg, folder)
    elif (out.exists() or folder.exists()) and not overwrite:
        raise UsageError(f"{out} (or {folder}) already exists; pass --resume to continue, "
                         "--overwrite to replace it, or choose another --out")
    data = load_pretrain_data(cfg.data, with_labels=cfg.objective == "disease")
    encoder, init = _initial_encoder(cfg, data)
    objective = (MaeObjective(encoder, cfg) if data.labels is None
                 else DiseaseObjective(encoder, cfg, data.labels))
    model = objective.model.to(torch_device)
    optimizer = build_optimizer(model, cfg, encoder.depth)
    if resume:
        progress = _read_checkpoint(folder, model, optimizer, torch_device)
    else:
        progress = {"epoch": 0, "train_loss": [],
                    "loss_start": fixed_loss(objective, data, cfg.seed, torch_device, cfg.precision)}
        _write_checkpoint(folder, model, optimizer, cfg, progress)

    n = len(data.images)
    batch_size = min(cfg.batch_size, n)
    steps = n // batch_size  # full batches only, as CineMA (drop_last)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(cfg.objective, total=cfg.epochs * steps, completed=progress["epoch"] * steps)
        for epoch in range(progress["epoch"], cfg.epochs):
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch))
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, epoch + step / steps) * group["lr_scale"]
                index = order[step * batch_size:(step + 1) * batch_size]
                batch = augment_stage(data.images[index], data, cfg, generator).to(torch_device)
                labels = None if data.labels is None else data.labels[index]
                with autocast(cfg.precision, torch_device):  # float32 weights, optimiser and loss
                    loss = objective.loss(batch, labels, generator).float()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                total += loss.item()
                bar.update(task, advance=1, description=f"{cfg.objective}: epoch {epoch + 1}/{cfg.epochs}")
            progress["epoch"] = epoch + 1
            progress["train_loss"].append(total / steps)
            _write_checkpoint(folder, model, optimizer, cfg, progress)
            console.print(f"epoch {epoch + 1:>4}/{cfg.epochs}  {cfg.objective} loss {total / steps:.5f}  "
                          f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.perf_counter() - started:.1f}s",
                          highlight=False)
    progress["loss_end"] = fixed_loss(objective, data, cfg.seed, torch_device, cfg.precision)
    _export(out, objective.backbone, cfg, data, progress, command or cfg.command(str(out)), init)
    console.print(f"{cfg.objective} loss on the training images (no augmentation"
                  f"{', fixed masks' if cfg.objective == 'mae' else ''}): "
                  f"{progress['loss_start']:.5f} -> {progress['loss_end']:.5f}; wrote [bold]{out}[/]")
    return out
