"""``cmrfed compare`` as a pure function: evaluated runs in, paired significance tests out.

:func:`compare` takes the runs read by :func:`cmrfed.eval.run_evaluation.load_evaluation` and returns a
:class:`Comparison`; it reads and writes no file, so every number in a report can be recomputed
from the same records in a test.

How runs are paired (methods.md, "Statistical comparison"):

- ``wilcoxon``: one pair per (seed, client): the ``--metric`` of the reference method's run and
  of the baseline's run with the SAME seed, on the same client's test subjects. Two-sided
  signed-rank test; effect = Hodges-Lehmann median difference with its CI, plus the plain median
  difference and the matched-pairs rank-biserial correlation.
- ``mcnemar`` / ``bootstrap`` / ``delong`` (per-subject tests): one pair per (seed, client,
  subject): the two methods' own-site models on the same test subject, in runs of the same seed.
  The primary row of each baseline pools these pairs over every shared seed and client. A
  subject then appears once per seed, so pooled pairs are not independent and a pooled p-value
  is optimistic when seeds agree; one row per seed (pooled over clients only) is added so the
  reader can see whether the effect holds in every seed.

Differences are reference minus baseline: a positive effect (an odds ratio above 1) favours the
reference. Holm's correction runs across the baselines within each scope (pooled; each seed).
Every row carries the smallest p-value its test could reach with its pairs and warns when that
exceeds alpha: such a test can never be significant, whatever the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from cmrfed.errors import DataError, UsageError
from cmrfed.eval.metrics import METRICS, binary_metrics, roc_curve_points
from cmrfed.eval.run_evaluation import RunEvaluation
from cmrfed.eval.stats import (
    MCNEMAR_EXACT_BELOW,
    TestResult,
    delong_test,
    holm,
    mcnemar_paired,
    min_attainable_p_wilcoxon,
    paired_bootstrap,
    wilcoxon_signed_rank,
)

TESTS: tuple[str, ...] = ("wilcoxon", "mcnemar", "bootstrap", "delong")
PER_SUBJECT_TESTS: tuple[str, ...] = ("mcnemar", "bootstrap", "delong")
ALPHA = 0.05
CONFIDENCE = 0.95
POOLED = "pooled"


@dataclass(frozen=True)
class RunRef:
    """A compared run as the report lists it."""

    run: str
    method: str
    seed: int


@dataclass(frozen=True)
class MetricSummary:
    """One method's ``--metric`` on one client (or ``macro``) over its seeds.

    ``ci_kind`` says what the interval is: a t-interval of the mean over seeds when there are at
    least two, else the single run's stratified subject bootstrap from ``cmrfed evaluate``.
    """

    client: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    ci_kind: str


@dataclass(frozen=True)
class Communication:
    """Bytes a method's clients actually sent (rounds.jsonl, run.json), mean over its seeds."""

    bytes_up_per_client_round: float
    bytes_down_per_client_round: float
    bytes_up_per_client: dict[str, float]
    bytes_down_per_client: dict[str, float]
    bytes_up_total: float
    bytes_down_total: float
    rounds: float


@dataclass(frozen=True)
class RocCurve:
    """One method's ROC on one client, subjects pooled over its seeds."""

    method: str
    client: str
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    auc: float


@dataclass(frozen=True)
class RunPoint:
    """One run in the metric-against-communication scatter."""

    method: str
    seed: int
    bytes_total: int
    macro_metric: float


