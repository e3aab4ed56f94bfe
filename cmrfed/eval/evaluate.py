"""``cmrfed evaluate``: every site's own model on its own data, the cross-site matrix, and the
shared-only model (what a new, unseen site would receive) on every site.

A site's model is the backbone + the run's shared tensors + its own private tensors, rebuilt
from run.json exactly as training built it (same seed, so frozen parts are identical).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cmrfed import paths
from cmrfed.atomic import atomic_dir, write_json
from cmrfed.data.shards import load_manifest
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.metrics import METRICS, binary_metrics, bootstrap_ci, youden_threshold
from cmrfed.eval.runinfo import load_run, load_states
from cmrfed.fed.client import Client
from cmrfed.fed.privacy import privacy_line, privacy_summary
from cmrfed.fed.task import build_clients, build_run_model, resolve_device
from cmrfed.provenance import versions

EVAL_FORMAT_VERSION = 1
SHARED_MODEL = "shared"
THRESHOLD_MODES = ("0.5", "youden-val")
PREDICTION_COLUMNS = ("subject", "client", "model", "split", "label", "probability", "prediction",
                      "threshold")


@dataclass(frozen=True)
class EvalSummary:
    out: Path
    per_client: dict[str, dict[str, float]]
    macro: dict[str, float]


def _finite(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _nanmean(values: list[float]) -> float:
    """Mean over clients where the metric is defined; NaN (no warning) when it is nowhere."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return _finite(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _with_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    metrics = binary_metrics(labels, probs, threshold=threshold)
    intervals = bootstrap_ci(labels, probs, threshold=threshold, n_boot=n_boot, seed=seed)
    metrics["ci95"] = {k: list(v) for k, v in intervals.items()}
    return metrics


