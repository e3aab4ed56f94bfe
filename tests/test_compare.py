"""``cmrfed compare``: pairing, tests against scipy / statsmodels, refusals, report and CLI.

RUN folders are fabricated directly (run.json, rounds.jsonl, eval/metrics.json,
eval/predictions.csv) from seeded numpy arrays in which the reference method separates the
classes better than the baselines; no model is trained.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
from click.testing import CliRunner
from rich.console import Console
from safetensors.numpy import save_file
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from cmrfed import paths
from cmrfed.cli import cli, main
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.compare import compare
from cmrfed.eval.metrics import binary_metrics, bootstrap_ci
from cmrfed.eval.report import FIGURES, compare_runs
from cmrfed.eval.run_evaluation import load_evaluation
from cmrfed.eval.stats import delong_test
from cmrfed.fed.config import FederateConfig

CLIENTS = ("ge", "philips", "siemens")
N_SUBJECTS = 24
ROUNDS = 3
# how well each method's probabilities separate the classes (larger: more accurate)
STRENGTH = {"duallora": 1.6, "fedlora": 0.7, "ffalora": 0.3}
BYTES_UP = {"duallora": 4096, "fedlora": 4096, "ffalora": 2048}


def _client_labels(client: str) -> np.ndarray:
    """Fixed labels per client (same subjects in every run): 10 normal, 14 abnormal."""
    return np.r_[np.zeros(10, dtype=int), np.ones(N_SUBJECTS - 10, dtype=int)]


def _subjects(client: str) -> list[str]:
    return [f"{client}-{i:03d}" for i in range(N_SUBJECTS)]


def make_run(root: Path, method: str, seed: int, manifest: str = "m" * 64,
             drop_subject: str | None = None, evaluated: bool = True) -> Path:
    """Fabricate a finished (and, by default, evaluated) RUN folder for ``method`` and ``seed``."""
    run = root / f"{method}-s{seed}"
    run.mkdir(parents=True)
    rng = np.random.default_rng([seed, list(STRENGTH).index(method)])
    config = FederateConfig(data=str(root / "prepared"), method=method, seed=seed, rounds=ROUNDS)
    up, down = BYTES_UP[method], 2 * BYTES_UP[method]
    with (paths.rounds_log_path(run)).open("w") as handle:
        for r in range(1, ROUNDS + 1):
            handle.write(json.dumps({
                "round": r,
                "clients": {c: {"train_loss": 1.0 / r, "n_train": 40, "val": {}, "bytes_up": up,
                                "bytes_down": down, "params_up": up // 4, "params_down": up // 4}
                            for c in CLIENTS},
                "mean_val_balanced_accuracy": 0.5 + STRENGTH[method] * r / 20, "wall_s": 0.1,
            }) + "\n")
    n_total = ROUNDS * len(CLIENTS)
    paths.run_config_path(run).write_text(json.dumps({
        "config": config.to_dict(),
        "data": {"manifest_sha256": manifest},
        "clients": {c: {"n_train": 40, "n_val": 8} for c in CLIENTS},
        "seed": seed,
        "result": {"completed_rounds": ROUNDS, "best_round": ROUNDS,
                   "bytes_up_total": up * n_total, "bytes_down_total": down * n_total},
    }))
    save_file({}, str(paths.shared_tensors_path(run)))
    if not evaluated:
        return run
    rows, per_client = [], {}
    for client in CLIENTS:
        labels = _client_labels(client)
        logits = STRENGTH[method] * (2 * labels - 1) + rng.normal(0, 1.0, labels.size)
        probs = 1.0 / (1.0 + np.exp(-logits))
        metrics = binary_metrics(labels, probs)
        metrics["ci95"] = {k: list(v) for k, v in bootstrap_ci(labels, probs, n_boot=50, seed=seed).items()}
        per_client[client] = metrics
        for sid, label, prob in zip(_subjects(client), labels, probs, strict=True):
            if sid != drop_subject:
                rows.append((sid, client, client, "test", int(label), float(prob), int(prob >= 0.5), 0.5))
            # a cross-site row that compare must ignore
            rows.append((sid, client, "shared", "test", int(label), 0.5, 1, 0.5))
    macro = {k: float(np.mean([per_client[c][k] for c in CLIENTS])) for k in ("balanced_accuracy", "auc")}
    paths.eval_dir(run).mkdir()
    paths.metrics_path(run).write_text(json.dumps({
        "split": "test", "round": "best", "round_index": ROUNDS,
        "threshold": {"mode": "0.5", "per_model": {}},
        "per_client": per_client, "macro": macro,
    }))
    with paths.predictions_path(run).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("subject", "client", "model", "split", "label", "probability", "prediction",
                         "threshold"))
        writer.writerows(rows)
    return run


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """3 methods x 3 seeds, every run evaluated on the same subjects."""
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root, method, seed) for method in STRENGTH for seed in (0, 1, 2)]


@pytest.fixture(scope="session")
def evaluations(runs: list[Path]) -> list:
    return [load_evaluation(run) for run in runs]


def _by(evaluations: list, method: str, seed: int):
    return next(e for e in evaluations if e.method == method and e.seed == seed)


def test_wilcoxon_p_equals_scipy_and_holm_equals_statsmodels(evaluations: list) -> None:
    comparison = compare(evaluations, "wilcoxon", reference="duallora")
    rows = {row.baseline: row for row in comparison.primary_rows}
    assert set(rows) == {"fedlora", "ffalora"}
    raw = []
    for baseline in ("fedlora", "ffalora"):
        a, b = ([_by(evaluations, method, s).metrics[c]["balanced_accuracy"]
                 for s in (0, 1, 2) for c in CLIENTS] for method in ("duallora", baseline))
        expected = scipy.stats.wilcoxon(np.subtract(a, b), zero_method="wilcox")
        row = rows[baseline]
        assert row.result.n == 9
        assert row.result.p_value == pytest.approx(expected.pvalue, rel=1e-12)
        assert row.result.extra_value("median_difference") == pytest.approx(np.median(np.subtract(a, b)))
        assert row.result.effect > 0  # the reference is built to be better
        raw.append(expected.pvalue)
    holm_expected = multipletests(raw, method="holm")[1]
    assert [rows["fedlora"].p_holm, rows["ffalora"].p_holm] == pytest.approx(list(holm_expected))
    assert not any(row.warnings for row in comparison.rows)  # 9 pairs can reach 0.05


def test_mcnemar_equals_statsmodels_on_pooled_table(evaluations: list) -> None:
    comparison = compare(evaluations, "mcnemar", reference="duallora")
    pooled = {row.baseline: row for row in comparison.primary_rows}
    ref = [_by(evaluations, "duallora", s) for s in (0, 1, 2)]
    base = [_by(evaluations, "ffalora", s) for s in (0, 1, 2)]
    right_a = np.concatenate([e.own[c].correct for e in ref for c in CLIENTS])
    right_b = np.concatenate([e.own[c].correct for e in base for c in CLIENTS])
    table = [[int((right_a & right_b).sum()), int((right_a & ~right_b).sum())],
             [int((~right_a & right_b).sum()), int((~right_a & ~right_b).sum())]]
    exact = table[0][1] + table[1][0] < 25
    expected = mcnemar(table, exact=exact, correction=True)
    row = pooled["ffalora"]
    assert row.result.n == 3 * len(CLIENTS) * N_SUBJECTS
    assert row.result.p_value == pytest.approx(expected.pvalue, rel=1e-12)
    assert row.result.effect == pytest.approx(table[0][1] / table[1][0])
    scopes = {r.scope for r in comparison.rows if r.baseline == "ffalora"}
    assert scopes == {"pooled", "seed 0", "seed 1", "seed 2"}
    seed_rows = [r for r in comparison.rows if r.scope == "seed 1"]
    assert [r.p_holm for r in seed_rows] == pytest.approx(
        list(multipletests([r.result.p_value for r in seed_rows], method="holm")[1]))


def test_delong_and_bootstrap_pool_subject_seed_pairs(evaluations: list) -> None:
    ref = [_by(evaluations, "duallora", s) for s in (0, 1, 2)]
    base = [_by(evaluations, "fedlora", s) for s in (0, 1, 2)]
    labels = np.concatenate([e.own[c].labels for e in ref for c in CLIENTS])
    prob_a = np.concatenate([e.own[c].probabilities for e in ref for c in CLIENTS])
    prob_b = np.concatenate([e.own[c].probabilities for e in base for c in CLIENTS])
    delong = {r.baseline: r for r in compare(evaluations, "delong").primary_rows}["fedlora"]
    assert delong.result.p_value == pytest.approx(delong_test(labels, prob_a, prob_b).p_value)
    boot = {r.baseline: r for r in compare(evaluations, "bootstrap", n_boot=300).primary_rows}["fedlora"]
    pred_a, pred_b = (prob_a >= 0.5).astype(int), (prob_b >= 0.5).astype(int)
    observed = binary_metrics(labels, pred_a)["balanced_accuracy"] - binary_metrics(labels, pred_b)[
        "balanced_accuracy"]
    assert boot.result.effect == pytest.approx(observed)
    assert boot.result.ci_low <= observed <= boot.result.ci_high


def test_few_pairs_warning_in_tables_and_console(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, m, 0) for m in ("duallora", "fedlora")]  # 1 seed x 3 clients
    buffer = io.StringIO()
    result = compare_runs(runs, "wilcoxon", out=tmp_path / "report",
                          console=Console(file=buffer, width=200))
    row = result.comparison.primary_rows[0]
    assert row.result.n == 3
    assert any("too few pairs" in w for w in row.warnings)
    assert row.min_attainable_p == pytest.approx(0.25)
    assert "too few pairs" in buffer.getvalue()
    assert "too few pairs" in (tmp_path / "report" / "comparison.md").read_text()
    assert "too few pairs" in (tmp_path / "report" / "comparison.csv").read_text()


def _refusal_cases(tmp_path: Path, case: str) -> tuple[list[Path], str, str]:
    """(runs, reference, the run folder the message must name) for each refusal."""
    good = [make_run(tmp_path, "duallora", 0), make_run(tmp_path, "fedlora", 0)]
    if case == "manifest":
        odd = make_run(tmp_path, "ffalora", 0, manifest="x" * 64)
        return [*good, odd], "duallora", str(odd)
    if case == "subjects":
        odd = make_run(tmp_path, "ffalora", 0, drop_subject="philips-003")
        return [*good, odd], "duallora", str(odd)
    if case == "unevaluated":
        odd = make_run(tmp_path, "ffalora", 0, evaluated=False)
        return [*good, odd], "duallora", str(odd)
    if case == "reference":
        return good, "ffalora", str(good[0])
    if case == "round":
        odd = make_run(tmp_path, "ffalora", 0)
        doc = json.loads(paths.metrics_path(odd).read_text())
        paths.metrics_path(odd).write_text(json.dumps({**doc, "round": "last"}))
        return [*good, odd], "duallora", str(odd)
    if case == "seeds":
        odd = make_run(tmp_path, "ffalora", 7)
        return [*good, odd], "duallora", str(odd)
    copy = tmp_path / "again" / "fedlora-s0"
    shutil.copytree(good[1], copy)
    return [*good, copy], "duallora", str(copy)


@pytest.mark.parametrize(("case", "error", "phrase"), [
    ("manifest", DataError, "manifest sha256"),
    ("subjects", DataError, "different test subjects"),
    ("unevaluated", DataError, "cmrfed evaluate"),
    ("reference", UsageError, "--reference 'ffalora'"),
    ("round", DataError, "evaluated round"),
    ("seeds", DataError, "shares a seed"),
    ("duplicate", UsageError, "two runs of fedlora with seed 0"),
])
def test_refusals_name_the_run(tmp_path: Path, case: str, error: type, phrase: str) -> None:
    runs, reference, named = _refusal_cases(tmp_path, case)
    with pytest.raises(error) as caught:
        compare_runs(runs, "wilcoxon", reference=reference, out=tmp_path / "report",
                     console=Console(file=io.StringIO()))
    assert phrase in str(caught.value)
    assert named in str(caught.value)
    assert not (tmp_path / "report").exists()


def test_report_files_and_figures(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = compare_runs(runs, "wilcoxon", out=out, console=Console(file=io.StringIO()))
    assert all(f.exists() for f in result.files)
    doc = json.loads(paths.comparison_json_path(out).read_text())
    assert doc["test"] == "wilcoxon" and doc["reference"] == "duallora"
    assert [m["method"] for m in doc["methods"]] == ["duallora", "fedlora", "ffalora"]
    assert all(m["n_runs"] == 3 for m in doc["methods"])
    comm = {m["method"]: m["communication"] for m in doc["methods"]}
    assert comm["ffalora"]["bytes_up_per_client_per_round"] == BYTES_UP["ffalora"]
    assert comm["duallora"]["bytes_up_total"] == BYTES_UP["duallora"] * ROUNDS * len(CLIENTS)
    assert [p["round"] for p in doc["methods"][0]["val_curve"]] == [1, 2, 3]
    with paths.comparison_csv_path(out).open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["baseline"] for r in rows} == {"fedlora", "ffalora"}
    assert all(float(r["p_holm"]) >= float(r["p_value"]) for r in rows)
    markdown = paths.comparison_md_path(out).read_text()
    for needed in ("## Tests", "p (Holm)", "## Communication", "ge", "± "):
        assert needed in markdown
    for name in FIGURES:
        image = matplotlib.image.imread(paths.report_figure_path(out, name))
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.01  # something was drawn
    with pytest.raises(UsageError, match="--overwrite"):
        compare_runs(runs, "wilcoxon", out=out, console=Console(file=io.StringIO()))
    compare_runs(runs, "mcnemar", out=out, overwrite=True, console=Console(file=io.StringIO()))
    assert json.loads(paths.comparison_json_path(out).read_text())["test"] == "mcnemar"


def test_cli_exit_codes(runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    out = tmp_path / "cli-report"
    args = ["compare", *map(str, runs), "--test", "wilcoxon", "--out", str(out)]
    ok = runner.invoke(cli, args)
    assert ok.exit_code == 0, ok.output
    assert "report:" in ok.output and paths.comparison_json_path(out).exists()
    bad_choice = runner.invoke(cli, ["compare", str(runs[0]), "--test", "ttest", "--out", str(out)])
    assert bad_choice.exit_code == 2
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "already exists" in again.output
    # the console entry point maps UsageError to exit 2 and DataError to exit 1
    (tmp_path / "not-a-run").mkdir()
    for argv, code in ((args, 2), (["compare", str(tmp_path / "nope"), "--test", "mcnemar", "--out",
                                    str(tmp_path / "r2")], 2),
                       (["compare", str(tmp_path / "not-a-run"), "--test", "mcnemar", "--out",
                         str(tmp_path / "r2")], 1)):
        monkeypatch.setattr(sys, "argv", ["cmrfed", *argv])
        with pytest.raises(SystemExit) as caught:
            main()
        assert caught.value.code == code


def test_comparison_is_deterministic_and_notes_unpaired_seeds(runs: list[Path], tmp_path: Path) -> None:
    extra = make_run(tmp_path, "fedlora", 9)  # no duallora run of seed 9
    evaluations = [load_evaluation(run) for run in [*runs, extra]]
    first = compare(evaluations, "bootstrap", n_boot=200)
    second = compare(evaluations, "bootstrap", n_boot=200)
    assert [r.result for r in first.rows] == [r.result for r in second.rows]
    assert any(str(extra) in w and "left out" in w for w in first.warnings)
    pooled = {r.baseline: r for r in first.primary_rows}
    assert pooled["fedlora"].result.n == 3 * len(CLIENTS) * N_SUBJECTS  # seed 9 not paired
