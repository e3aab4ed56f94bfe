"""The evaluation library: one site scored at a time, and the merge of those per-site results
into ``RUN/eval/`` (the commands are :mod:`cmrfed.eval.evaluate_run` and
:mod:`cmrfed.eval.evaluate_site`).

A consortium never pools: each site scores its own model (backbone + the run's shared tensors +
its private tensors) and the shared-only model on its own data, and sends on only metrics and,
if it agrees, its per-subject predictions. :func:`score_site` is that per-site step;
:func:`merge_sites` combines the results into the metrics ``compare`` reads. The pooled
``cmrfed evaluate RUN`` runs exactly these two functions (plus the cross-site matrix, which
needs every site's private model and so exists only when the private tensors were pooled), so
a merged evaluation equals the pooled one bit for bit:

- probabilities are float64 everywhere (written and read back with ``repr``, which round-trips);
- every bootstrap is seeded by the run seed alone (:func:`bootstrap_seed`), never by which
  process computes it;
- sites are merged in the run's site order (run.json), whatever order they arrive in.

A site that sends metrics only contributes its own metrics to ``per_client`` and ``macro``;
``pooled`` then covers only the sites that sent predictions and says which (``pooled.clients``).
A site with no subjects in the evaluated split has no metrics at all: it is listed under
``absent`` with the reason, and ``pooled`` and ``macro`` name the clients they cover.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmrfed.errors import DataError, UsageError
from cmrfed.eval.metrics import METRICS, binary_metrics, bootstrap_ci, youden_threshold
from cmrfed.fed.client import Client, SplitTensors

SHARED_MODEL = "shared"
THRESHOLD_MODES = ("0.5", "youden-val")
PREDICTION_COLUMNS = ("subject", "client", "model", "split", "label", "probability", "prediction",
                      "threshold")
# how a site took part in the run it is scored against
MEMBER, HELD_OUT, ADAPTED = "member", "held-out", "adapted"


def bootstrap_seed(run_seed: int) -> int:
    """The seed of every bootstrap of an evaluation: the run seed, whichever process computes it
    (a site, the merge or the pooled evaluation), so their intervals agree exactly."""
    return int(run_seed)


@dataclass(frozen=True, eq=False)
class Scores:
    """One model's probabilities on one site's split."""

    subject_ids: tuple[str, ...]
    labels: np.ndarray  # int64
    probs: np.ndarray  # float64

    @classmethod
    def of(cls, split: SplitTensors, probs: np.ndarray) -> Scores:
        return cls(tuple(split.subject_ids), split.labels.numpy().astype(np.int64),
                   np.asarray(probs, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class SiteResult:
    """What one site sends from its own evaluation.

    ``own`` (its own model on the evaluated split) and ``shared`` (the shared-only model, by
    split: the evaluated one, and ``val`` when the shared model's Youden threshold is chosen at
    the merge) are None when the site sends metrics only.
    """

    client: str
    participation: str
    threshold: float
    metrics: dict[str, Any]
    shared_metrics: dict[str, float] | None
    own: Scores | None
    shared: dict[str, Scores] | None
    absent: str | None = None  # why the site has no metrics (no subjects in the split)

    @property
    def metrics_only(self) -> bool:
        return self.own is None and self.absent is None


def with_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    """Point metrics and their stratified bootstrap 95% intervals."""
    metrics: dict[str, Any] = binary_metrics(labels, probs, threshold=threshold)
    intervals = bootstrap_ci(labels, probs, threshold=threshold, n_boot=n_boot, seed=seed)
    metrics["ci95"] = {k: list(v) for k, v in intervals.items()}
    return metrics


def check_threshold(mode: str, metrics_only: bool = False) -> None:
    if mode not in THRESHOLD_MODES:
        raise UsageError(f"--threshold must be one of {', '.join(THRESHOLD_MODES)}")
    if metrics_only and mode != "0.5":
        raise UsageError("--metrics-only needs --threshold 0.5: with youden-val the shared-only model's "
                         "threshold is chosen on every site's val predictions at the merge")


def score_site(
    model_owner: Client,
    shared_owner: Client | None,
    model: Any,
    data: Mapping[str, SplitTensors],
    split: str,
    threshold: str,
    n_boot: int,
    seed: int,
    device: Any,
    participation: str = MEMBER,
    metrics_only: bool = False,
) -> SiteResult:
    """A site's own model and the shared-only model on its own ``split`` (and val when needed).

    With ``threshold="youden-val"`` the own model's threshold is chosen on this site's val split
    here; the shared-only model's is chosen at the merge over every site's val predictions.
    """
    check_threshold(threshold, metrics_only)
    name = model_owner.name
    if len(data[split]) == 0:
        return SiteResult(name, participation, 0.5, {}, None, None, None,
                          absent=f"no subjects in its {split} split")
    own = Scores.of(data[split], model_owner.predict(model, data[split], device))
    own_threshold = 0.5
    if threshold == "youden-val":
        val = Scores.of(data["val"], model_owner.predict(model, data["val"], device))
        if len(np.unique(val.labels)) < 2:
            raise DataError(f"--threshold youden-val: the val split of {name!r} lacks one class")
        own_threshold = float(youden_threshold(val.labels, val.probs))
    metrics = with_ci(own.labels, own.probs, own_threshold, n_boot, bootstrap_seed(seed))
    shared: dict[str, Scores] | None = None
    shared_metrics = None
    if shared_owner is not None:
        parts = (split, "val") if threshold == "youden-val" else (split,)
        shared = {part: Scores.of(data[part], shared_owner.predict(model, data[part], device))
                  for part in dict.fromkeys(parts)}
        if threshold == "0.5":
            shared_metrics = binary_metrics(shared[split].labels, shared[split].probs, 0.5)
    if metrics_only:
        return SiteResult(name, participation, own_threshold, metrics, shared_metrics, None, None)
    return SiteResult(name, participation, own_threshold, metrics, shared_metrics, own, shared)


def json_ready(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null; numpy scalars as Python ones."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _nanmean(values: list[float]) -> float:
    """Mean over clients where the metric is defined; NaN (no warning) when it is nowhere."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass(frozen=True)
