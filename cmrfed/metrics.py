"""Binary classification metrics (abnormal = label 1, normal = label 0) and stratified bootstrap CIs.

Every metric is computed in one place, :func:`_metrics_from_counts`, over arrays of confusion
counts, so the point estimate and each bootstrap replicate share one definition.

Undefined values are NaN, never a silent 0 (scikit-learn's ``zero_division`` default would
return 0, which reads as "measured and terrible" instead of "not measurable"):

- ``sensitivity`` is NaN when there is no positive (label 1) subject; ``specificity`` when there
  is no negative one; ``balanced_accuracy`` (their mean) is NaN when either is.
- ``auc`` is NaN unless both classes are present.
- ``f1`` = 2TP / (2TP + FP + FN) is NaN when that denominator is 0 (no positive label and no
  positive prediction).
- ``mcc`` is NaN when any margin of the confusion table is 0 (all labels, or all predictions,
  in one class): the correlation with a constant is undefined.
- ``accuracy`` is always defined (empty input is refused).

A subject is predicted abnormal when ``prob >= threshold``.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

METRICS: Final[tuple[str, ...]] = (
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "auc",
    "f1",
    "mcc",
    "accuracy",
)
"""The metric keys, named once; :func:`binary_metrics` and :func:`bootstrap_ci` return these."""

COUNT_KEYS: Final[tuple[str, ...]] = ("n", "n_pos", "n_neg", "threshold")
"""Bookkeeping keys :func:`binary_metrics` returns next to :data:`METRICS`."""


def validate_binary(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int8], NDArray]:
    """Return (labels as 0/1 int8, scores as float64) or raise ValueError naming what is wrong.

    Shared by the metrics and the tests so that every entry point refuses the same bad input:
    a length mismatch, an empty set, a label other than 0/1, or a non-finite score.
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size == 0:
        raise ValueError("no subjects: labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int8), s


def _divide(num: NDArray, den: NDArray) -> NDArray:
    """num / den with NaN where den == 0 (an undefined metric), without a warning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _metrics_from_counts(
    tp: NDArray, fn: NDArray, tn: NDArray, fp: NDArray, auc: NDArray
) -> dict[str, NDArray]:
    """Every metric of :data:`METRICS` from confusion counts (any matching array shape)."""
    tp, fn, tn, fp = (np.asarray(c, dtype=np.float64) for c in (tp, fn, tn, fp))
    sensitivity = _divide(tp, tp + fn)
    specificity = _divide(tn, tn + fp)
    margins = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return {
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "auc": np.asarray(auc, dtype=np.float64),
        "f1": _divide(2.0 * tp, 2.0 * tp + fp + fn),
        "mcc": _divide(tp * tn - fp * fn, np.sqrt(margins)),
        "accuracy": _divide(tp + tn, tp + tn + fp + fn),
    }


def _mann_whitney_auc(pos_codes: NDArray, neg_codes: NDArray, n_codes: int) -> NDArray:
    """AUC of each row pair (positives, negatives), ties counted 1/2, as a (rows,) array.

    ``*_codes`` are integer ranks of the scores (equal score, equal code), shape (rows, n_pos)
    and (rows, n_neg). Shifting row r by r * n_codes makes the rows disjoint, so one sort and
    two searchsorted calls count, for every positive of every row, the negatives of its own
    row below it and tied with it: O(rows * n log n) with no per-row Python loop.
    """
    rows, n_pos = pos_codes.shape
    n_neg = neg_codes.shape[1]
    if n_pos == 0 or n_neg == 0:
        return np.full(rows, np.nan)
    offset = (np.arange(rows, dtype=np.int64) * n_codes)[:, None]
    sorted_neg = np.sort((neg_codes + offset).ravel())
    keys = (pos_codes + offset).ravel()
    row_start = np.repeat(np.arange(rows, dtype=np.int64) * n_neg, n_pos)
    below = np.searchsorted(sorted_neg, keys, side="left") - row_start
    below_or_tied = np.searchsorted(sorted_neg, keys, side="right") - row_start
    placements = (below + below_or_tied).reshape(rows, n_pos) / 2.0
    return placements.sum(axis=1) / (n_pos * n_neg)


def _score_codes(scores: NDArray) -> tuple[NDArray[np.int64], int]:
    """Integer rank codes of the scores (ties share a code) and the number of distinct codes."""
    unique, codes = np.unique(scores, return_inverse=True)
    return codes.astype(np.int64), int(unique.size)


def replicate_metrics(
    y: NDArray, scores: NDArray, threshold: float, pos_draw: NDArray, neg_draw: NDArray
) -> dict[str, NDArray]:
    """Metrics of each resample; row r takes positives ``pos_draw[r]``, negatives ``neg_draw[r]``.

    ``y`` and ``scores`` are as returned by :func:`validate_binary`.

    The draws index into the positive and the negative subjects separately (stratification);
    resampling both arms of a paired comparison with the same draws keeps them paired.
    """
    pos_idx = np.flatnonzero(y == 1)
    neg_idx = np.flatnonzero(y == 0)
    predicted = scores >= threshold
    tp = predicted[pos_idx][pos_draw].sum(axis=1)
    fp = predicted[neg_idx][neg_draw].sum(axis=1)
    codes, n_codes = _score_codes(scores)
    auc = _mann_whitney_auc(codes[pos_idx][pos_draw], codes[neg_idx][neg_draw], n_codes)
    return _metrics_from_counts(tp=tp, fn=pos_draw.shape[1] - tp, tn=neg_draw.shape[1] - fp, fp=fp, auc=auc)


def stratified_draws(
    y: NDArray, n_boot: int, rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Resampling indices (n_boot, n_pos) into the positives and (n_boot, n_neg) into the negatives.

    Each replicate keeps the observed class counts, so every replicate has both classes whenever
    the data do and class-conditional metrics (sensitivity, AUC) are always defined.
    """
    n_pos = int((y == 1).sum())
    n_neg = int(y.size - n_pos)
    pos_draw = rng.integers(0, n_pos, size=(n_boot, n_pos)) if n_pos else np.empty((n_boot, 0))
    neg_draw = rng.integers(0, n_neg, size=(n_boot, n_neg)) if n_neg else np.empty((n_boot, 0))
    return pos_draw.astype(np.int64), neg_draw.astype(np.int64)


def binary_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of :data:`METRICS` plus n, n_pos, n_neg and the threshold used.

    See the module docstring for when a metric is NaN.
    """
    y, scores = validate_binary(labels, probs)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    # One "replicate" that takes every subject once: the observed sample itself.
    every_pos = np.arange(n_pos)[None, :]
    every_neg = np.arange(n_neg)[None, :]
    values = replicate_metrics(y, scores, threshold, every_pos, every_neg)
    result = {name: float(values[name][0]) for name in METRICS}
    result.update(n=float(y.size), n_pos=float(n_pos), n_neg=float(n_neg), threshold=threshold)
    return result


def _percentile_interval(samples: NDArray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the finite samples; (NaN, NaN) when none is finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return (float("nan"), float("nan"))
    low, high = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


def bootstrap_ci(
    labels: ArrayLike,
    probs: ArrayLike,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Stratified-bootstrap percentile (1 - alpha) intervals for every metric of :data:`METRICS`.

    Positives and negatives are resampled separately (class counts fixed), all replicates at
    once. Replicates where a metric is undefined (e.g. F1 with no positive prediction) are left
    out of that metric's interval; a metric undefined in every replicate gets (NaN, NaN).
    Deterministic for a given seed (``np.random.default_rng(seed)``).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    y, scores = validate_binary(labels, probs)
    pos_draw, neg_draw = stratified_draws(y, n_boot, np.random.default_rng(seed))
    replicates = replicate_metrics(y, scores, threshold, pos_draw, neg_draw)
    return {name: _percentile_interval(replicates[name], alpha) for name in METRICS}


def roc_curve_points(
    labels: ArrayLike, probs: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(fpr, tpr, thresholds) at every distinct score, thresholds descending, for plotting.

    The first point is (0, 0) at threshold +inf; point k is the rule ``prob >= thresholds[k]``.
    Needs both classes (a rate over an empty class is undefined).
    """
    y, scores = validate_binary(labels, probs)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("an ROC curve needs both classes (labels 0 and 1)")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tps = np.cumsum(y[order])
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = tps[last_of_tie]
    fps = (last_of_tie + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, sorted_scores[last_of_tie]]
    return fpr, tpr, thresholds


def youden_threshold(labels: ArrayLike, probs: ArrayLike) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 on the given (val) data.

    The result is one of the observed scores, so ``prob >= threshold`` reproduces the optimum on
    these data; among equally good thresholds the highest (fewest positive calls) is returned.
    """
    fpr, tpr, thresholds = roc_curve_points(labels, probs)
    youden = tpr[1:] - fpr[1:]  # drop the +inf point: it calls nobody abnormal
    return float(thresholds[1:][int(np.argmax(youden))])