@dataclass(frozen=True)
class MethodSummary:
    method: str
    runs: tuple[RunRef, ...]
    per_client: tuple[MetricSummary, ...]
    macro: MetricSummary
    communication: Communication
    val_curve: tuple[tuple[int, float], ...]
    roc: tuple[RocCurve, ...]
    points: tuple[RunPoint, ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(ref.seed for ref in self.runs)


@dataclass(frozen=True)
class TestRow:
    """One baseline against the reference in one scope (``pooled`` or ``seed <s>``)."""

    __test__ = False  # not a pytest test class, despite the name

    baseline: str
    scope: str
    result: TestResult
    p_holm: float
    min_attainable_p: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """Everything a report shows, computed from the evaluated runs alone."""

    test: str
    reference: str
    metric: str
    alpha: float
    split: str
    round_choice: str
    clients: tuple[str, ...]
    pairing: str
    methods: tuple[MethodSummary, ...]
    rows: tuple[TestRow, ...]
    warnings: tuple[str, ...]
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def measure(self) -> str:
        """What the test compares: the --metric, per-subject correctness, or the AUC."""
        return {"mcnemar": "per-subject correctness", "delong": "auc"}.get(self.test, self.metric)

    @property
    def primary_rows(self) -> tuple[TestRow, ...]:
        """The rows the conclusion rests on: one per baseline, Holm-corrected together."""
        return tuple(row for row in self.rows if row.scope == POOLED)

    def method(self, name: str) -> MethodSummary:
        return next(m for m in self.methods if m.method == name)


# --- refusals ----------------------------------------------------------------------------------


def _names(runs: Sequence[RunEvaluation]) -> str:
    return ", ".join(r.label for r in runs)


def _check_options(test: str, metric: str) -> None:
    if test not in TESTS:
        raise UsageError(f"--test must be one of {', '.join(TESTS)}, not {test!r}")
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")


def _check_unique(evaluations: Sequence[RunEvaluation]) -> None:
    seen: dict[tuple[str, int], RunEvaluation] = {}
    for ev in evaluations:
        key = (ev.method, ev.seed)
        if key in seen:
            raise UsageError(f"two runs of {ev.method} with seed {ev.seed}: {seen[key].run} and "
                             f"{ev.run}; pass one run per method and seed")
        seen[key] = ev


def _check_same(evaluations: Sequence[RunEvaluation], what: str, key: str, advice: str) -> None:
    groups: dict[Any, list[RunEvaluation]] = {}
    for ev in evaluations:
        groups.setdefault(getattr(ev, key), []).append(ev)
    if len(groups) > 1:
        listing = "; ".join(f"{value}: {_names(runs)}" for value, runs in groups.items())
        raise DataError(f"these runs cannot be paired: they differ in {what} ({listing}); {advice}")


def _check_subjects(evaluations: Sequence[RunEvaluation], anchor: RunEvaluation) -> None:
    """Every run must hold the anchor's clients, each with the same test subjects and labels."""
    for ev in evaluations:
        if ev.clients != anchor.clients:
            raise DataError(f"{ev.label} has clients {list(ev.clients)} but {anchor.label} has "
                            f"{list(anchor.clients)}; compare runs on the same prepared data")
        for client in anchor.clients:
            mine, theirs = ev.own[client], anchor.own[client]
            if mine.subjects != theirs.subjects:
                only_here = sorted(set(mine.subjects) - set(theirs.subjects))[:3]
                only_there = sorted(set(theirs.subjects) - set(mine.subjects))[:3]
                raise DataError(
                    f"{ev.label} and {anchor.label} evaluated different test subjects on client "
                    f"{client!r} (only in the first: {only_here}, only in the second: {only_there}); "
                    "compare runs evaluated on the same split of the same prepared data")
            if not np.array_equal(mine.labels, theirs.labels):
                raise DataError(f"{ev.label} and {anchor.label} disagree on the labels of client "
                                f"{client!r}'s test subjects; re-run `cmrfed evaluate` on both")


def _by_method(evaluations: Sequence[RunEvaluation]) -> dict[str, dict[int, RunEvaluation]]:
    grouped: dict[str, dict[int, RunEvaluation]] = {}
    for ev in sorted(evaluations, key=lambda e: (e.method, e.seed)):
        grouped.setdefault(ev.method, {})[ev.seed] = ev
    return grouped


def check_pairable(evaluations: Sequence[RunEvaluation], reference: str) -> list[str]:
    """Refuse runs that cannot be paired; return warnings about runs that pair only partly."""
    if not evaluations:
        raise UsageError("no runs to compare; pass RUN folders evaluated by `cmrfed evaluate`")
    _check_unique(evaluations)
    grouped = _by_method(evaluations)
    if reference not in grouped:
        raise UsageError(f"--reference {reference!r} is not among the runs ({_names(evaluations)}); "
                         f"pass a run of {reference} or choose --reference among {', '.join(grouped)}")
    if len(grouped) < 2:
        raise UsageError(f"only {reference} runs were given ({_names(evaluations)}); "
                         "pass runs of at least one other method")
    _check_same(evaluations, "prepared data (manifest sha256)", "manifest_sha256",
                "compare runs trained on the same `cmrfed prepare` output")
    _check_same(evaluations, "evaluated split", "split", "evaluate every run with the same --split")
    _check_same(evaluations, "evaluated round", "round_choice",
                "evaluate every run with the same --round")
    anchor = next(iter(grouped[reference].values()))
    _check_subjects(evaluations, anchor)
    warnings = []
    modes = {ev.threshold_mode for ev in evaluations}
    if len(modes) > 1:
        warnings.append(f"runs were evaluated with different --threshold modes ({sorted(modes)}); "
                        "correctness-based results mix thresholding rules")
    reference_seeds = set(grouped[reference])
    for method, runs in grouped.items():
        if method == reference:
            continue
        unpaired = [ev for seed, ev in runs.items() if seed not in reference_seeds]
        if len(unpaired) == len(runs):
            raise DataError(f"no {method} run shares a seed with a {reference} run "
                            f"({_names(unpaired)}; {reference} seeds: {sorted(reference_seeds)}); "
                            "pair runs of the same seed")
        if unpaired:
            warnings.append(f"no {reference} run with the same seed for {_names(unpaired)}: "
                            "left out of the paired tests")
    return warnings


# --- summaries ---------------------------------------------------------------------------------


def summarise_values(client: str, seeds: tuple[int, ...], values: list[float], metric: str,
                     single_ci: tuple[float, float]) -> MetricSummary:
    """Mean, sd and 95% CI over seeds of one metric (``single_ci``: the interval of a lone run)."""
    finite = np.array([v for v in values if math.isfinite(v)])
    nan = float("nan")
    mean = float(finite.mean()) if finite.size else nan
    sd = float(finite.std(ddof=1)) if finite.size >= 2 else nan
    if finite.size >= 2:
        half = float(sps.t.ppf(0.5 + CONFIDENCE / 2.0, finite.size - 1)) * sd / math.sqrt(finite.size)
        # a t-interval ignores that the metric is bounded: clip it to the metric's range
        floor = -1.0 if metric == "mcc" else 0.0
        low, high = max(floor, mean - half), min(1.0, mean + half)
        kind = f"t-interval over {finite.size} seeds, clipped to the metric's range"
    elif len(values) == 1:
        low, high, kind = single_ci[0], single_ci[1], "stratified subject bootstrap (one seed)"
    else:
        low, high, kind = nan, nan, "undefined"
    return MetricSummary(client, seeds, tuple(values), mean, sd, low, high, kind)


def _client_ci(ev: RunEvaluation, client: str, metric: str) -> tuple[float, float]:
    interval = ev.metrics[client].get("ci95", {}).get(metric) or (None, None)
    return tuple(float("nan") if v is None else float(v) for v in interval)  # type: ignore[return-value]


def _communication(runs: list[RunEvaluation], clients: tuple[str, ...]) -> Communication:
    def per_run(ev: RunEvaluation, key: str) -> tuple[float, dict[str, float]]:
        logs = [getattr(r, key) for r in ev.rounds]
        per_client = {c: float(sum(log.get(c, 0) for log in logs)) for c in clients}
        per_round = float(np.mean([v for log in logs for v in log.values()])) if logs else 0.0
        return per_round, per_client

    ups = [per_run(ev, "bytes_up") for ev in runs]
    downs = [per_run(ev, "bytes_down") for ev in runs]
    return Communication(
        bytes_up_per_client_round=float(np.mean([u[0] for u in ups])),
        bytes_down_per_client_round=float(np.mean([d[0] for d in downs])),
        bytes_up_per_client={c: float(np.mean([u[1][c] for u in ups])) for c in clients},
        bytes_down_per_client={c: float(np.mean([d[1][c] for d in downs])) for c in clients},
        bytes_up_total=float(np.mean([ev.bytes_up_total for ev in runs])),
        bytes_down_total=float(np.mean([ev.bytes_down_total for ev in runs])),
        rounds=float(np.mean([len(ev.rounds) for ev in runs])),
    )


def _val_curve(runs: list[RunEvaluation]) -> tuple[tuple[int, float], ...]:
    """Mean over seeds of the mean client val balanced accuracy, per round index."""
    by_round: dict[int, list[float]] = {}
    for ev in runs:
        for record in ev.rounds:
            by_round.setdefault(record.round, []).append(record.mean_val_balanced_accuracy)
    curve = []
    for index in sorted(by_round):
        finite = [v for v in by_round[index] if math.isfinite(v)]
        curve.append((index, float(np.mean(finite)) if finite else float("nan")))
    return tuple(curve)


def _roc(method: str, runs: list[RunEvaluation], clients: tuple[str, ...]) -> tuple[RocCurve, ...]:
    curves = []
    for client in clients:
        labels = np.concatenate([ev.own[client].labels for ev in runs])
        probs = np.concatenate([ev.own[client].probabilities for ev in runs])
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve_points(labels, probs)
        curves.append(RocCurve(method, client, tuple(map(float, fpr)), tuple(map(float, tpr)),
                               binary_metrics(labels, probs)["auc"]))
    return tuple(curves)


def _method_summary(method: str, runs: list[RunEvaluation], clients: tuple[str, ...],
                    metric: str) -> MethodSummary:
    seeds = tuple(ev.seed for ev in runs)
    per_client = tuple(
        summarise_values(c, seeds, [float(ev.metrics[c][metric]) for ev in runs], metric,
                         _client_ci(runs[0], c, metric))
        for c in clients
    )
    macro = summarise_values("macro", seeds, [float(ev.macro.get(metric, float("nan"))) for ev in runs],
                             metric, (float("nan"), float("nan")))
    points = tuple(RunPoint(method, ev.seed, ev.bytes_up_total + ev.bytes_down_total,
                            float(ev.macro.get(metric, float("nan")))) for ev in runs)
    return MethodSummary(
        method=method,
        runs=tuple(RunRef(str(ev.run), ev.method, ev.seed) for ev in runs),
        per_client=per_client,
        macro=macro,
        communication=_communication(runs, clients),
        val_curve=_val_curve(runs),
        roc=_roc(method, runs, clients),
        points=points,
    )


# --- tests -------------------------------------------------------------------------------------


def _nan_result(test: str, n: int, note: str) -> TestResult:
    nan = float("nan")
    return TestResult(test=test, statistic=nan, p_value=nan, n=n, effect=nan, effect_name="",
                      ci_low=nan, ci_high=nan, confidence=CONFIDENCE, note=note)


def _too_few(min_p: float, n: int, alpha: float, unit: str) -> tuple[str, ...]:
    if min_p > alpha:
        return (f"too few pairs: with {n} {unit} the smallest attainable p is {min_p:.3g} > "
                f"alpha {alpha:g}; this test cannot reach significance",)
    return ()


def _wilcoxon(ref: dict[int, RunEvaluation], base: dict[int, RunEvaluation], clients: tuple[str, ...],
              metric: str, alpha: float) -> tuple[TestResult, float, tuple[str, ...]]:
    a, b, skipped = [], [], []
    for seed in sorted(set(ref) & set(base)):
        for client in clients:
            va, vb = float(ref[seed].metrics[client][metric]), float(base[seed].metrics[client][metric])
            if math.isfinite(va) and math.isfinite(vb):
                a.append(va)
                b.append(vb)
            else:
                skipped.append(f"seed {seed} / {client}")
    warnings: tuple[str, ...] = ()
    if skipped:
        warnings += (f"{metric} undefined for {', '.join(skipped)}: pair(s) left out",)
    if not a:
        return _nan_result("wilcoxon_signed_rank", 0, "no pairs"), 1.0, (*warnings, "no pairs")
    result = wilcoxon_signed_rank(a, b, alpha=alpha, confidence=CONFIDENCE)
    n_nonzero = int(result.extra_value("n_nonzero"))
    min_p = min_attainable_p_wilcoxon(n_nonzero)
    unit = f"(seed, client) pairs ({n_nonzero} non-zero)"
    return result, min_p, warnings + _too_few(min_p, len(a), alpha, unit)


def _per_subject(test: str, ref: list[RunEvaluation], base: list[RunEvaluation],
                 clients: tuple[str, ...], metric: str, alpha: float, n_boot: int,
                 seed: int) -> tuple[TestResult, float, tuple[str, ...]]:
    """One per-subject test on the (seed, client, subject) pairs of matched runs, pooled."""
    def stack(runs: list[RunEvaluation], attribute: str) -> np.ndarray:
        return np.concatenate([getattr(ev.own[c], attribute) for ev in runs for c in clients])

    labels = stack(ref, "labels")
    n = int(labels.size)
    try:
        if test == "mcnemar":
            result = mcnemar_paired(stack(ref, "correct"), stack(base, "correct"), confidence=CONFIDENCE)
            discordant = int(result.extra_value("n_a_only_correct") + result.extra_value("n_b_only_correct"))
            # exact binomial: all discordant pairs on one side is the most extreme outcome
            min_p = min(1.0, 2.0 * 0.5**discordant) if discordant < MCNEMAR_EXACT_BELOW else 0.0
            return result, min_p, _too_few(min_p, discordant, alpha, "discordant pairs")
        if test == "bootstrap":
            column = "probabilities" if metric == "auc" else "predictions"
            result = paired_bootstrap(labels, stack(ref, column), stack(base, column), metric=metric,
                                      n_boot=n_boot, seed=seed, confidence=CONFIDENCE)
            valid = int(result.extra_value("n_boot_valid"))
            min_p = min(1.0, 2.0 / (valid + 1))
            return result, min_p, _too_few(min_p, valid, alpha, "valid bootstrap replicates")
        result = delong_test(labels, stack(ref, "probabilities"), stack(base, "probabilities"),
                             confidence=CONFIDENCE)
        return result, 0.0, ()
    except ValueError as exc:
        return _nan_result(test, n, str(exc)), 1.0, (f"test not computed: {exc}",)


def _holm_rows(rows: list[tuple[str, str, TestResult, float, tuple[str, ...]]]) -> list[TestRow]:
    """Holm-adjust the p-values within each scope (across baselines)."""
    out: list[TestRow] = []
    for scope in dict.fromkeys(scope for _, scope, *_ in rows):
        family = [r for r in rows if r[1] == scope]
        adjusted = holm([r[2].p_value for r in family])
        out.extend(TestRow(baseline, scope, result, p_holm, min_p, warnings)
                   for (baseline, _, result, min_p, warnings), p_holm in zip(family, adjusted, strict=True))
    return out


def _pairing_text(test: str, reference: str, metric: str) -> str:
    if test == "wilcoxon":
        return (f"one pair per (seed, client): the {metric} of {reference} and of the baseline run "
                "with the same seed, on the same test subjects; two-sided Wilcoxon signed-rank")
    what = {"mcnemar": "per-subject correctness (McNemar)",
            "bootstrap": f"paired stratified bootstrap of the {metric} difference over subjects",
            "delong": "AUC difference (DeLong)"}[test]
    return (f"{what}; one pair per (seed, client, subject): {reference} and the baseline's own-site "
            "models on the same test subject in runs of the same seed. The 'pooled' rows pool the pairs "
            "over seeds and clients (a subject counts once per seed, so pooled pairs are not "
            "independent and the pooled p-value is optimistic); the 'seed s' rows pool over clients "
            "within one seed")


def summarise_methods(evaluations: Sequence[RunEvaluation], reference: str,
                      metric: str) -> tuple[MethodSummary, ...]:
    """Each method's ``metric`` per client and macro over its seeds (mean, sd, 95% CI), its
    communication and curves; the reference first. No test is run: a study reads every metric
    of its main table through this, the tested one through :func:`compare`."""
    _check_options("wilcoxon", metric)
    check_pairable(evaluations, reference)
    grouped = _by_method(evaluations)
    clients = next(iter(grouped[reference].values())).clients
    return tuple(_method_summary(m, list(runs.values()), clients, metric)
                 for m, runs in sorted(grouped.items(), key=lambda kv: (kv[0] != reference, kv[0])))


def compare(
    evaluations: Sequence[RunEvaluation],
    test: str,
    reference: str = "duallora",
    metric: str = "balanced_accuracy",
    alpha: float = ALPHA,
    n_boot: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Pair the runs of every method with the reference's and test each pairing (see module doc).

    Raises UsageError / DataError, naming the runs, when they cannot be paired.
    ``n_boot`` and ``seed`` drive the paired bootstrap only.
    """
    _check_options(test, metric)
    warnings = check_pairable(evaluations, reference)
    grouped = _by_method(evaluations)
    clients = next(iter(grouped[reference].values())).clients
    ref_runs = grouped[reference]
    raw_rows: list[tuple[str, str, TestResult, float, tuple[str, ...]]] = []
    for baseline, base_runs in grouped.items():
        if baseline == reference:
            continue
        shared_seeds = sorted(set(ref_runs) & set(base_runs))
        if test == "wilcoxon":
            raw_rows.append((baseline, POOLED, *_wilcoxon(ref_runs, base_runs, clients, metric, alpha)))
            continue
        scopes = [(POOLED, shared_seeds)]
        if len(shared_seeds) > 1:
            scopes += [(f"seed {s}", [s]) for s in shared_seeds]
        for scope, seeds in scopes:
            raw_rows.append((baseline, scope, *_per_subject(
                test, [ref_runs[s] for s in seeds], [base_runs[s] for s in seeds], clients, metric,
                alpha, n_boot, seed)))
    rows = _holm_rows(raw_rows)
    methods = summarise_methods(evaluations, reference, metric)
    anchor = next(iter(ref_runs.values()))
    inputs = {path: digest for ev in evaluations for path, digest in ev.inputs.items()}
    return Comparison(test=test, reference=reference, metric=metric, alpha=alpha, split=anchor.split,
                      round_choice=anchor.round_choice, clients=clients,
                      pairing=_pairing_text(test, reference, metric), methods=methods,
                      rows=tuple(rows), warnings=tuple(warnings), inputs=inputs)