class Merged:
    """The evaluation fields that per-site results determine (metrics.json) and the rows."""

    fields: dict[str, Any]
    rows: list[tuple]


def merge_sites(
    results: Sequence[SiteResult],
    order: Sequence[str],
    split: str,
    threshold: str,
    n_boot: int,
    seed: int,
    cross: Mapping[str, Mapping[str, Scores]] | None = None,
) -> Merged:
    """Per-client, pooled, macro and shared-only metrics and the prediction rows, from per-site
    results in the run's site ``order``. ``cross[model][data]`` (pooled evaluation only) adds
    the cross-site matrix and its rows."""
    check_threshold(threshold)
    by_name = {r.client: r for r in results}
    if sorted(by_name) != sorted(order) or len(results) != len(order):
        raise DataError(f"the per-site results name {sorted(r.client for r in results)}, the run has "
                        f"{list(order)}; merge exactly one result per site of the run")
    absent = {r.client: r.absent for r in results if r.absent is not None}
    if len(absent) == len(order):
        raise DataError(f"no client has {split} subjects; re-run `cmrfed prepare` with other --split "
                        "fractions or more subjects")
    sites = [by_name[c] for c in order]
    thresholds = {r.client: r.threshold for r in sites}
    has_shared = any(r.shared is not None or r.shared_metrics is not None for r in sites)
    if has_shared:
        if threshold == "0.5":
            thresholds[SHARED_MODEL] = 0.5
        else:
            with_val = [r for r in sites if r.shared is not None]
            y = np.concatenate([r.shared["val"].labels for r in with_val])  # type: ignore[index]
            p = np.concatenate([r.shared["val"].probs for r in with_val])  # type: ignore[index]
            if len(np.unique(y)) < 2:
                raise DataError(f"--threshold youden-val: the val split of {SHARED_MODEL!r} lacks one class")
            thresholds[SHARED_MODEL] = float(youden_threshold(y, p))

    rows: list[tuple] = []

    def add_rows(model_name: str, data_client: str, scores: Scores) -> None:
        t = thresholds[model_name]
        for sid, label, prob in zip(scores.subject_ids, scores.labels, scores.probs, strict=True):
            rows.append((sid, data_client, model_name, split, int(label), float(prob), int(prob >= t), t))

    per_client, shared_rows = {}, {}
    for r in sites:
        if r.absent is not None:
            continue
        per_client[r.client] = r.metrics
        if r.own is not None:
            add_rows(r.client, r.client, r.own)
        if r.shared is not None:
            add_rows(SHARED_MODEL, r.client, r.shared[split])
            shared_rows[r.client] = binary_metrics(r.shared[split].labels, r.shared[split].probs,
                                                   thresholds[SHARED_MODEL])
        elif r.shared_metrics is not None:
            shared_rows[r.client] = r.shared_metrics
    cross_site = None
    if cross is not None:
        cross_site = {}
        for m in order:
            cross_site[m] = {}
            for d in (c for c in order if c not in absent):
                scores = cross[m][d]
                cross_site[m][d] = binary_metrics(scores.labels, scores.probs, thresholds[m])
                if m != d:
                    add_rows(m, d, scores)

    covered = [r for r in sites if r.own is not None]
    pooled: dict[str, Any] = {"clients": [r.client for r in covered]}
    if covered:
        y_all = np.concatenate([r.own.labels for r in covered])  # type: ignore[union-attr]
        p_all = np.concatenate([r.own.probs for r in covered])  # type: ignore[union-attr]
        # pooled over subjects: each subject judged by its own site's model and threshold
        if threshold == "0.5":
            pooled.update(with_ci(y_all, p_all, 0.5, n_boot, bootstrap_seed(seed)))
        else:  # thresholds differ per site: only the threshold-free AUC is lost, so drop it
            predicted = np.concatenate([(r.own.probs >= r.threshold).astype(float)  # type: ignore[union-attr]
                                        for r in covered])
            pooled.update({**binary_metrics(y_all, predicted, 0.5), "auc": float("nan"),
                           "note": "each subject thresholded by its own site's Youden threshold; "
                                   "AUC not pooled"})
    if any(r.metrics_only for r in sites):
        pooled["note_sites"] = ("sites " + ", ".join(r.client for r in sites if r.metrics_only)
                                + " sent metrics only: pooled covers the others")
    macro: dict[str, Any] = {m: _nanmean([per_client[c][m] for c in per_client]) for m in METRICS}
    macro["clients"] = list(per_client)
    fields = {
        "threshold": {"mode": threshold, "per_model": thresholds},
        "n_boot": n_boot,
        "per_client": per_client,
        "absent": absent,
        "pooled": pooled,
        "macro": macro,
        "cross_site": cross_site,
        "shared_only": shared_rows or None,
        "test_subjects": {r.client: list(r.own.subject_ids) if r.own is not None else None for r in sites},
        "sources": {r.client: "absent" if r.absent else "metrics" if r.own is None else "predictions"
                    for r in sites},
    }
    return Merged(fields, sorted(rows, key=lambda row: (row[2], row[1], row[0])))


