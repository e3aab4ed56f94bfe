"""Paired tests checked against independent computations: hand-worked tables, brute-force
enumeration, scipy / statsmodels / scikit-learn, and a published DeLong example."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from cmrfed.eval.stats import (
    TestResult,
    delong_auc_variance,
    delong_test,
    holm,
    matched_pairs_rank_biserial,
    mcnemar_paired,
    min_attainable_p_wilcoxon,
    paired_bootstrap,
    signed_rank_lower_position,
    signed_rank_null_cdf,
    wilcoxon_signed_rank,
)

# --- Wilcoxon signed-rank ----------------------------------------------------------------------


def _enumerated_exact_p(diffs: np.ndarray) -> float:
    """Two-sided exact p by enumerating all 2**n sign patterns of the ranks (no ties)."""
    ranks = sps.rankdata(np.abs(diffs))
    observed = ranks[diffs > 0].sum()
    totals = np.array(
        [
            sum(r for r, s in zip(ranks, signs, strict=True) if s)
            for signs in itertools.product((0, 1), repeat=diffs.size)
        ]
    )
    return min(1.0, 2.0 * min((totals <= observed).mean(), (totals >= observed).mean()))


@pytest.mark.parametrize("seed", range(3))
def test_wilcoxon_p_equals_scipy_and_enumeration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.75, 0.05, 10)
    b = a - rng.normal(0.02, 0.03, 10)
    result = wilcoxon_signed_rank(a, b)
    reference = sps.wilcoxon(a - b, zero_method="wilcox")
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert result.statistic == reference.statistic
    assert result.p_value == pytest.approx(_enumerated_exact_p(a - b), rel=1e-12)
    assert result.n == 10


@pytest.mark.parametrize(
    "diffs",
    [
        [0.1, 0.1, -0.2, 0.0, 0.3, 0.05, 0.1, -0.05, 0.2],  # ties and a zero, n <= 13
        list(np.round(np.random.default_rng(1).normal(0.01, 0.03, 60), 2)),  # n > 50
    ],
)
def test_wilcoxon_with_ties_zeros_and_large_n_equals_scipy(diffs: list[float]) -> None:
    b = np.linspace(0.5, 0.9, len(diffs))
    result = wilcoxon_signed_rank(b + np.array(diffs), b)
    reference = sps.wilcoxon(b + np.array(diffs) - b, zero_method="wilcox")
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)


def test_rank_biserial_hand_computed() -> None:
    # |d| ranks 1..6; R+ = 1 + 3 + 4 + 6 = 14, R- = 2 + 5 = 7 -> (14 - 7) / 21
    assert matched_pairs_rank_biserial([1, -2, 3, 4, -5, 6]) == pytest.approx(1 / 3)
    # zeros dropped; |1|, |1| share rank 1.5: R+ = 3, R- = 3 -> 0
    assert matched_pairs_rank_biserial([1, 1, -2, 0]) == 0.0
    assert matched_pairs_rank_biserial([0.2, 0.1]) == 1.0
    assert math.isnan(matched_pairs_rank_biserial([0, 0]))
    result = wilcoxon_signed_rank([1, 2, 3, 4, 5, 6], [0, 4, 0, 0, 10, 0])
    assert result.extra_value("rank_biserial") == pytest.approx(1 / 3)


def test_min_attainable_p() -> None:
    assert min_attainable_p_wilcoxon(5) == 0.0625
    assert min_attainable_p_wilcoxon(6) == 0.03125
    assert min_attainable_p_wilcoxon(0) == 1.0
    # the bound is attained: five positive differences, exact test
    assert sps.wilcoxon([0.1, 0.2, 0.3, 0.4, 0.5]).pvalue == pytest.approx(0.0625)


def test_wilcoxon_warns_when_five_pairs_can_never_be_significant() -> None:
    result = wilcoxon_signed_rank([0.8, 0.7, 0.9, 0.85, 0.75], [0.7, 0.6, 0.8, 0.7, 0.5])
    assert result.p_value == pytest.approx(0.0625)
    assert "cannot reach significance" in result.note
    assert result.extra_value("min_attainable_p") == 0.0625
    six = wilcoxon_signed_rank([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0])
    assert "cannot reach significance" not in six.note
    assert six.p_value == pytest.approx(0.03125)


def test_wilcoxon_all_zero_differences_is_noted_not_an_error() -> None:
    result = wilcoxon_signed_rank([0.7, 0.8, 0.6], [0.7, 0.8, 0.6])
    assert result.p_value == 1.0
    assert "all differences are zero" in result.note
    assert result.effect == 0.0


def test_signed_rank_null_distribution_equals_enumeration_and_tables() -> None:
    n = 10
    totals = np.array(
        [
            sum(k for k, s in zip(range(1, n + 1), signs, strict=True) if s)
            for signs in itertools.product((0, 1), repeat=n)
        ]
    )
    enumerated = np.array([(totals <= t).mean() for t in range(n * (n + 1) // 2 + 1)])
    np.testing.assert_allclose(signed_rank_null_cdf(n), enumerated, rtol=0, atol=1e-15)
    # published critical value for n = 10, two-sided 0.05, is T <= 8: P(T <= 8) <= 0.025 < P(T <= 9)
    assert signed_rank_null_cdf(n)[8] == pytest.approx(25 / 1024)
    assert signed_rank_null_cdf(n)[9] > 0.025


def test_hodges_lehmann_estimate_and_ci_from_walsh_averages() -> None:
    diffs = np.array([0.031, -0.012, 0.044, 0.007, 0.025, -0.003, 0.052, 0.018, 0.011, 0.039])
    walsh = sorted((diffs[i] + diffs[j]) / 2 for i in range(10) for j in range(i, 10))
    result = wilcoxon_signed_rank(diffs, np.zeros(10))
    assert result.effect == pytest.approx(np.median(walsh))
    # n = 10: critical value 8 -> the CI is the 9th smallest and 9th largest Walsh average
    assert (result.ci_low, result.ci_high) == pytest.approx((walsh[8], walsh[-9]))
    assert result.extra_value("ci_achieved_confidence") == pytest.approx(1 - 2 * 25 / 1024)
    assert result.ci_low <= result.effect <= result.ci_high
    assert result.extra_value("median_difference") == pytest.approx(np.median(diffs))


@pytest.mark.parametrize("n", [101, 150])
def test_normal_approximation_of_the_ci_position_matches_the_exact_one(n: int) -> None:
    position, achieved = signed_rank_lower_position(n, 0.95)  # normal approximation (n > 100)
    cdf = signed_rank_null_cdf(n)
    exact_position = int(np.searchsorted(cdf, 0.025, side="left"))
    assert abs(position - exact_position) <= 1
    assert achieved == pytest.approx(1 - 2 * cdf[position - 1], abs=1e-3)


def test_hodges_lehmann_ci_with_six_pairs_spans_the_extremes() -> None:
    diffs = np.array([0.01, 0.02, 0.03, 0.05, 0.08, 0.13])
    result = wilcoxon_signed_rank(diffs, np.zeros(6))
    assert (result.ci_low, result.ci_high) == pytest.approx((0.01, 0.13))
    assert result.extra_value("ci_achieved_confidence") == pytest.approx(1 - 2 / 64)


def test_wilcoxon_refuses_unpaired_input() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        wilcoxon_signed_rank([1, 2, 3], [1, 2])


# --- McNemar ---------------------------------------------------------------------------------


def _correctness(both: int, a_only: int, b_only: int, neither: int) -> tuple[list, list]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_mcnemar_exact_on_hand_built_table() -> None:
    a, b = _correctness(both=10, a_only=8, b_only=2, neither=5)
    result = mcnemar_paired(a, b)
    # exact: 2 P(Binomial(10, 1/2) <= 2) = 2 (1 + 10 + 45) / 1024
    assert result.p_value == pytest.approx(112 / 1024)
    assert result.p_value == pytest.approx(mcnemar([[10, 8], [2, 5]], exact=True).pvalue)
    assert result.statistic == 2
    assert result.effect == pytest.approx(4.0)
    half = 1.959963984540054 * math.sqrt(1 / 8 + 1 / 2)
    assert result.ci_low == pytest.approx(4.0 * math.exp(-half))
    assert result.ci_high == pytest.approx(4.0 * math.exp(half))
    assert result.n == 25
    assert "exact binomial" in result.note
    assert result.extra_value("n_b_only_correct") == 2


def test_mcnemar_chi_square_with_continuity_correction_for_many_discordant_pairs() -> None:
    a, b = _correctness(both=40, a_only=30, b_only=15, neither=15)
    result = mcnemar_paired(a, b)
    chi2 = (abs(30 - 15) - 1) ** 2 / (30 + 15)
    assert result.statistic == pytest.approx(chi2)
    assert result.p_value == pytest.approx(sps.chi2.sf(chi2, df=1))
    reference = mcnemar([[40, 30], [15, 15]], exact=False, correction=True)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert "chi-square" in result.note


def test_mcnemar_zero_cell_uses_haldane_correction() -> None:
    a, b = _correctness(both=20, a_only=5, b_only=0, neither=3)
    result = mcnemar_paired(a, b)
    assert result.effect == pytest.approx(5.5 / 0.5)
    assert math.isfinite(result.ci_low) and math.isfinite(result.ci_high)
    assert "Haldane" in result.note
    assert result.p_value == pytest.approx(2 / 32)


def test_mcnemar_identical_classifiers() -> None:
    a, _ = _correctness(both=10, a_only=0, b_only=0, neither=4)
    result = mcnemar_paired(a, a)
    assert result.p_value == 1.0
    assert result.effect == 1.0
    assert "no discordant pairs" in result.note


# --- paired bootstrap ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_classifiers() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    labels = rng.integers(0, 2, 240)
    shared = rng.normal(0, 1, 240)
    prob_a = 1 / (1 + np.exp(-(1.6 * (labels - 0.5) + shared)))
    prob_b = 1 / (1 + np.exp(-(0.6 * (labels - 0.5) + shared + rng.normal(0, 0.5, 240))))
    return labels, prob_a, prob_b


def test_paired_bootstrap_equals_a_loop_over_sklearn(two_classifiers) -> None:
    """Same documented draws (positives then negatives from default_rng(seed)), scored by
    scikit-learn one replicate at a time."""
    labels, prob_a, prob_b = two_classifiers
    n_boot, seed = 200, 3
    result = paired_bootstrap(labels, prob_a, prob_b, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pos_draw = rng.integers(0, pos.size, (n_boot, pos.size))
    neg_draw = rng.integers(0, neg.size, (n_boot, neg.size))
    diffs = []
    for r in range(n_boot):
        s = np.r_[pos[pos_draw[r]], neg[neg_draw[r]]]
        diffs.append(
            skm.balanced_accuracy_score(labels[s], prob_a[s] >= 0.5)
            - skm.balanced_accuracy_score(labels[s], prob_b[s] >= 0.5)
        )
    diffs = np.array(diffs)
    assert (result.ci_low, result.ci_high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    expected_p = min(
        1.0, 2 * min((1 + (diffs <= 0).sum()) / (n_boot + 1), (1 + (diffs >= 0).sum()) / (n_boot + 1))
    )
    assert result.p_value == pytest.approx(expected_p)
    observed = skm.balanced_accuracy_score(labels, prob_a >= 0.5) - skm.balanced_accuracy_score(
        labels, prob_b >= 0.5
    )
    assert result.effect == pytest.approx(observed)
    assert result.ci_low <= result.effect <= result.ci_high


def test_paired_bootstrap_detects_a_better_classifier_and_is_seeded(two_classifiers) -> None:
    labels, prob_a, prob_b = two_classifiers
    result = paired_bootstrap(labels, prob_a, prob_b, metric="auc", n_boot=1000, seed=0)
    assert result.effect > 0 and result.ci_low > 0 and result.p_value < 0.01
    assert result.effect_name == "auc_difference"
    assert paired_bootstrap(labels, prob_a, prob_b, metric="auc", n_boot=1000, seed=0) == result
    assert paired_bootstrap(labels, prob_a, prob_b, metric="auc", n_boot=1000, seed=1) != result


def test_paired_bootstrap_of_identical_predictions() -> None:
    labels = [0, 1, 0, 1, 1, 0]
    preds = [0, 1, 1, 1, 0, 0]
    result = paired_bootstrap(labels, preds, preds, n_boot=100)
    assert (result.effect, result.ci_low, result.ci_high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_refuses_an_unknown_metric() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap([0, 1], [0, 1], [1, 0], metric="dice")


# --- DeLong ----------------------------------------------------------------------------------


def _slow_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) directly: the kernel psi over every (positive, negative) pair."""
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                psi = 1.0 if pos[r, i] > neg[r, j] else 0.5 if pos[r, i] == neg[r, j] else 0.0
                v10[r, i] += psi / n
                v01[r, j] += psi / m
    aucs = v10.mean(axis=1)
    s10 = np.array(
        [[np.sum((v10[p] - aucs[p]) * (v10[q] - aucs[q])) / (m - 1) for q in range(k)] for p in range(k)]
    )
    s01 = np.array(
        [[np.sum((v01[p] - aucs[p]) * (v01[q] - aucs[q])) / (n - 1) for q in range(k)] for p in range(k)]
    )
    return aucs, s10 / m + s01 / n


