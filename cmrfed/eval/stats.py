"""Paired significance tests for comparing two methods, each with an effect size and its CI.

Conventions shared by every test here:

- Differences are taken as ``a - b``: with ``a`` the proposed method and ``b`` a baseline, a
  positive effect favours the proposed method.
- Every test returns a :class:`TestResult`: the p-value never travels without the number of
  pairs, the effect size and its confidence interval, and ``note`` carries every caveat (too few
  pairs to ever reach significance, no discordant pairs, degenerate variance...).
- Tests are two-sided. Multiple baselines are corrected with :func:`holm`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from cmrfed.metrics import (
    METRICS,
    binary_metrics,
    replicate_metrics,
    stratified_draws,
    validate_binary,
)

MCNEMAR_EXACT_BELOW = 25
"""McNemar uses the exact binomial test when fewer discordant pairs than this, else chi-square."""

EXACT_SIGNED_RANK_MAX_N = 100
"""Up to this many pairs the Hodges-Lehmann CI uses the exact signed-rank null distribution."""


@dataclass(frozen=True)
class TestResult:
    """One paired comparison: test statistic, p-value, n, effect size with CI, and caveats.

    ``extra`` holds secondary numbers a report may show (e.g. the rank-biserial correlation,
    the two AUCs, the discordant counts) as (name, value) pairs, so the record stays immutable.
    """

    __test__ = False  # not a pytest test class, despite the name

    test: str
    statistic: float
    p_value: float
    n: int
    effect: float
    effect_name: str
    ci_low: float
    ci_high: float
    confidence: float
    note: str = ""
    extra: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, object]:
        """Flat dict for a JSON/CSV report: the fields, each ``extra`` pair as its own key (NaN kept)."""
        record = asdict(self)
        record.update(dict(record.pop("extra")))
        return record

    def extra_value(self, name: str) -> float:
        """The secondary number called ``name`` (KeyError if this test does not report it)."""
        return dict(self.extra)[name]


def _join_notes(notes: list[str]) -> str:
    return "; ".join(note for note in notes if note)


def _paired_arrays(a: ArrayLike, b: ArrayLike) -> tuple[NDArray, NDArray]:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length ({x.size} vs {y.size})")
    if x.size == 0:
        raise ValueError("no pairs to compare")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired samples contain NaN or infinite values")
    return x, y


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _z(confidence: float) -> float:
    """Two-sided normal critical value for a ``confidence`` interval (1.96 for 0.95)."""
    _check_confidence(confidence)
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


# --- Wilcoxon signed-rank ----------------------------------------------------------------------


def min_attainable_p_wilcoxon(n: int) -> float:
    """Smallest two-sided exact p-value of the signed-rank test with ``n`` non-zero pairs.

    The most extreme outcome (all differences of one sign) has probability 2**-n under H0 in
    each tail, so p >= 2 / 2**n: with n <= 5 pairs p can never fall below 0.05.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return min(1.0, 2.0 / 2.0**n)


def signed_rank_null_cdf(n: int) -> NDArray[np.float64]:
    """P(T+ <= t) for t = 0..n(n+1)/2 under H0, for n untied non-zero differences.

    T+ is a sum of independent terms k * Bernoulli(1/2), k = 1..n; adding them one at a time
    and halving keeps the running array a probability vector (no 2**n overflow).
    """
    total = n * (n + 1) // 2
    pmf = np.zeros(total + 1)
    pmf[0] = 1.0
    for k in range(1, n + 1):
        shifted = np.zeros_like(pmf)
        shifted[k:] = pmf[:-k]
        pmf = 0.5 * (pmf + shifted)
    return np.cumsum(pmf)


def signed_rank_lower_position(n: int, confidence: float) -> tuple[int, float]:
    """1-based order position of the lower CI limit among the Walsh averages, and its confidence.

    The position is the smallest t with P(T+ <= t) >= (1 - confidence) / 2 (R's ``qsignrank``),
    at least 1; the achieved confidence is 1 - 2 P(T+ <= t - 1). Exact up to
    :data:`EXACT_SIGNED_RANK_MAX_N` pairs; beyond, the normal approximation of T+ with continuity
    correction (the exact distribution costs O(n**3) there and the two agree closely).
    """
    tail = (1.0 - confidence) / 2.0
    if n <= EXACT_SIGNED_RANK_MAX_N:
        cdf = signed_rank_null_cdf(n)
        position = max(1, int(np.searchsorted(cdf, tail - 1e-12, side="left")))
        return position, 1.0 - 2.0 * float(cdf[position - 1])
    mean = n * (n + 1) / 4.0
    sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)
    position = max(1, math.ceil(mean + sd * float(sps.norm.ppf(tail)) - 0.5))
    return position, 1.0 - 2.0 * float(sps.norm.cdf((position - 0.5 - mean) / sd))


