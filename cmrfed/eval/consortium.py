"""``cmrfed inspect``: how non-IID a consortium is, measured before anyone trains.

Why: a private adapter pays only where sites differ in a way a shared model cannot absorb, and a
user should see where their consortium sits before spending a GPU week. From a PREPARED folder
(real data or synthetic) this measures, per site:

- **label shift**: subjects, the normal/abnormal mix, and the Jensen-Shannon divergence (base 2,
  so 0 = the pooled mix, 1 = disjoint labels) between the site's mix and the pooled mix;
- **appearance**: the Wasserstein-1 distance between two sites' intensity distributions (the
  model-input values in [0, 1], all voxels of all subjects, as a 64-bin histogram);
- **site identifiability**: how well the site can be told from a subject's frozen backbone
  features (the mean of the fused view tokens and the cls token, what the classification head
  reads): the cross-validated balanced accuracy of a multinomial logistic regression predicting
  the site (stratified k-fold, k <= 5). Chance is 1 / sites; near chance means the encoder sees
  no site at all, near 1 means every scan carries its site;
- **transfer of a linear probe**: a logistic regression of normal/abnormal on one site's frozen
  features, scored (balanced accuracy) on each other site's subjects; the diagonal is the
  site's own k-fold cross-validation. A row much lower off the diagonal than on it means the
  decision rule does not carry over (label or concept shift, or appearance the features keep).

The classifiers are small L2-regularised logistic regressions fitted in torch (L-BFGS, full
batch, class-balanced loss, features standardised on the training fold), so nothing beyond the
run-time dependencies is needed; every fold assignment comes from ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from cmrfed import paths
from cmrfed.atomic import read_json_or_none, write_json
from cmrfed.data.shards import SPLITS, load_manifest, load_split
from cmrfed.errors import UsageError
from cmrfed.fed.task import resolve_device
from cmrfed.model.cinema import backbone_fingerprint, load_backbone
from cmrfed.outputs import INSPECT, new_output
from cmrfed.provenance import versions

INSPECT_FORMAT_VERSION = 1
HISTOGRAM_BINS = 64
MAX_FOLDS = 5
L2 = 1e-2  # ridge on the standardised features' weights
DIVERGENCE = "Jensen-Shannon divergence (base 2; 0 = the pooled mix, 1 = disjoint)"
INTENSITY_DISTANCE = (f"Wasserstein-1 distance between the sites' model-input intensity distributions "
                      f"([0, 1], {HISTOGRAM_BINS}-bin histograms of every voxel)")


@dataclass(frozen=True)
class SiteFeatures:
    """One site: its subjects (every split), their labels, frozen features and intensity histogram."""

    client: str
    subject_ids: tuple[str, ...]
    labels: np.ndarray  # (n,)
    features: np.ndarray  # (n, F)
    histogram: np.ndarray  # (HISTOGRAM_BINS,) voxel counts


@torch.no_grad()
def _subject_features(encoder: torch.nn.Module, images: np.ndarray, window_subject: np.ndarray,
                      n_subjects: int, device: torch.device, batch_size: int) -> np.ndarray:
    """(n_subjects, 2D): [mean fused view token, cls] per row, averaged over a subject's windows."""
    rows = []
    for begin in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[begin:begin + batch_size]).to(device, torch.float32)
        cls, tokens = encoder(batch)
        rows.append(torch.cat([tokens.mean(dim=1), cls], dim=1).double().cpu())
    per_row = torch.cat(rows).numpy() if rows else np.zeros((0, 2 * encoder.embed_dim))
    out = np.zeros((n_subjects, per_row.shape[1]))
    np.add.at(out, window_subject, per_row)
    return out / np.bincount(window_subject, minlength=n_subjects)[:, None]