def evaluate_run(
    run: str | Path,
    split: str = "test",
    which: str = "best",
    threshold: str = "0.5",
    n_boot: int = 1000,
    device: str = "auto",
    console: Console | None = None,
) -> EvalSummary:
    """Evaluate a finished RUN and write RUN/eval/predictions.csv and RUN/eval/metrics.json."""
    console = console or Console()
    if split not in ("test", "val"):
        raise UsageError(f"--split must be test or val, not {split!r}")
    if threshold not in THRESHOLD_MODES:
        raise UsageError(f"--threshold must be one of {', '.join(THRESHOLD_MODES)}")
    info = load_run(run)
    manifest = load_manifest(info.prepared)
    if manifest.sha256 != info.manifest_sha256:
        raise DataError(f"{info.prepared}: the prepared data changed since run {info.path} was "
                        "trained (manifest sha256 differs); evaluate against the data it used")
    shared, private = load_states(info, which)
    cfg = info.config
    torch_device = resolve_device(device)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    model = run_model.model.to(torch_device)
    clients, data = build_clients(cfg, info.prepared, manifest, run_model, torch_device)
    for client in clients:
        client.set_shared(shared)
        client.set_private(private[client.name])
    models: dict[str, Client] = {c.name: c for c in clients}
    if run_model.spec.shared:
        shared_only = Client(SHARED_MODEL, len(clients), run_model.spec, run_model.initial_state,
                             clients[0].train, None, clients[0].config, cfg.seed)
        shared_only.set_shared(shared)
        models[SHARED_MODEL] = shared_only

    # probabilities of every model on every client's val and evaluated split
    probs: dict[tuple[str, str, str], np.ndarray] = {}
    needed = {split, "val"} if threshold == "youden-val" else {split}
    for model_name, owner in models.items():
        for data_client in data:
            for part in needed:
                probs[(model_name, data_client, part)] = owner.predict(model, data[data_client][part],
                                                                       torch_device)

    def labels_of(client: str, part: str) -> np.ndarray:
        return data[client][part].labels.numpy()

    thresholds: dict[str, float] = {}
    for model_name in models:
        if threshold == "0.5":
            thresholds[model_name] = 0.5
            continue
        own = [model_name] if model_name in data else list(data)
        y = np.concatenate([labels_of(c, "val") for c in own])
        p = np.concatenate([probs[(model_name, c, "val")] for c in own])
        if len(np.unique(y)) < 2:
            raise DataError(f"--threshold youden-val: the val split of {model_name!r} lacks one class")
        thresholds[model_name] = float(youden_threshold(y, p))

    rows = []
    for (model_name, data_client, part), p in probs.items():
        if part != split:
            continue
        t = thresholds[model_name]
        for sid, label, prob in zip(data[data_client][part].subject_ids, labels_of(data_client, part), p,
                                    strict=True):
            rows.append((sid, data_client, model_name, part, int(label), float(prob),
                         int(prob >= t), t))

    per_client, cross, shared_rows = {}, {}, {}
    for c in data:
        y, p = labels_of(c, split), probs[(c, c, split)]
        if len(y) == 0:
            raise DataError(f"client {c!r} has no {split} subjects; re-run `cmrfed prepare` with "
                            "other --split fractions")
        per_client[c] = _with_ci(y, p, thresholds[c], n_boot, cfg.seed)
        cross[c] = {d: binary_metrics(labels_of(d, split), probs[(c, d, split)], thresholds[c])
                    for d in data}
        if SHARED_MODEL in models:
            shared_rows[c] = binary_metrics(y, probs[(SHARED_MODEL, c, split)], thresholds[SHARED_MODEL])
    y_all = np.concatenate([labels_of(c, split) for c in data])
    p_all = np.concatenate([probs[(c, c, split)] for c in data])
    pooled_pred = np.concatenate([(probs[(c, c, split)] >= thresholds[c]).astype(float) for c in data])
    # pooled over subjects: each subject judged by its own site's model and threshold
    if threshold == "0.5":
        pooled = _with_ci(y_all, p_all, 0.5, n_boot, cfg.seed)
    else:  # thresholds differ per site: only the threshold-free AUC is lost, so drop it
        pooled = {**binary_metrics(y_all, pooled_pred, 0.5), "auc": float("nan"),
                  "note": "each subject thresholded by its own site's Youden threshold; AUC not pooled"}
    macro = {m: _nanmean([per_client[c][m] for c in data]) for m in METRICS}

    metrics_doc = {
        "format_version": EVAL_FORMAT_VERSION,
        "created_by": "cmrfed evaluate",
        "run": {"method": info.method, "seed": info.seed, "backbone": cfg.backbone,
                "blocks": cfg.blocks, "rank": cfg.rank, "manifest_sha256": info.manifest_sha256},
        "split": split,
        "round": which,
        "round_index": info.raw["result"]["best_round" if which == "best" else "completed_rounds"],
        "threshold": {"mode": threshold, "per_model": thresholds},
        "n_boot": n_boot,
        "per_client": per_client,
        "pooled": pooled,
        "macro": macro,
        "cross_site": cross,
        "shared_only": shared_rows or None,
        "test_subjects": {c: list(data[c][split].subject_ids) for c in data},
        "communication": {k: v for k, v in info.raw["result"].items() if k.startswith("bytes")},
        # what training spent per site (DP runs; null otherwise); these outputs themselves are not DP
        "privacy": privacy_summary(info.raw),
        "versions": versions(),
    }
    with atomic_dir(paths.eval_dir(info.path), overwrite=True) as tmp:
        with (tmp / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(PREDICTION_COLUMNS)
            writer.writerows(sorted(rows, key=lambda r: (r[2], r[1], r[0])))
        write_json(tmp / "metrics.json", _clean(metrics_doc))
    _print_table(console, info.method, split, per_client, macro, shared_rows)
    console.print(privacy_line(metrics_doc["privacy"]), highlight=False)
    return EvalSummary(paths.eval_dir(info.path), per_client, macro)


def _print_table(console: Console, method: str, split: str, per_client: dict, macro: dict,
                 shared_rows: dict) -> None:
    table = Table(title=f"{method}: each site's own model on its {split} split")
    table.add_column("client")
    for metric in ("balanced_accuracy", "sensitivity", "specificity", "auc", "f1", "mcc"):
        table.add_column(metric.replace("_", " "), justify="right")
    table.add_column("shared-only bal.acc", justify="right")

    def fmt(value: float) -> str:
        return "—" if value is None or math.isnan(value) else f"{value:.3f}"

    for client, m in per_client.items():
        lo, hi = m["ci95"]["balanced_accuracy"]
        shared_b = shared_rows.get(client, {}).get("balanced_accuracy") if shared_rows else None
        table.add_row(client, f"{fmt(m['balanced_accuracy'])} [{fmt(lo)}, {fmt(hi)}]",
                      *(fmt(m[k]) for k in ("sensitivity", "specificity", "auc", "f1", "mcc")),
                      fmt(shared_b) if shared_b is not None else "—")
    table.add_row("macro", *(fmt(macro[k]) for k in ("balanced_accuracy", "sensitivity", "specificity",
                                                     "auc", "f1", "mcc")), "", style="bold")
    console.print(table)