def test_delong_single_auc_hand_computed_structural_components() -> None:
    # positives 0.8, 0.5, 0.3; negatives 0.5, 0.1 (one tie, counted 1/2)
    # V10 (per positive, share of negatives below) = [1, 0.75, 0.5] -> AUC 0.75
    # V01 (per negative, share of positives above) = [0.5, 1]
    # S10 = var([1, .75, .5]) = 0.0625; S01 = var([.5, 1]) = 0.125 (ddof 1)
    # Var = S10 / 3 + S01 / 2 = 1 / 48 + 1 / 16 = 1 / 12
    estimate = delong_auc_variance([1, 1, 1, 0, 0], [0.8, 0.5, 0.3, 0.5, 0.1])
    assert estimate.auc == pytest.approx(0.75)
    assert estimate.variance == pytest.approx(1 / 12)


def test_delong_test_hand_computed_two_models() -> None:
    # labels [0, 0, 1, 1, 1]; a = [.1, .2, .6, .7, .8] separates perfectly: V10 = [1, 1, 1],
    # V01 = [1, 1], AUC 1, variance 0. b = [.3, .6, .2, .7, .9]: V10 = [0, 1, 1] (0.2 beats no
    # negative), V01 = [2/3, 2/3], AUC 2/3, Var = var([0, 1, 1]) / 3 = 1/9, Cov(a, b) = 0.
    # z = (1 - 2/3) / (1/3) = 1, p = 2 (1 - Phi(1)) = 0.3173
    result = delong_test([0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.7, 0.8], [0.3, 0.6, 0.2, 0.7, 0.9])
    assert result.extra_value("auc_a") == 1.0
    assert result.extra_value("auc_b") == pytest.approx(2 / 3)
    assert result.extra_value("var_b") == pytest.approx(1 / 9)
    assert result.extra_value("cov_ab") == pytest.approx(0.0)
    assert result.statistic == pytest.approx(1.0)
    assert result.p_value == pytest.approx(0.31731050786291415)
    assert (result.ci_low, result.ci_high) == pytest.approx(
        (1 / 3 - 1.959963984540054 / 3, 1 / 3 + 1.959963984540054 / 3)
    )