def _hodges_lehmann_ci(diffs: NDArray, confidence: float) -> tuple[float, float, float, float]:
    """Hodges-Lehmann pseudo-median of the differences and its distribution-free CI.

    The CI is the pair of Walsh averages (d_i + d_j) / 2, i <= j, at the order positions given by
    the signed-rank null distribution (the interval that inverts the signed-rank test; the same
    construction as R's ``wilcox.test(conf.int = TRUE)`` without ties). Returns
    (estimate, low, high, achieved confidence); with few pairs the achieved confidence is the
    highest possible, which can be below the requested one.
    """
    i, j = np.triu_indices(diffs.size)
    walsh = np.sort((diffs[i] + diffs[j]) / 2.0)
    position, achieved = signed_rank_lower_position(diffs.size, confidence)
    low = float(walsh[position - 1])
    high = float(walsh[walsh.size - position])
    return float(np.median(walsh)), low, high, achieved


def matched_pairs_rank_biserial(diffs: ArrayLike) -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): (R+ - R-) / (R+ + R-).

    Ranks are of |d| over the non-zero differences (midranks for ties), the same ranks the
    signed-rank statistic uses with zero_method="wilcox". +1: every pair favours a. NaN when
    every difference is zero.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    ranks = sps.rankdata(np.abs(d))
    r_plus = ranks[d > 0].sum()
    r_minus = ranks[d < 0].sum()
    return float((r_plus - r_minus) / (r_plus + r_minus))


def wilcoxon_signed_rank(
    a: ArrayLike, b: ArrayLike, alpha: float = 0.05, confidence: float = 0.95
) -> TestResult:
    """Two-sided paired Wilcoxon signed-rank test of a - b (e.g. per (seed, client) bal. acc.).

    The test is ``scipy.stats.wilcoxon(a - b, zero_method="wilcox", method="auto")``:
    zero differences are dropped before ranking (Wilcoxon's original treatment: a tie carries no
    sign information); scipy then uses the exact null distribution when n <= 50 with no ties or
    zeros, an exact permutation distribution when n <= 13 with ties or zeros, and the normal
    approximation otherwise.

    Effect: the Hodges-Lehmann median difference (median of the Walsh averages of all n
    differences, zeros included), with the distribution-free CI that inverts the signed-rank
    test (exact for untied data). ``extra`` also reports the plain median difference, the
    matched-pairs rank-biserial correlation, the number of non-zero pairs and the smallest
    attainable p. ``note`` warns when that smallest p exceeds ``alpha`` (the test cannot reach
    significance whatever the data), when all differences are zero (no test: p = 1), and when
    the CI could not reach the requested confidence.
    """
    x, y = _paired_arrays(a, b)
    _check_confidence(confidence)
    diffs = x - y
    n = diffs.size
    n_nonzero = int(np.count_nonzero(diffs))
    min_p = min_attainable_p_wilcoxon(n_nonzero)
    notes: list[str] = []
    if min_p > alpha:
        notes.append(
            f"only {n_nonzero} non-zero pairs: the smallest attainable two-sided p is "
            f"{min_p:.3g} > alpha {alpha:g}, so this test cannot reach significance"
        )
    if n_nonzero == 0:
        notes.append("all differences are zero: no evidence either way; p set to 1")
        statistic, p_value = 0.0, 1.0
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = sps.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided", method="auto")
        notes.extend(str(w.message) for w in caught)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    estimate, low, high, achieved = _hodges_lehmann_ci(diffs, confidence)
    if achieved < confidence - 1e-12:
        notes.append(
            f"with {n} pairs the CI reaches only {achieved:.1%} confidence "
            f"(requested {confidence:.0%}); it spans the extreme Walsh averages"
        )
    if n_nonzero < n or np.unique(np.abs(diffs)).size < n:
        notes.append("tied or zero differences: the Hodges-Lehmann CI is approximate")
    return TestResult(
        test="wilcoxon_signed_rank",
        statistic=statistic,
        p_value=p_value,
        n=n,
        effect=estimate,
        effect_name="hodges_lehmann_median_difference",
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        note=_join_notes(notes),
        extra=(
            ("median_difference", float(np.median(diffs))),
            ("rank_biserial", matched_pairs_rank_biserial(diffs)),
            ("n_nonzero", float(n_nonzero)),
            ("min_attainable_p", min_p),
            ("ci_achieved_confidence", achieved),
        ),
    )


# --- McNemar ---------------------------------------------------------------------------------


