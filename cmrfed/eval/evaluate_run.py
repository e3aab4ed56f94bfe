"""``cmrfed evaluate RUN`` (the command, every site's data on one machine): every site's own model
on its own data, the cross-site matrix, and the shared-only model (what a new, unseen site would
receive) on every site.

A site's model is the backbone + the run's shared tensors + its own private tensors, rebuilt
from run.json exactly as training built it (same seed, so frozen parts are identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cmrfed import paths
from cmrfed.atomic import atomic_dir, write_json
from cmrfed.data.shards import load_manifest
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.scoring import (
    PREDICTION_COLUMNS,
    SHARED_MODEL,
    Scores,
    check_threshold,
    json_ready,
    merge_sites,
    score_site,
    write_predictions,
)
from cmrfed.fed.client import Client
from cmrfed.fed.privacy import privacy_line, privacy_summary
from cmrfed.fed.runinfo import RunInfo, load_run, load_states, round_index
from cmrfed.fed.task import build_clients, build_run_model, resolve_device
from cmrfed.lock import folder_lock
from cmrfed.provenance import versions

EVAL_FORMAT_VERSION = 1
__all__ = ["PREDICTION_COLUMNS", "evaluate_run"]  # the columns are defined in cmrfed.eval.scoring


@dataclass(frozen=True)
class EvalSummary:
    out: Path
    per_client: dict[str, dict[str, float]]
    macro: dict[str, float]


def eval_header(info: RunInfo, split: str, which: str, created_by: str) -> dict[str, Any]:
    """The fields of metrics.json that say what was evaluated (shared by pooled and merged)."""
    cfg = info.config
    return {
        "format_version": EVAL_FORMAT_VERSION,
        "created_by": created_by,
        "run": {"method": info.method, "seed": info.seed, "backbone": cfg.backbone,
                "blocks": cfg.blocks, "rank": cfg.rank, "manifest_sha256": info.manifest_sha256},
        "split": split,
        "round": which,
        "round_index": round_index(info, which),
        # what training spent per site (DP runs; null otherwise); these outputs themselves are not DP
        "privacy": privacy_summary(info.raw),
    }


def write_eval(info: RunInfo, doc: dict[str, Any], rows: list[tuple]) -> Path:
    """RUN/eval/predictions.csv and RUN/eval/metrics.json, replaced together."""
    doc = {**doc, "communication": {k: v for k, v in info.raw["result"].items() if k.startswith("bytes")},
           "versions": versions()}
    with atomic_dir(paths.eval_dir(info.path), overwrite=True) as tmp:
        write_predictions(tmp / "predictions.csv", rows)
        write_json(tmp / "metrics.json", json_ready(doc))
    return paths.eval_dir(info.path)


def evaluate_run(
    run: str | Path,
    split: str = "test",
    which: str = "best",
    threshold: str = "0.5",
    n_boot: int = 1000,
    device: str = "auto",
    console: Console | None = None,
    data: str | Path | None = None,
) -> EvalSummary:
    """Evaluate a finished RUN and write RUN/eval/predictions.csv and RUN/eval/metrics.json.

    Each site is scored by :func:`score_site` and the results merged by :func:`merge_sites`,
    exactly as a consortium does site by site; only the cross-site matrix is extra here.

    ``data`` points at the run's PREPARED folder when it has moved since the run (its manifest
    must be the one the run was trained on). RUN is locked while it is evaluated. A client with
    no subjects in the evaluated split has no metrics: ``absent`` says why, and ``pooled`` and
    ``macro`` name the clients they cover.
    """
    load_run(run)  # a missing or unfinished RUN is refused before anything (a lock) is written
    with folder_lock(run):
        return _evaluate(run, split, which, threshold, n_boot, device, console or Console(),
                         prepared=data)


def _prepared_of(run_path: Path, recorded: Path, data: str | Path | None) -> Path:
    if data is not None:
        return Path(data).expanduser().resolve()
    if not paths.manifest_path(recorded).exists():
        raise DataError(f"{run_path}: its PREPARED folder {recorded} is gone (moved or deleted); "
                        "pass --data PATH to evaluate against that data where it is now")
    return recorded


def _evaluate(run: str | Path, split: str, which: str, threshold: str, n_boot: int, device: str,
              console: Console, prepared: str | Path | None) -> EvalSummary:
    if split not in ("test", "val"):
        raise UsageError(f"--split must be test or val, not {split!r}")
    check_threshold(threshold)
    info = load_run(run)
    prepared = _prepared_of(info.path, info.prepared, prepared)
    manifest = load_manifest(prepared)
    if manifest.sha256 != info.manifest_sha256:
        raise DataError(f"{prepared}: not the prepared data run {info.path} was trained on "
                        "(manifest sha256 differs); evaluate against the data it used")
    shared, private = load_states(info, which)
    cfg = info.config
    torch_device = resolve_device(device)
    run_model = build_run_model(cfg, tuple(manifest.shape))
    model = run_model.model.to(torch_device)
    clients, data = build_clients(cfg, prepared, manifest, run_model, torch_device)
    for client in clients:
        client.set_shared(shared)
        client.set_private(private[client.name])
    shared_only = None
    if run_model.spec.shared:
        shared_only = Client(SHARED_MODEL, len(clients), run_model.spec, run_model.initial_state,
                             clients[0].train, None, clients[0].config, cfg.seed)
        shared_only.set_shared(shared)

    results = [score_site(c, shared_only, model, data[c.name], split, threshold, n_boot, cfg.seed,
                          torch_device) for c in clients]
    cross = {c.name: {d: Scores.of(data[d][split], c.predict(model, data[d][split], torch_device))
                      for d in data if len(data[d][split])} for c in clients}
    merged = merge_sites(results, [c.name for c in clients], split, threshold, n_boot, cfg.seed,
                         cross=cross)
    header = eval_header(info, split, which, "cmrfed evaluate")
    out = write_eval(info, {**header, **merged.fields}, merged.rows)
    fields = merged.fields
    print_table(console, info.method, split, fields["per_client"], fields["macro"], fields["shared_only"])
    if fields["absent"]:
        console.print(f"no metrics for {', '.join(fields['absent'])}: no subjects in their {split} split; "
                      f"pooled and macro cover {', '.join(fields['macro']['clients'])}", highlight=False)
    console.print(privacy_line(header["privacy"]), highlight=False)
    return EvalSummary(out, fields["per_client"], fields["macro"])


def print_table(console: Console, method: str, split: str, per_client: dict, macro: dict | None,
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
    if macro is not None:
        table.add_row("macro", *(fmt(macro[k]) for k in ("balanced_accuracy", "sensitivity", "specificity",
                                                         "auc", "f1", "mcc")), "", style="bold")
    console.print(table)