@pytest.mark.parametrize("seed", range(3))
def test_delong_equals_slow_pairwise_implementation_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 90)
    a = np.round(0.8 * labels + rng.normal(0, 1, 90), 1)  # rounded: many ties
    b = np.round(0.5 * a + 0.4 * labels + rng.normal(0, 0.7, 90), 1)
    result = delong_test(labels, a, b)
    aucs, cov = _slow_delong(labels, np.vstack([a, b]))
    assert result.extra_value("auc_a") == pytest.approx(skm.roc_auc_score(labels, a), abs=1e-12)
    assert result.extra_value("auc_b") == pytest.approx(skm.roc_auc_score(labels, b), abs=1e-12)
    assert result.extra_value("var_a") == pytest.approx(cov[0, 0], rel=1e-10)
    assert result.extra_value("var_b") == pytest.approx(cov[1, 1], rel=1e-10)
    assert result.extra_value("cov_ab") == pytest.approx(cov[0, 1], rel=1e-10)
    z = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert result.statistic == pytest.approx(z, rel=1e-10)
    assert delong_auc_variance(labels, a).variance == pytest.approx(cov[0, 0], rel=1e-10)


# Published example: pROC's roc.test documentation (Robin et al. 2011, BMC Bioinformatics
# 12:77) compares the s100b and ndka markers of the aSAH data set (Turck et al. 2010,
# Intensive Care Med 36:107-115; 113 patients, outcome "Poor" = 1) and prints
#   DeLong's test for two correlated ROC curves: Z = 1.3908, p-value = 0.1643,
#   AUC of roc1 0.7313686, AUC of roc2 0.6119580, 95% CI of the difference -0.0489 to 0.2877.
# The three columns below are the data set's outcome, s100b and ndka values in their order.
_ASAH_POOR = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0,
    0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0,
    0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0,
    0,
]  # fmt: skip
_ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71,
    0.04, 0.08, 0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11,
    0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.5, 0.46,
    0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1,
    0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09,
    0.27, 0.71, 0.08, 0.26, 0.08, 0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28,
    0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15, 0.08, 0.14, 0.1, 0.07,
    0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5,
    0.48,
]  # fmt: skip
_ASAH_NDKA = [
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6.0, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18,
    8.9, 13.41, 20.75, 11.6, 16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29,
    12.53, 6.54, 6.3, 80.3, 12.8, 9.8, 9.81, 9.85, 18.21, 5.03, 14.04, 21.93, 8.02,
    7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34, 41.43, 7.63, 7.06, 12.59, 13.56, 3.87,
    9.44, 7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22, 11.73, 10.4, 58.83, 6.39,
    11.09, 12.22, 13.67, 17.21, 22.63, 12.9, 9.7, 21.57, 8.23, 72.57, 15.54, 10.51,
    10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44, 11.07, 19.46, 10.83, 5.37,
    11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67, 9.01, 9.57,
    34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79, 13.45,
]  # fmt: skip


