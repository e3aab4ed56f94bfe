"""``cmrfed adapt``: a hospital that arrives after training trains only its own local adapter.

The run's shared tensors stay frozen; the new site trains, on its own train split and for a few
epochs, exactly the groups the method table lists as ``adapted`` (:attr:`MethodSpec.newcomer`):
DualLoRA's local LoRA (what every member has), FedSA's B over the shared A, and for methods
without a private part a private copy of the shared LoRA (FedLoRA, the pooled LoRA of central;
FFA-LoRA's B only, its A staying the seeded init). A copy starts from the run's values; a group
the run never shared starts from the seeded init, as it did for the members.

It keeps the epoch with the lowest validation loss (class-weighted as training weighs it), as a
run keeps its best round. Before adapting, that model is the site's *zero-shot* model: what a
held-out site gets from the run without training at all (``evaluate --client`` scores it when
the site has no private folder). Nothing leaves the site: ADAPTED holds adapt.json and the
adapted tensors only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.atomic import atomic_dir, sha256_file, write_json
from cmrfed.data.shards import load_manifest
from cmrfed.errors import DataError, UsageError
from cmrfed.fed.client import Client, SplitTensors, class_weights
from cmrfed.fed.runinfo import RunInfo, load_run, load_shared, round_index, shared_path
from cmrfed.fed.runlog import save_tensors
from cmrfed.fed.strategy import TensorState
from cmrfed.fed.task import RunModel, build_client, build_run_model, resolve_device, train_config
from cmrfed.model.classifier import tensor_group
from cmrfed.provenance import versions

ADAPT_FORMAT_VERSION = 1
EPS = 1e-7


@dataclass(frozen=True)
class AdaptSummary:
    out: Path
    val_loss: list[float]
    train_loss: list[float]
    best_epoch: int  # the epoch whose tensors ADAPTED holds (0: none improved on the start)


def newcomer_client(run_model: RunModel, shared: TensorState, base: Client,
                    adapted: TensorState | None = None) -> Client:
    """The model of a site that did not train: the run's shared tensors, and its ``adapted``
    groups either as ``adapt`` left them or, before adapting (zero-shot), at their start values
    (the run's value where the run shared the group, the seeded init otherwise).

    ``base`` is the site's ordinary client (its data, index and training options)."""
    spec = run_model.spec.newcomer
    client = Client(base.name, base.index, spec, run_model.initial_state, base.train, base.val,
                    base.config, base.seed)
    client.set_shared({k: v for k, v in shared.items() if tensor_group(k) in spec.shared})
    start = {k: shared.get(k, v) for k, v in client.private_state().items()}
    client.set_private(start if adapted is None else adapted)
    return client


def weighted_val_loss(client: Client, model: torch.nn.Module, split: SplitTensors,
                      device: torch.device) -> float:
    """Cross-entropy of ``client``'s model on ``split``, class-weighted as training weighs it
    (``--class-balanced``: each class counts equally); NaN when the split is empty."""
    if len(split) == 0:
        return float("nan")
    probs = np.clip(client.predict(model, split, device).astype(np.float64), EPS, 1 - EPS)
    labels = split.labels
    per_subject = np.where(labels.numpy() == 1, -np.log(probs), -np.log1p(-probs))
    if not client.config.class_balanced:
        return float(per_subject.mean())
    weights = class_weights(labels).numpy().astype(np.float64)[labels.numpy()]
    return float((weights * per_subject).sum() / weights.sum())


def run_identity(info: RunInfo, which: str) -> dict[str, Any]:
    """What ties a site's work to one run's tensors: checked again wherever it is read back."""
    return {"method": info.method, "seed": info.seed,
            "round": which, "round_index": round_index(info, which),
            "shared_sha256": sha256_file(shared_path(info, which))}


def open_site(info: RunInfo, client: str, prepared: Path, device: torch.device,
              splits: tuple[str, ...]) -> tuple[RunModel, Client, dict[str, SplitTensors]]:
    """A site's model workspace and its client, from run.json and its own PREPARED folder only
    (its shard checked against the manifest and against the shard the run recorded, if any)."""
    prepared = Path(prepared)
    manifest = load_manifest(prepared)
    if client not in manifest.clients:
        raise UsageError(f"--client {client!r} is not in {paths.manifest_path(prepared)}; choose one of "
                         f"{', '.join(manifest.clients)}")
    recorded = info.raw.get("data", {}).get("shard_sha256", {}).get(client)
    if recorded is not None and recorded != manifest.shard_sha256[client]:
        raise DataError(f"{paths.shard_path(prepared, client)}: not the shard run {info.path} recorded for "
                        f"{client!r} (sha256 differs); use the data the run was trained and split on")
    cfg = replace(info.config, data=str(prepared.resolve()))
    run_model = build_run_model(cfg, tuple(manifest.shape))
    run_model.model.to(device)
    base, data = build_client(cfg, prepared, manifest, client, run_model, device, splits=splits)
    return run_model, base, data


def adapt(
    run: str | Path,
    client: str,
    data: str | Path,
    out: str | Path,
    which: str = "best",
    epochs: int = 3,
    lr: float | None = None,
    device: str = "auto",
    overwrite: bool = False,
    console: Console | None = None,
) -> AdaptSummary:
    """Train ``client``'s adapted groups over RUN's frozen shared tensors; write ADAPTED."""
    console = console or Console()
    out = Path(out)
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"--lr must be a positive number, got {lr}")
    info = load_run(run)
    if client in info.clients:
        raise UsageError(f"{client!r} trained in run {info.path}; `adapt` is for a site that did not "
                         "(train the run with --holdout SITE), a member evaluates with --private")
    was_adapted = paths.adapt_record_path(out).exists()  # --overwrite replaces only an ADAPTED folder
    if out.exists() and any(out.iterdir()) and not (overwrite and was_adapted):
        raise UsageError(f"{out} already exists; choose another --out"
                         + (" or pass --overwrite" if was_adapted else ""))
    torch_device = resolve_device(device)
    run_model, base, split_data = open_site(info, client, Path(data), torch_device, ("train", "val"))
    base = Client(base.name, base.index, base.spec, run_model.initial_state, base.train, base.val,
                  replace(train_config(info.config), local_epochs=1,
                          lr=info.config.lr if lr is None else lr, schedule=None),  # constant lr
                  base.seed)
    shared = load_shared(info, which)
    site = newcomer_client(run_model, shared, base)
    model = run_model.model
    val = split_data["val"]
    started = time.perf_counter()
    val_loss = [weighted_val_loss(site, model, val, torch_device)]
    train_loss = []
    best_epoch, adapted = 0, site.private_state()
    for epoch in range(1, epochs + 1):
        # seeded past the run's rounds, so its shuffles are its own and reproducible
        result = site.fit(model, info.config.rounds + epoch, torch_device)
        train_loss.append(result.train_loss)
        val_loss.append(weighted_val_loss(site, model, val, torch_device))
        if val_loss[-1] < val_loss[best_epoch]:  # kept as the run keeps its best round
            best_epoch, adapted = epoch, site.private_state()
    record = {
        "format_version": ADAPT_FORMAT_VERSION,
        "created_by": "cmrfed adapt",
        "client": client,
        "run": run_identity(info, which),
        "adapted_groups": sorted(run_model.spec.adapted),
        "adapted_params": int(sum(t.numel() for t in adapted.values())),
        "epochs": epochs,
        "lr": base.config.lr,
        "n_train": len(site.train),
        "n_val": len(val),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "best_epoch": best_epoch,
        "wall_s": time.perf_counter() - started,
        "versions": versions(),
    }
    with atomic_dir(out, overwrite=True) as tmp:
        save_tensors(paths.private_tensors_path(tmp, client), adapted)
        write_json(paths.adapt_record_path(tmp), record)
    table = Table(title=f"{info.method}: {client} adapts {', '.join(sorted(run_model.spec.adapted))}")
    for column in ("epoch", "train loss", "val loss"):
        table.add_column(column, justify="right")
    for epoch, loss in enumerate(val_loss):
        table.add_row(str(epoch), f"{train_loss[epoch - 1]:.4f}" if epoch else "—", f"{loss:.4f}")
    console.print(table)
    console.print(f"kept epoch {best_epoch} (lowest validation loss)", highlight=False)
    return AdaptSummary(out, val_loss, train_loss, best_epoch)


def read_adapted(adapted: Path, client: str, info: RunInfo, which: str) -> TensorState:
    """The tensors ``adapt`` wrote for ``client``, after checking they were adapted on these
    shared tensors of this run."""
    record_path = paths.adapt_record_path(adapted)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        tensors = load_file(str(paths.private_tensors_path(adapted, client)))
    except (OSError, ValueError) as exc:
        raise DataError(f"{adapted}: not an ADAPTED folder of `cmrfed adapt` ({exc})") from exc
    if record.get("client") != client:
        raise UsageError(f"{adapted} was adapted for {record.get('client')!r}, not {client!r}")
    if record.get("run") != run_identity(info, which):
        raise DataError(f"{adapted} was adapted on other shared tensors than the {which} round of "
                        f"{info.path}; evaluate with the --round it was adapted on, or adapt again")
    return tensors