# --- a site's result as files: SITE_EVAL/site_eval.json and SITE_EVAL/predictions.csv ------------
def write_predictions(path: Path, rows: Sequence[tuple]) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows(rows)


def site_rows(result: SiteResult, split: str) -> list[tuple]:
    """A site's prediction rows: its own model on ``split``, the shared-only model on ``split``
    (and on val when its threshold is chosen at the merge); thresholds as the site knows them."""
    rows: list[tuple] = []
    if result.own is None:
        return rows
    parts: list[tuple[str, str, Scores, float]] = [(result.client, split, result.own, result.threshold)]
    for part, scores in (result.shared or {}).items():
        parts.append((SHARED_MODEL, part, scores, 0.5))
    for model_name, part, scores, t in parts:
        for sid, label, prob in zip(scores.subject_ids, scores.labels, scores.probs, strict=True):
            rows.append((sid, result.client, model_name, part, int(label), float(prob), int(prob >= t), t))
    return rows


def scores_from_rows(rows: Sequence[Mapping[str, str]], model_name: str, part: str) -> Scores | None:
    """The Scores of ``model_name`` on ``part`` among a site's prediction rows (file order)."""
    chosen = [r for r in rows if r["model"] == model_name and r["split"] == part]
    if not chosen:
        return None
    return Scores(tuple(r["subject"] for r in chosen),
                  np.array([int(r["label"]) for r in chosen], dtype=np.int64),
                  np.array([float(r["probability"]) for r in chosen], dtype=np.float64))


def read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = set(PREDICTION_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: missing columns {sorted(missing)}")
            return list(reader)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable predictions ({exc})") from exc