def test_delong_reproduces_the_published_proc_asah_example() -> None:
    assert (len(_ASAH_POOR), sum(_ASAH_POOR)) == (113, 41)
    result = delong_test(_ASAH_POOR, _ASAH_S100B, _ASAH_NDKA)
    assert result.extra_value("auc_a") == pytest.approx(0.7313686, abs=5e-8)
    assert result.extra_value("auc_b") == pytest.approx(0.6119580, abs=5e-8)
    assert result.statistic == pytest.approx(1.3908, abs=5e-5)
    assert result.p_value == pytest.approx(0.1643, abs=5e-5)
    assert (result.ci_low, result.ci_high) == pytest.approx((-0.0489, 0.2877), abs=5e-5)
    assert result.n == 113


def test_delong_degenerate_and_refused_inputs() -> None:
    perfect = delong_test([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.0, 0.3, 0.6, 1.0])
    assert perfect.p_value == 1.0 and perfect.effect == 0.0
    assert "zero variance" in perfect.note
    with pytest.raises(ValueError, match="at least 2 subjects per class"):
        delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


# --- Holm and the result record ----------------------------------------------------------------


def test_holm_hand_example_and_statsmodels() -> None:
    # sorted 0.01, 0.03, 0.04 -> x3 = 0.03, x2 = 0.06, x1 = 0.04 -> monotone max 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    p = np.random.default_rng(0).random(7) / 5
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert holm([0.6, 0.5]) == [1.0, 1.0]
    assert holm([]) == []


def test_holm_leaves_uncomputable_tests_out_of_the_family() -> None:
    adjusted = holm([0.01, float("nan"), 0.04])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])


def test_test_result_is_frozen_and_json_ready() -> None:
    result = wilcoxon_signed_rank([0.8, 0.7, 0.9, 0.6, 0.75, 0.85], [0.7, 0.72, 0.8, 0.5, 0.7, 0.8])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.p_value = 0.0  # type: ignore[misc]
    record = json.loads(json.dumps(result.as_dict()))
    assert record["test"] == "wilcoxon_signed_rank"
    assert record["n"] == 6
    assert "rank_biserial" in record and "extra" not in record
    assert isinstance(result, TestResult)