def mcnemar_paired(correct_a: ArrayLike, correct_b: ArrayLike, confidence: float = 0.95) -> TestResult:
    """McNemar's test on per-subject paired correctness of two classifiers (same subjects).

    ``n_a_only`` = subjects a classifies correctly and b does not, ``n_b_only`` the reverse.
    The test (statsmodels ``mcnemar``) uses the exact binomial test on the discordant pairs when
    there are fewer than :data:`MCNEMAR_EXACT_BELOW` of them (statistic = min(n_a_only,
    n_b_only)), otherwise the chi-square statistic with continuity correction.

    Effect: the conditional odds ratio n_a_only / n_b_only (> 1 favours a), with the Wald CI
    exp(log OR +/- z sqrt(1/n_a_only + 1/n_b_only)); when either count is zero, 0.5 is added to
    both (Haldane) for the estimate and the CI, and ``note`` says so.
    """
    x, y = _paired_arrays(correct_a, correct_b)
    if not (np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all()):
        raise ValueError("correctness must be boolean (or 0/1) per subject")
    right_a, right_b = x.astype(bool), y.astype(bool)
    both = int((right_a & right_b).sum())
    a_only = int((right_a & ~right_b).sum())
    b_only = int((~right_a & right_b).sum())
    neither = int((~right_a & ~right_b).sum())
    discordant = a_only + b_only
    exact = discordant < MCNEMAR_EXACT_BELOW
    result = mcnemar([[both, a_only], [b_only, neither]], exact=exact, correction=True)
    notes = [
        f"{'exact binomial' if exact else 'chi-square with continuity correction'} "
        f"on {discordant} discordant pairs"
    ]
    if discordant == 0:
        notes.append("no discordant pairs: the classifiers agree on every subject")
    num, den = float(a_only), float(b_only)
    if a_only == 0 or b_only == 0:
        num, den = num + 0.5, den + 0.5
        notes.append("a discordant count is zero: odds ratio and CI use +0.5 (Haldane)")
    log_or = math.log(num / den)
    half_width = _z(confidence) * math.sqrt(1.0 / num + 1.0 / den)
    return TestResult(
        test="mcnemar",
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        n=int(x.size),
        effect=math.exp(log_or),
        effect_name="discordant_odds_ratio_a_over_b",
        ci_low=math.exp(log_or - half_width),
        ci_high=math.exp(log_or + half_width),
        confidence=confidence,
        note=_join_notes(notes),
        extra=(
            ("n_both_correct", float(both)),
            ("n_a_only_correct", float(a_only)),
            ("n_b_only_correct", float(b_only)),
            ("n_neither_correct", float(neither)),
            ("exact", float(exact)),
        ),
    )


# --- paired bootstrap ------------------------------------------------------------------------


def paired_bootstrap(
    labels: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    metric: str = "balanced_accuracy",
    n_boot: int = 2000,
    seed: int = 0,
    threshold: float = 0.5,
    confidence: float = 0.95,
) -> TestResult:
    """Paired, stratified bootstrap of metric(a) - metric(b) over the same test subjects.

    ``pred_a`` / ``pred_b`` are per-subject scores: hard 0/1 predictions or probabilities
    (thresholded at ``threshold`` for every metric but AUC). Each replicate resamples positives
    and negatives separately (class counts fixed) and applies the SAME draw to both methods,
    which keeps the pairing, so the subject-level correlation between the methods narrows the CI.

    Effect: the observed difference; CI: percentile interval of the replicate differences.
    p-value: two-sided, from the bootstrap distribution of the difference,
    p = min(1, 2 min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1))), the "+1"
    counting the observed sample so that p is never reported as exactly 0. Replicates where
    the metric is undefined (NaN, e.g. MCC with no positive prediction) are dropped and counted
    in ``note``. Deterministic for a given seed.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    y, scores_a = validate_binary(labels, pred_a)
    _, scores_b = validate_binary(labels, pred_b)
    _check_confidence(confidence)
    observed = binary_metrics(y, scores_a, threshold)[metric] - binary_metrics(y, scores_b, threshold)[metric]
    pos_draw, neg_draw = stratified_draws(y, n_boot, np.random.default_rng(seed))
    replicate_diffs = (
        replicate_metrics(y, scores_a, threshold, pos_draw, neg_draw)[metric]
        - replicate_metrics(y, scores_b, threshold, pos_draw, neg_draw)[metric]
    )
    valid = replicate_diffs[np.isfinite(replicate_diffs)]
    notes = []
    if valid.size < n_boot:
        notes.append(f"{n_boot - valid.size} of {n_boot} replicates had an undefined {metric}")
    if valid.size == 0 or not math.isfinite(observed):
        notes.append(f"{metric} is undefined on these data")
        nan = float("nan")
        low = high = p_value = nan
    else:
        tail = 1.0 - confidence
        low, high = (float(q) for q in np.quantile(valid, [tail / 2.0, 1.0 - tail / 2.0]))
        below = (1 + np.count_nonzero(valid <= 0)) / (valid.size + 1)
        above = (1 + np.count_nonzero(valid >= 0)) / (valid.size + 1)
        p_value = float(min(1.0, 2.0 * min(below, above)))
    return TestResult(
        test="paired_bootstrap",
        statistic=observed,
        p_value=p_value,
        n=int(y.size),
        effect=observed,
        effect_name=f"{metric}_difference",
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        note=_join_notes(notes),
        extra=(("n_boot_valid", float(valid.size)), ("seed", float(seed))),
    )


# --- DeLong ----------------------------------------------------------------------------------


class AucEstimate(NamedTuple):
    """An empirical AUC and its DeLong variance estimate."""

    auc: float
    variance: float


def _delong_components(y: NDArray, scores: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """AUCs and structural components of k score rows (Sun & Xu 2014, midrank algorithm).

    ``scores`` is (k, n). Returns aucs (k,), V10 (k, m) for the m positives (share of negatives
    each positive outranks, ties 1/2) and V01 (k, r) for the r negatives (share of positives that
    outrank each negative). Midranks make this O(n log n) instead of DeLong's O(m r) pairs.
    """
    positives = scores[:, y == 1]
    negatives = scores[:, y == 0]
    m, r = positives.shape[1], negatives.shape[1]
    rank_pos = sps.rankdata(positives, axis=1)
    rank_neg = sps.rankdata(negatives, axis=1)
    rank_all = sps.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    v10 = (rank_all[:, :m] - rank_pos) / r
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def _delong_covariance(y: NDArray, scores: NDArray) -> tuple[NDArray, NDArray]:
    """AUCs (k,) and their DeLong covariance matrix (k, k): S10 / m + S01 / r."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"DeLong needs at least 2 subjects per class (got {n_pos} positive, {n_neg} negative)"
        )
    aucs, v10, v01 = _delong_components(y, scores)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / n_pos + s01 / n_neg


