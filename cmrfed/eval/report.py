"""``cmrfed compare``'s stage function and its report: JSON, CSV, Markdown and PNG figures.

:func:`compare_runs` is load (:func:`cmrfed.eval.run_evaluation.load_evaluation`) -> compare
(:func:`cmrfed.eval.compare.compare`, pure) -> :func:`write_report`. The report folder is written
atomically: it appears complete or not at all. Figures are drawn on bare matplotlib ``Figure``
objects with the Agg canvas: no pyplot, no global backend state, no display needed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from cmrfed import paths
from cmrfed.atomic import json_safe, write_json
from cmrfed.eval.compare import Comparison, MethodSummary, MetricSummary, TestRow, compare
from cmrfed.eval.run_evaluation import load_evaluation
from cmrfed.fed.privacy import privacy_markdown, run_privacy
from cmrfed.formatting import ci, num, p_value, size
from cmrfed.lock import folder_lock
from cmrfed.outputs import REPORT, check_replaceable, new_output
from cmrfed.provenance import versions

REPORT_FORMAT_VERSION = 1
FIGURES = ("metric_by_client", "roc_by_client", "metric_vs_bytes", "val_curves")
BASE_COLUMNS = ("test", "reference", "baseline", "scope", "metric", "n_pairs", "statistic", "p_value",
                "p_holm", "effect_name", "effect", "ci_low", "ci_high", "confidence",
                "min_attainable_p", "warnings", "note")


@dataclass(frozen=True)
class ComparisonResult:
    """What ``compare_runs`` returns: the comparison and where its report was written."""

    comparison: Comparison
    out: Path
    files: tuple[Path, ...]


def compare_runs(
    runs: Sequence[str | Path],
    test: str,
    reference: str = "duallora",
    metric: str = "balanced_accuracy",
    *,
    out: str | Path,
    overwrite: bool = False,
    console: Console | None = None,
) -> ComparisonResult:
    """Compare evaluated RUN folders and write the report folder ``out`` (the CLI's stage)."""
    console = console or Console()
    with folder_lock(out):
        check_replaceable(Path(out), REPORT, overwrite)  # before reading every run
        evaluations = [load_evaluation(run) for run in runs]
        comparison = compare(evaluations, test, reference=reference, metric=metric)
        privacy = {str(ev.run): run_privacy(ev.run) for ev in evaluations}
        files = write_report(comparison, Path(out), overwrite=overwrite, privacy=privacy)
    print_comparison(console, comparison, Path(out))
    return ComparisonResult(comparison, Path(out), files)


# --- JSON / CSV ------------------------------------------------------------------------------


def _row_record(comparison: Comparison, row: TestRow) -> dict[str, Any]:
    result = row.result
    record = {
        "test": result.test, "reference": comparison.reference, "baseline": row.baseline,
        "scope": row.scope, "metric": comparison.metric, "n_pairs": result.n,
        "statistic": result.statistic, "p_value": result.p_value, "p_holm": row.p_holm,
        "effect_name": result.effect_name, "effect": result.effect, "ci_low": result.ci_low,
        "ci_high": result.ci_high, "confidence": result.confidence,
        "min_attainable_p": row.min_attainable_p, "warnings": "; ".join(row.warnings),
        "note": result.note,
    }
    record.update(dict(result.extra))
    return record


def _summary_record(summary: MetricSummary) -> dict[str, Any]:
    return {"client": summary.client, "seeds": list(summary.seeds), "values": list(summary.values),
            "mean": summary.mean, "sd": summary.sd, "ci95": [summary.ci_low, summary.ci_high],
            "ci_kind": summary.ci_kind}


def _method_record(method: MethodSummary) -> dict[str, Any]:
    comm = method.communication
    return {
        "method": method.method,
        "n_runs": len(method.runs),
        "runs": [{"run": r.run, "seed": r.seed} for r in method.runs],
        "per_client": [_summary_record(s) for s in method.per_client],
        "macro": _summary_record(method.macro),
        "communication": {
            "rounds": comm.rounds,
            "bytes_up_per_client_per_round": comm.bytes_up_per_client_round,
            "bytes_down_per_client_per_round": comm.bytes_down_per_client_round,
            "bytes_up_per_client": comm.bytes_up_per_client,
            "bytes_down_per_client": comm.bytes_down_per_client,
            "bytes_up_total": comm.bytes_up_total,
            "bytes_down_total": comm.bytes_down_total,
        },
        "val_curve": [{"round": r, "mean_val_balanced_accuracy": v} for r, v in method.val_curve],
        "roc_auc_pooled_over_seeds": {c.client: c.auc for c in method.roc},
    }


def comparison_document(comparison: Comparison,
                        privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole comparison as a JSON-ready dict (comparison.json); ``privacy``: each run's DP
    spend per site (None for a run without DP), keyed by run folder."""
    return json_safe({
        "format_version": REPORT_FORMAT_VERSION,
        "created_by": "cmrfed compare",
        "test": comparison.test,
        "reference": comparison.reference,
        "metric": comparison.metric,
        "tested": comparison.measure,
        "alpha": comparison.alpha,
        "split": comparison.split,
        "round": comparison.round_choice,
        "clients": list(comparison.clients),
        "pairing": comparison.pairing,
        "methods": [_method_record(m) for m in comparison.methods],
        "tests": [_row_record(comparison, row) for row in comparison.rows],
        "warnings": list(comparison.warnings),
        "inputs_sha256": comparison.inputs,
        "privacy": privacy or {},
        "figures": [f"{name}.png" for name in FIGURES],
        "versions": versions(),
    })


def _write_csv(path: Path, comparison: Comparison) -> None:
    records = [json_safe(_row_record(comparison, row)) for row in comparison.rows]
    extra = sorted({key for record in records for key in record} - set(BASE_COLUMNS))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*BASE_COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(records)


# --- Markdown --------------------------------------------------------------------------------


SHORT_EFFECT_NAMES = {
    "hodges_lehmann_median_difference": "HL median diff",
    "discordant_odds_ratio_a_over_b": "odds ratio",
    "auc_difference": "AUC diff",
}


def _effect_text(row: TestRow, compact: bool = False) -> str:
    """The effect and its name; with the plain median difference and rank-biserial unless compact."""
    result = row.result
    name = SHORT_EFFECT_NAMES.get(result.effect_name, result.effect_name.replace("_", " "))
    text = f"{name} {num(result.effect)}"
    extra = dict(result.extra)
    if "rank_biserial" in extra and not compact:
        text += (f"; median diff {num(extra['median_difference'])}; "
                 f"rank-biserial {num(extra['rank_biserial'])}")
    return text


def _markdown(comparison: Comparison, privacy: dict[str, Any] | None = None) -> str:
    c = comparison
    lines = [
        f"# Comparison: {c.test}, reference {c.reference}",
        "",
        f"- tested: {c.measure}; summary metric: `{c.metric}`; evaluated split: `{c.split}`; "
        f"round: `{c.round_choice}`; alpha {c.alpha:g}; clients: {', '.join(c.clients)}",
        f"- pairing: {c.pairing}.",
        "- differences are reference minus baseline: a positive effect (an odds ratio above 1) favours "
        f"{c.reference}. Holm's correction runs across the baselines within each scope.",
        "",
        "## Runs",
        "",
        "| method | n runs | seeds | runs |",
        "|---|---:|---|---|",
    ]
    for m in c.methods:
        lines.append(f"| {m.method} | {len(m.runs)} | {', '.join(map(str, m.seeds))} | "
                     f"{', '.join(f'`{r.run}`' for r in m.runs)} |")
    lines += ["", f"## {c.metric} per client (mean ± sd over seeds, 95% CI)", "",
              "| method | " + " | ".join([*c.clients, "macro"]) + " |",
              "|---|" + "---|" * (len(c.clients) + 1)]
    for m in c.methods:
        cells = [f"{num(s.mean)} ± {num(s.sd)} {ci(s.ci_low, s.ci_high)}"
                 for s in (*m.per_client, m.macro)]
        lines.append(f"| {m.method} | " + " | ".join(cells) + " |")
    kinds = sorted({s.ci_kind for m in c.methods for s in m.per_client})
    single = " Macro CIs of one seed are not computed." if any(len(m.runs) == 1 for m in c.methods) else ""
    lines += ["", f"CI: {'; '.join(kinds)}.{single}", "",
              "## Tests", "",
              "| baseline | scope | n pairs | effect | 95% CI | p | p (Holm) | warnings |",
              "|---|---|---:|---|---|---:|---:|---|"]
    for row in c.rows:
        r = row.result
        lines.append(f"| {row.baseline} | {row.scope} | {r.n} | {_effect_text(row)} | "
                     f"{ci(r.ci_low, r.ci_high)} | {p_value(r.p_value)} | {p_value(row.p_holm)} | "
                     f"{'; '.join(row.warnings) or '—'} |")
    notes = [f"- {row.baseline} ({row.scope}): {row.result.note}" for row in c.rows if row.result.note]
    if notes:
        lines += ["", "Test notes:", "", *notes]
    if c.warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in c.warnings)]
    lines += ["", "## Communication (bytes actually serialised; mean over seeds)", "",
              "| method | rounds | up / client / round | down / client / round | up, whole run | "
              "down, whole run |", "|---|---:|---:|---:|---:|---:|"]
    for m in c.methods:
        comm = m.communication
        lines.append(f"| {m.method} | {comm.rounds:g} | {size(comm.bytes_up_per_client_round)} | "
                     f"{size(comm.bytes_down_per_client_round)} | {size(comm.bytes_up_total)} | "
                     f"{size(comm.bytes_down_total)} |")
    lines += ["", "Per client, whole run (up / down):", ""]
    for m in c.methods:
        comm = m.communication
        per_client = ", ".join(f"{k} {size(comm.bytes_up_per_client[k])} / "
                               f"{size(comm.bytes_down_per_client[k])}" for k in c.clients)
        lines.append(f"- {m.method}: {per_client}")
    runs = [(m.method, r.seed, str(r.run)) for m in c.methods for r in m.runs]
    lines += ["", *privacy_markdown(runs, privacy or {})]
    lines += ["", "## Figures", "",
              f"- `metric_by_client.png`: {c.metric} per client and macro, mean over seeds, 95% CI bars.",
              "- `roc_by_client.png`: ROC per client, one curve per method, test subjects pooled over "
              "seeds.",
              f"- `metric_vs_bytes.png`: macro {c.metric} of each run against the bytes it sent and "
              "received (up + down, whole run).",
              "- `val_curves.png`: mean client validation balanced accuracy per round, mean over seeds.",
              ""]
    for name in FIGURES:
        lines.append(f"![{name}]({name}.png)")
    return "\n".join(lines) + "\n"


# --- figures ---------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _color(index: int) -> str:
    return f"C{index % 10}"


def _plot_metric_by_client(c: Comparison, path: Path) -> None:
    groups = [*c.clients, "macro"]
    figure = _figure(max(6.0, 1.3 * len(groups) * max(1, len(c.methods)) / 2 + 2), 4.2)
    ax = figure.subplots()
    width = 0.8 / len(c.methods)
    x = np.arange(len(groups))
    for i, method in enumerate(c.methods):
        summaries = [*method.per_client, method.macro]
        means = np.array([s.mean for s in summaries])
        low = np.array([s.mean - s.ci_low for s in summaries])
        high = np.array([s.ci_high - s.mean for s in summaries])
        errors = np.nan_to_num(np.clip(np.vstack([low, high]), 0, None))
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(means), width, yerr=errors, capsize=3,
               label=method.method, color=_color(i))
    ax.set_xticks(x, groups)
    ax.set_ylabel(c.metric.replace("_", " "))
    ax.set_title(f"{c.metric.replace('_', ' ')} per client (mean over seeds, 95% CI)")
    ax.legend(fontsize="small")
    figure.savefig(path)


def _plot_roc(c: Comparison, path: Path) -> None:
    columns = min(4, len(c.clients))
    rows = math.ceil(len(c.clients) / columns)
    figure = _figure(3.4 * columns, 3.4 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, client in zip(axes, c.clients, strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
        for i, method in enumerate(c.methods):
            for curve in method.roc:
                if curve.client == client:
                    # straight segments between ROC vertices: tied scores give diagonal steps
                    ax.plot(curve.fpr, curve.tpr, color=_color(i),
                            label=f"{method.method} (AUC {num(curve.auc)})")
        ax.set_title(client)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="x-small", loc="lower right")
        else:  # a site without test subjects (or one class) has no curve: say so in its panel
            ax.text(0.5, 0.5, "no ROC curve\n(no subjects of both classes)", ha="center",
                    va="center", fontsize="small", color="0.4", transform=ax.transAxes)
    for ax in axes[len(c.clients):]:
        ax.set_visible(False)
    figure.suptitle("ROC per client (test subjects pooled over seeds)")
    figure.savefig(path)


def _plot_metric_vs_bytes(c: Comparison, path: Path) -> None:
    figure = _figure(6.0, 4.2)
    ax = figure.subplots()
    for i, method in enumerate(c.methods):
        xs = [p.bytes_total / (1 << 20) for p in method.points]
        ys = [p.macro_metric for p in method.points]
        ax.scatter(xs, ys, color=_color(i), label=method.method, s=36)
    ax.set_xlabel("bytes communicated, up + down, whole run (MiB)")
    ax.set_ylabel(f"macro {c.metric.replace('_', ' ')}")
    ax.set_title("metric against communication (one point per run)")
    ax.legend(fontsize="small")
    figure.savefig(path)


def _plot_val_curves(c: Comparison, path: Path) -> None:
    figure = _figure(6.0, 4.2)
    ax = figure.subplots()
    for i, method in enumerate(c.methods):
        if method.val_curve:
            rounds, values = zip(*method.val_curve, strict=True)
            ax.plot(rounds, values, marker="o", markersize=3, color=_color(i), label=method.method)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean client val balanced accuracy")
    ax.set_title("validation per round (mean over seeds)")
    ax.legend(fontsize="small")
    figure.savefig(path)


_PLOTTERS = {
    "metric_by_client": _plot_metric_by_client,
    "roc_by_client": _plot_roc,
    "metric_vs_bytes": _plot_metric_vs_bytes,
    "val_curves": _plot_val_curves,
}


def write_report(comparison: Comparison, out: Path, overwrite: bool = False,
                 privacy: dict[str, Any] | None = None) -> tuple[Path, ...]:
    """Write REPORT/comparison.{json,csv,md} and the PNG figures, atomically as one folder."""
    out = Path(out)
    with new_output(out, REPORT, overwrite) as tmp:
        write_json(paths.comparison_json_path(tmp), comparison_document(comparison, privacy))
        _write_csv(paths.comparison_csv_path(tmp), comparison)
        paths.comparison_md_path(tmp).write_text(_markdown(comparison, privacy), encoding="utf-8")
        for name in FIGURES:
            _PLOTTERS[name](comparison, paths.report_figure_path(tmp, name))
    return (paths.comparison_json_path(out), paths.comparison_csv_path(out), paths.comparison_md_path(out),
            *(paths.report_figure_path(out, name) for name in FIGURES))


# --- console ---------------------------------------------------------------------------------


def print_comparison(console: Console, comparison: Comparison, out: Path) -> None:
    """The final comparison as rich tables, its warnings, and where the report is."""
    c = comparison
    table = Table(title=f"{c.test}: {c.reference} vs each baseline ({c.measure}, {c.split} split)")
    for column in ("baseline", "scope", "n", "effect", "95% CI", "p", "p Holm", "warn"):
        table.add_column(column, justify="right" if column in ("n", "p", "p Holm") else "left")
    for row in c.rows:
        r = row.result
        table.add_row(row.baseline, row.scope, str(r.n), _effect_text(row, compact=True),
                      ci(r.ci_low, r.ci_high), p_value(r.p_value), p_value(row.p_holm),
                      "[yellow]yes[/]" if row.warnings else "",
                      style=None if row.scope == "pooled" else "dim")
    console.print(table)
    methods = Table(title="per method (mean ± sd over seeds)")
    for column in ("method", "runs", f"macro {c.metric}", "up / client / round", "bytes, whole run"):
        methods.add_column(column)
    for m in c.methods:
        comm = m.communication
        methods.add_row(m.method, str(len(m.runs)), f"{num(m.macro.mean)} ± {num(m.macro.sd)}",
                        size(comm.bytes_up_per_client_round),
                        size(comm.bytes_up_total + comm.bytes_down_total))
    console.print(methods)
    for warning in (*c.warnings, *(f"{row.baseline} ({row.scope}): {w}" for row in c.rows
                                   for w in row.warnings)):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"report: {out}", highlight=False)
