"""Metrics against scikit-learn (an independent implementation) and the bootstrap's contract."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from cmrfed.metrics import (
    COUNT_KEYS,
    METRICS,
    binary_metrics,
    bootstrap_ci,
    roc_curve_points,
    youden_threshold,
)


def _random_case(seed: int, n: int = 200, rounding: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative probabilities, rounded so that ties occur (AUC tie handling)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(0.35 * labels + 0.65 * rng.random(n), 0.0, 1.0).round(rounding)
    return labels, probs


def _sklearn_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (probs >= threshold).astype(int)
    return {
        "balanced_accuracy": skm.balanced_accuracy_score(labels, predicted),
        "sensitivity": skm.recall_score(labels, predicted, pos_label=1),
        "specificity": skm.recall_score(labels, predicted, pos_label=0),
        "auc": skm.roc_auc_score(labels, probs),
        "f1": skm.f1_score(labels, predicted),
        "mcc": skm.matthews_corrcoef(labels, predicted),
        "accuracy": skm.accuracy_score(labels, predicted),
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.71])
def test_metrics_equal_sklearn_on_random_data(seed: int, threshold: float) -> None:
    labels, probs = _random_case(seed)
    ours = binary_metrics(labels, probs, threshold=threshold)
    reference = _sklearn_metrics(labels, probs, threshold)
    for name in METRICS:
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name
    assert ours["n"] == labels.size
    assert ours["n_pos"] == labels.sum()
    assert ours["n_neg"] == labels.size - labels.sum()
    assert ours["threshold"] == threshold
    assert set(ours) == set(METRICS) | set(COUNT_KEYS)


def test_threshold_is_inclusive() -> None:
    # prob == threshold is called abnormal: both subjects are then correct.
    metrics = binary_metrics([1, 0], [0.5, 0.49], threshold=0.5)
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == 1.0


def test_hand_computed_confusion_table() -> None:
    # TP=2 (0.9, 0.6), FN=1 (0.2), TN=2 (0.1, 0.3), FP=1 (0.7).
    labels = [1, 1, 1, 0, 0, 0]
    probs = [0.9, 0.6, 0.2, 0.1, 0.3, 0.7]
    metrics = binary_metrics(labels, probs)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(4 / 6)
    assert metrics["mcc"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    # positive beats negative in 7 of 9 pairs (0.2 loses to 0.3 and 0.7; 0.6 loses to 0.7)
    assert metrics["auc"] == pytest.approx(6 / 9)


def test_no_positive_subject_gives_nan_not_zero() -> None:
    metrics = binary_metrics([0, 0, 0], [0.1, 0.6, 0.2])
    for name in ("sensitivity", "balanced_accuracy", "auc", "mcc"):
        assert math.isnan(metrics[name]), name
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["f1"] == 0.0  # 2TP / (2TP + FP + FN) = 0 / 1: one false alarm, defined
    # no positive label AND no positive prediction: F1 = 0 / 0, undefined
    assert math.isnan(binary_metrics([0, 0], [0.1, 0.2])["f1"])


def test_no_negative_subject_gives_nan_specificity_and_auc() -> None:
    metrics = binary_metrics([1, 1, 1], [0.1, 0.6, 0.9])
    for name in ("specificity", "balanced_accuracy", "auc", "mcc"):
        assert math.isnan(metrics[name]), name
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(skm.f1_score([1, 1, 1], [0, 1, 1]))


def test_constant_prediction_gives_nan_mcc_where_sklearn_says_zero() -> None:
    labels = [1, 0, 1, 0]
    metrics = binary_metrics(labels, [0.1, 0.2, 0.3, 0.4])  # nobody called abnormal
    assert math.isnan(metrics["mcc"])
    assert skm.matthews_corrcoef(labels, [0, 0, 0, 0]) == 0.0  # the silent 0 we refuse
    assert metrics["f1"] == 0.0  # defined: positives exist, none found
    assert metrics["balanced_accuracy"] == 0.5


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1], [0.5], "differ in length"),
        ([], [], "empty"),
        ([0, 2], [0.1, 0.2], "0 \\(normal\\) or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
    ],
)
def test_bad_input_is_refused(labels, probs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binary_metrics(labels, probs)


def test_roc_points_equal_sklearn() -> None:
    labels, probs = _random_case(3, rounding=1)
    fpr, tpr, thresholds = roc_curve_points(labels, probs)
    ref_fpr, ref_tpr, ref_thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:])
    assert np.isinf(thresholds[0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(skm.roc_auc_score(labels, probs))


def test_youden_threshold_maximises_j_over_every_observed_score() -> None:
    labels, probs = _random_case(4, n=120)
    best = youden_threshold(labels, probs)

    def youden(t: float) -> float:
        metrics = binary_metrics(labels, probs, threshold=t)
        return metrics["sensitivity"] + metrics["specificity"] - 1.0

    assert best in probs
    assert youden(best) == pytest.approx(max(youden(t) for t in np.unique(probs)))


def test_youden_threshold_on_hand_example() -> None:
    # Perfect separation between 0.4 and 0.6: J = 1 first reached at 0.6 (highest of the ties).
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9]) == 0.6


@pytest.fixture(scope="module")
def case_500() -> tuple[np.ndarray, np.ndarray]:
    return _random_case(11, n=500)


def test_bootstrap_ci_contains_point_estimate_and_is_ordered(case_500) -> None:
    labels, probs = case_500
    point = binary_metrics(labels, probs)
    intervals = bootstrap_ci(labels, probs, n_boot=500, seed=1)
    assert set(intervals) == set(METRICS)
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high, name
        assert low < high, name


def test_bootstrap_ci_is_deterministic_per_seed(case_500) -> None:
    labels, probs = case_500
    first = bootstrap_ci(labels, probs, n_boot=300, seed=7)
    assert bootstrap_ci(labels, probs, n_boot=300, seed=7) == first
    assert bootstrap_ci(labels, probs, n_boot=300, seed=8) != first


def test_bootstrap_auc_replicates_equal_sklearn(case_500) -> None:
    """The vectorised AUC of each replicate equals roc_auc_score on that resample."""
    from cmrfed.metrics import replicate_metrics, stratified_draws

    labels, probs = case_500
    pos_draw, neg_draw = stratified_draws(labels, 5, np.random.default_rng(3))
    replicates = replicate_metrics(labels, probs, 0.5, pos_draw, neg_draw)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    for r in range(5):
        subjects = np.r_[pos[pos_draw[r]], neg[neg_draw[r]]]
        expected = _sklearn_metrics(labels[subjects], probs[subjects], 0.5)
        for name in METRICS:
            assert replicates[name][r] == pytest.approx(expected[name], abs=1e-12), name


def test_stratification_keeps_both_classes_even_when_rare() -> None:
    # 3 positives in 200: an unstratified bootstrap would lose them all in ~22% of replicates
    # ((197/200)**200) and leave sensitivity/AUC undefined; stratified, it never does.
    rng = np.random.default_rng(5)
    labels = np.zeros(200, dtype=int)
    labels[:3] = 1
    probs = rng.random(200)
    intervals = bootstrap_ci(labels, probs, n_boot=400, seed=0)
    for name in ("sensitivity", "auc", "balanced_accuracy"):
        assert all(np.isfinite(intervals[name])), name
    # sensitivity can only take the values k/3 in a replicate with exactly 3 positives
    for bound in intervals["sensitivity"]:
        assert min(abs(bound - k / 3) for k in range(4)) < 1e-12


def test_bootstrap_of_one_class_data_gives_nan_interval_for_undefined_metrics() -> None:
    intervals = bootstrap_ci([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.3], n_boot=50)
    assert all(math.isnan(v) for v in intervals["auc"])
    assert all(math.isnan(v) for v in intervals["sensitivity"])
    assert all(np.isfinite(intervals["specificity"]))


def test_bootstrap_1000_replicates_on_500_subjects_is_fast(case_500) -> None:
    labels, probs = case_500
    bootstrap_ci(labels, probs, n_boot=50)  # warm-up (imports, allocator)
    start = time.perf_counter()
    bootstrap_ci(labels, probs, n_boot=1000)
    assert time.perf_counter() - start < 1.0