def delong_auc_variance(labels: ArrayLike, probs: ArrayLike) -> AucEstimate:
    """Empirical AUC of one classifier and its DeLong (1988) variance."""
    y, scores = validate_binary(labels, probs)
    aucs, cov = _delong_covariance(y, scores[None, :])
    return AucEstimate(auc=float(aucs[0]), variance=float(cov[0, 0]))


def delong_test(
    labels: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike, confidence: float = 0.95
) -> TestResult:
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUCs (same subjects).

    z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab), two-sided normal p-value; the structural
    components come from the fast midrank algorithm of Sun & Xu (2014). Effect: AUC_a - AUC_b
    with the Wald CI from the same variance. When that variance is zero (e.g. both classifiers
    separate the classes perfectly) z is undefined: p = 1 if the AUCs are equal, else 0, noted.
    """
    y, scores_a = validate_binary(labels, prob_a)
    _, scores_b = validate_binary(labels, prob_b)
    z_crit = _z(confidence)
    aucs, cov = _delong_covariance(y, np.vstack([scores_a, scores_b]))
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    notes = []
    if variance <= 0.0:
        notes.append("zero variance of the AUC difference: z undefined")
        statistic = 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
        p_value = 1.0 if difference == 0.0 else 0.0
        standard_error = 0.0
    else:
        standard_error = math.sqrt(variance)
        statistic = difference / standard_error
        p_value = float(2.0 * sps.norm.sf(abs(statistic)))
    return TestResult(
        test="delong",
        statistic=statistic,
        p_value=p_value,
        n=int(y.size),
        effect=difference,
        effect_name="auc_difference",
        ci_low=difference - z_crit * standard_error,
        ci_high=difference + z_crit * standard_error,
        confidence=confidence,
        note=_join_notes(notes),
        extra=(
            ("auc_a", float(aucs[0])),
            ("auc_b", float(aucs[1])),
            ("var_a", float(cov[0, 0])),
            ("var_b", float(cov[1, 1])),
            ("cov_ab", float(cov[0, 1])),
        ),
    )


# --- multiplicity ----------------------------------------------------------------------------


def holm(p_values: ArrayLike) -> list[float]:
    """Holm (1979) step-down adjusted p-values (statsmodels ``multipletests(method="holm")``).

    Controls the family-wise error rate across the baselines compared with the proposed method.
    NaN p-values (tests that could not be computed) are left out of the family and stay NaN.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    adjusted = np.full(p.shape, np.nan)
    finite = ~np.isnan(p)
    if finite.any():
        adjusted[finite] = multipletests(p[finite], method="holm")[1]
    return [float(v) for v in adjusted]