def site_features(prepared: Path, backbone: str, seed: int, device: torch.device,
                  batch_size: int = 4) -> tuple[list[SiteFeatures], str]:
    """Every site's subjects through the frozen backbone; and the backbone's fingerprint."""
    manifest = load_manifest(prepared)
    encoder = load_backbone(backbone, input_shape=manifest.shape, seed=seed).to(device).eval()
    sites = []
    for client in manifest.clients:
        ids: list[str] = []
        labels, features = [], []
        histogram = np.zeros(HISTOGRAM_BINS)
        for split in SPLITS:
            arrays = load_split(prepared, client, split)
            if not arrays.subject_ids:
                continue
            ids += arrays.subject_ids
            labels.append(arrays.labels)
            histogram += np.histogram(arrays.images, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
            features.append(_subject_features(encoder, arrays.images, arrays.window_subject,
                                              len(arrays.subject_ids), device, batch_size))
        if not ids:
            continue
        sites.append(SiteFeatures(client, tuple(ids), np.concatenate(labels), np.concatenate(features),
                                  histogram))
    if len(sites) < 2:
        raise UsageError(f"{paths.manifest_path(prepared)}: inspect compares sites and needs at least two "
                         f"with subjects, found {len(sites)}")
    return sites, backbone_fingerprint(encoder)


# --- small classifiers ---------------------------------------------------------------------------


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``truth`` (NaN when it is empty)."""
    classes = np.unique(truth)
    if classes.size == 0:
        return math.nan
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in classes]))


@dataclass(frozen=True)
class LogisticModel:
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(features) - self.mean) / self.scale
        return (x @ self.weight + self.bias).argmax(dim=1).numpy()


def fit_logistic(features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = L2) -> LogisticModel:
    """A class-balanced, L2-regularised multinomial logistic regression (float64, L-BFGS from zero)."""
    x = torch.from_numpy(features).double()
    mean, scale = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-8)
    x = (x - mean) / scale
    y = torch.from_numpy(labels).long()
    counts = torch.bincount(y, minlength=n_classes).double()
    class_weight = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), 0.0)
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y, weight=class_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return LogisticModel(mean, scale, weight.detach(), bias.detach())


def stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold index per sample, each class spread evenly over the folds in a seeded order."""
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        assignment[rng.permutation(members)] = (np.arange(members.size) + offset) % folds
        offset += members.size
    return assignment


def cross_validated(features: np.ndarray, labels: np.ndarray, n_classes: int,
                    rng: np.random.Generator) -> tuple[float, np.ndarray, int]:
    """(balanced accuracy, out-of-fold predictions, folds) of a stratified k-fold cross-validation;
    k = min(5, smallest class); NaN when a class has fewer than two samples or only one class."""
    counts = np.bincount(labels, minlength=n_classes)
    present = counts[counts > 0]
    folds = int(min(MAX_FOLDS, present.min())) if present.size >= 2 else 0
    if folds < 2:
        return math.nan, np.full(len(labels), -1), folds
    assignment = stratified_folds(labels, folds, rng)
    predicted = np.empty(len(labels), dtype=np.int64)
    for fold in range(folds):
        test = assignment == fold
        model = fit_logistic(features[~test], labels[~test], n_classes)
        predicted[test] = model.predict(features[test])
    return balanced_accuracy(labels, predicted), predicted, folds


# --- the measures --------------------------------------------------------------------------------


def label_mix(sites: Sequence[SiteFeatures]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pooled_counts = np.array([sum(int((s.labels == c).sum()) for s in sites) for c in (0, 1)], dtype=float)
    pooled = pooled_counts / pooled_counts.sum()
    rows = []
    for s in sites:
        counts = np.array([int((s.labels == c).sum()) for c in (0, 1)], dtype=float)
        mix = counts / counts.sum()
        rows.append({"client": s.client, "subjects": int(counts.sum()), "normal": int(counts[0]),
                     "abnormal": int(counts[1]), "abnormal_share": float(mix[1]),
                     "label_js_divergence": float(jensenshannon(mix, pooled, base=2) ** 2)})
    return rows, {"subjects": int(pooled_counts.sum()), "abnormal_share": float(pooled[1])}


def intensity_distances(sites: Sequence[SiteFeatures]) -> np.ndarray:
    centres = (np.arange(HISTOGRAM_BINS) + 0.5) / HISTOGRAM_BINS
    n = len(sites)
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = wasserstein_distance(centres, centres, sites[i].histogram,
                                                               sites[j].histogram)
    return matrix


def identifiability(sites: Sequence[SiteFeatures], rng: np.random.Generator) -> dict[str, Any]:
    features = np.concatenate([s.features for s in sites])
    site_of = np.concatenate([np.full(len(s.labels), i) for i, s in enumerate(sites)])
    score, predicted, folds = cross_validated(features, site_of, len(sites), rng)
    recall = {s.client: float(np.mean(predicted[site_of == i] == i)) if folds else math.nan
              for i, s in enumerate(sites)}
    return {"balanced_accuracy": score, "chance": 1.0 / len(sites), "folds": folds,
            "per_site_recall": recall,
            "classifier": "multinomial logistic regression on frozen backbone features, stratified "
                          f"{folds}-fold cross-validation"}


def transfer_matrix(sites: Sequence[SiteFeatures], rng: np.random.Generator) -> dict[str, Any]:
    n = len(sites)
    matrix = np.full((n, n), math.nan)
    for i, source in enumerate(sites):
        matrix[i, i] = cross_validated(source.features, source.labels, 2, rng)[0]
        if np.unique(source.labels).size < 2:
            continue  # a probe needs both labels to learn from
        probe = fit_logistic(source.features, source.labels, 2)
        for j, target in enumerate(sites):
            if j != i:
                matrix[i, j] = balanced_accuracy(target.labels, probe.predict(target.features))
    off = matrix[~np.eye(n, dtype=bool)]
    return {"matrix": matrix.tolist(), "mean_off_diagonal": float(np.nanmean(off)) if np.isfinite(off).any()
            else math.nan,
            "rows": "the site the probe is trained on (all its subjects)",
            "columns": "the site it is scored on (balanced accuracy; the diagonal: the site's own "
                       "k-fold cross-validation)"}


# --- the report ----------------------------------------------------------------------------------


def consortium_document(prepared: Path, backbone: str, seed: int, device: torch.device) -> dict[str, Any]:
    """Every measure of the consortium in ``prepared`` as one JSON-ready dict (inspect.json)."""
    sites, fingerprint = site_features(prepared, backbone, seed, device)
    rows, pooled = label_mix(sites)
    rng = np.random.default_rng(seed)
    distances = intensity_distances(sites)
    for row, i in zip(rows, range(len(sites)), strict=True):
        others = [distances[i, j] for j in range(len(sites)) if j != i]
        row["mean_intensity_distance"] = float(np.mean(others))
    return {
        "format_version": INSPECT_FORMAT_VERSION,
        "created_by": "cmrfed inspect",
        "prepared": str(prepared),
        "manifest_sha256": load_manifest(prepared).sha256,
        "backbone": backbone,
        "backbone_fingerprint": fingerprint,
        "seed": seed,
        "clients": [s.client for s in sites],
        "sites": rows,
        "pooled": pooled,
        "divergence": DIVERGENCE,
        "intensity": {"distance": INTENSITY_DISTANCE, "matrix": distances.tolist()},
        "identifiability": identifiability(sites, rng),
        "transfer": transfer_matrix(sites, rng),
        "versions": versions(),
    }


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def headline(doc: dict[str, Any]) -> list[str]:
    """The consortium in three sentences (the study report opens with them)."""
    ident = doc["identifiability"]
    return [
        f"Consortium of {len(doc['clients'])} sites, {doc['pooled']['subjects']} subjects, pooled abnormal "
        f"share {_num(doc['pooled']['abnormal_share'], 2)}; frozen backbone `{doc['backbone']}`.",
        f"Site identifiability from frozen features: balanced accuracy {_num(ident['balanced_accuracy'])} "
        f"(chance {_num(ident['chance'])}; {ident['classifier']}).",
        f"Linear-probe transfer between sites: mean off-diagonal balanced accuracy "
        f"{_num(doc['transfer']['mean_off_diagonal'])}. Label divergence: {doc['divergence']}. "
        f"Intensity: {doc['intensity']['distance']}.",
    ]


def site_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["site", "subjects", "normal", "abnormal", "abnormal share", "label JS divergence",
              "mean intensity W1", "identified (recall)"]
    recall = doc["identifiability"]["per_site_recall"]
    rows = [[row["client"], str(row["subjects"]), str(row["normal"]), str(row["abnormal"]),
             _num(row["abnormal_share"], 2), _num(row["label_js_divergence"], 4),
             _num(row["mean_intensity_distance"], 4), _num(recall.get(row["client"]), 2)]
            for row in doc["sites"]]
    return header, rows


def transfer_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["probe trained on \\ scored on", *doc["clients"]]
    rows = [[client, *(_num(v, 2) for v in row)]
            for client, row in zip(doc["clients"], doc["transfer"]["matrix"], strict=True)]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The markdown summary (inspect.md; the study report opens with it)."""
    return [*(f"- {line}" for line in headline(doc)), "", *_md_table(*site_rows(doc)), "",
            "Transfer of a linear probe (balanced accuracy; the diagonal: the site's own "
            "cross-validation):", "", *_md_table(*transfer_rows(doc))]


def _markdown(doc: dict[str, Any]) -> str:
    return "\n".join(["# How non-IID is this consortium? (`cmrfed inspect`)", "", *summary_lines(doc), ""])


def plot_consortium(doc: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = doc["clients"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    shares = [row["abnormal_share"] for row in doc["sites"]]
    axes[0].bar(clients, shares, color="#c44e52")
    axes[0].axhline(doc["pooled"]["abnormal_share"], color="black", linestyle="--", label="pooled")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("abnormal share per site")
    axes[0].legend()
    for ax, matrix, title, vmax in (
            (axes[1], doc["intensity"]["matrix"], "intensity Wasserstein-1", None),
            (axes[2], doc["transfer"]["matrix"], "probe transfer (bal. acc.)", 1.0)):
        values = np.array(matrix, dtype=float)
        image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(len(clients)), clients, rotation=45)
        ax.set_yticks(range(len(clients)), clients)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, _num(v, 2), ha="center", va="center", color="white", fontsize=8)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    axes[2].set_xlabel("scored on")
    axes[2].set_ylabel("trained on")
    ident = doc["identifiability"]
    fig.suptitle(f"site identifiability {_num(ident['balanced_accuracy'])} (chance {_num(ident['chance'])})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect_consortium(prepared: str | Path, out: str | Path, backbone: str = "tiny-pretrained",
                       seed: int = 0, device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Measure the consortium in PREPARED and write OUT/inspect.{json,md,png} atomically."""
    prepared = Path(prepared)
    doc = consortium_document(prepared, backbone, seed, resolve_device(device))
    with new_output(out, INSPECT, overwrite) as tmp:
        write_json(paths.inspect_json_path(tmp), doc)
        paths.inspect_md_path(tmp).write_text(_markdown(doc), encoding="utf-8")
        plot_consortium(doc, paths.inspect_figure_path(tmp))
    return doc


def study_consortium(prepared: Path, out: Path, backbone: str, seed: int,
                     device: str) -> dict[str, Any] | None:
    """A study's inspection: read back from OUT when it was made of this PREPARED with this backbone
    (same manifest, same backbone name), else measured and written there; None for data of a
    single site (nothing to compare)."""
    previous = read_json_or_none(paths.inspect_json_path(out))
    manifest = load_manifest(prepared)
    if len({s.client for s in manifest.subjects}) < 2:
        return None
    if (previous is not None and previous.get("backbone") == backbone
            and previous.get("manifest_sha256") == manifest.sha256):
        return previous
    return inspect_consortium(prepared, out, backbone=backbone, seed=seed, device=device, overwrite=True)


def inspect_table(doc: dict[str, Any]) -> Table:
    """Per site, for the CLI to print."""
    ident = doc["identifiability"]
    table = Table(title=f"consortium: site identifiability {_num(ident['balanced_accuracy'])} "
                        f"(chance {_num(ident['chance'])}), probe transfer "
                        f"{_num(doc['transfer']['mean_off_diagonal'])}")
    for column in ("site", "subjects", "abnormal share", "label JS div.", "mean intensity W1"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for row in doc["sites"]:
        table.add_row(row["client"], str(row["subjects"]), _num(row["abnormal_share"], 2),
                      _num(row["label_js_divergence"], 4), _num(row["mean_intensity_distance"], 4))
    return table
