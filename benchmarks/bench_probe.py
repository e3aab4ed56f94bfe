"""Linear probe: does the shipped ``tiny-pretrained`` backbone give better frozen features than
the random ``tiny`` init?

Run: ``python benchmarks/bench_probe.py [--quick]``. A fresh synthetic cohort (its own seed: not
the demo's sites, not the pretraining cohort) is prepared at the demo's settings; each frozen
encoder turns every subject's ED+ES into pooled features (the cls token and the mean of the fused
view tokens, the two inputs of cmrfed's classification head), and a logistic regression
(scikit-learn, standardised features, balanced class weights) is scored by balanced accuracy in
stratified 5-fold cross-validation over all subjects (a subject with more slices than the input
has several z windows: their features are averaged), the same folds for every encoder. The
random init is shown at several seeds, since its features depend on the draw.
"""

from __future__ import annotations

import statistics
import tomllib

import numpy as np
import torch
from common import CohortSpec, Suite, make_cohort, markdown_table, standalone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cmrfed.data.shards import SPLITS, load_manifest, load_split
from cmrfed.demo import Cohort
from cmrfed.model.cinema import TINY_PRETRAINED, load_backbone
from cmrfed.templates import template_text

NAME = "probe"
TITLE = "Linear probe on frozen encoder features"
FOLDS = 5
RANDOM_SEEDS = (0, 1, 2, 3, 4)  # the random init's features depend on its draw: show the spread


def cohort_spec(quick: bool) -> CohortSpec:
    """The demo's cohort and preparation (``cmrfed demo``), at a seed of its own."""
    demo, prepare = Cohort(), tomllib.loads(template_text("demo"))["prepare"]
    return CohortSpec(subjects=24 if quick else demo.subjects_per_dataset, shape=tuple(prepare["shape"]),
                      spacing=tuple(prepare["spacing"]), synth_shape=demo.shape, frames=demo.frames, seed=7)


def load_all(prepared) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every subject of every client and split: model inputs (windows, 2, X, Y, Z), the subject
    of each window, and one label per subject."""
    manifest = load_manifest(prepared)
    images, owners, labels = [], [], []
    for client in manifest.clients:
        for split in SPLITS:
            arrays = load_split(prepared, client, split)
            images.append(arrays.images)
            owners.append(arrays.window_subject + sum(len(x) for x in labels))
            labels.append(arrays.labels)
    return (torch.from_numpy(np.concatenate(images)), np.concatenate(owners),
            np.concatenate(labels))


@torch.no_grad()
def features(spec: str, seed: int, images: torch.Tensor, owners: np.ndarray) -> np.ndarray:
    """Per subject: [cls, mean fused view token], averaged over the subject's windows."""
    encoder = load_backbone(spec, input_shape=tuple(images.shape[2:]), seed=seed).eval()
    out = []
    for start in range(0, len(images), 32):
        cls, tokens = encoder(images[start:start + 32])
        out.append(torch.cat([cls, tokens.mean(dim=1)], dim=1))
    per_window = torch.cat(out).double().numpy()
    sums = np.zeros((owners.max() + 1, per_window.shape[1]))
    np.add.at(sums, owners, per_window)
    return sums / np.bincount(owners)[:, None]


def probe_scores(x: np.ndarray, y: np.ndarray) -> list[float]:
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    scores = []
    for train, test in folds.split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced"))
        model.fit(x[train], y[train])
        scores.append(float(balanced_accuracy_score(y[test], model.predict(x[test]))))
    return scores


def run(suite: Suite) -> str:
    spec = cohort_spec(suite.quick)
    prepared = make_cohort(suite.scratch / "probe-cohort", spec)
    images, owners, labels = load_all(prepared)
    suite.console.log(f"{len(labels)} subjects, {int(labels.sum())} positive")
    encoders = [(TINY_PRETRAINED, 0)] + [("tiny", seed) for seed in RANDOM_SEEDS]
    rows, per_fold = [], {}
    for name, seed in encoders:
        scores = probe_scores(features(name, seed, images, owners), labels)
        per_fold[(name, seed)] = scores
        label = name if name == TINY_PRETRAINED else f"{name} (random init, seed {seed})"
        rows.append([label, f"{statistics.mean(scores):.3f}", f"{statistics.stdev(scores):.3f}",
                     " ".join(f"{s:.2f}" for s in scores)])
        suite.console.log(f"{label}: {statistics.mean(scores):.3f}")
    shipped = per_fold[(TINY_PRETRAINED, 0)]
    randoms = [statistics.mean(v) for k, v in per_fold.items() if k[0] == "tiny"]
    gaps = [statistics.mean(shipped) - r for r in randoms]
    columns = ["frozen encoder", "balanced accuracy (mean of 5 folds)", "sd over folds", "per fold"]
    return (
        f"## Linear probe, {spec.describe()}\n\n"
        f"{len(labels)} subjects ({int(labels.sum())} with disease), all clients and splits pooled; "
        f"features = [cls token, mean of fused view tokens] of the frozen encoder (2 x 96 = 192); "
        f"logistic regression on standardised features, balanced class weights, stratified "
        f"{FOLDS}-fold cross-validation (same folds for every encoder).\n\n"
        + markdown_table(columns, rows)
        + f"\n\nShipped minus random init: {min(gaps):+.3f} to {max(gaps):+.3f} over the "
        f"{len(randoms)} random seeds (random init: mean {statistics.mean(randoms):.3f}, best "
        f"{max(randoms):.3f}).\n"
    )


def main() -> None:
    standalone(NAME, TITLE, run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
