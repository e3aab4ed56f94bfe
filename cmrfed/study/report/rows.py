"""The report's tables as rows: text cells for report.md and report.html, plain values for the CSVs."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmrfed.study.report.document import MAIN_METRICS, PARTICIPATION, nan_of

SHORT = {"balanced_accuracy": "bal. acc.", "sensitivity": "sens.", "specificity": "spec.", "auc": "AUC",
         "f1": "F1", "mcc": "MCC"}


def num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "—"


def p_text(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def bytes_text(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def summary_cell(summary: Mapping[str, Any]) -> str:
    low, high = summary["ci95"]
    return f"{num(summary['mean'])} ± {num(summary['sd'])} [{num(low)}, {num(high)}]"


def _test_cells(method: Mapping[str, Any]) -> list[str]:
    test = method["test_vs_reference"]
    if test is None:
        return ["reference", "—", "—", "—"]
    low, high = test["effect_ci95"]
    return [p_text(test["p_holm"]), f"{num(test['effect'])} [{num(low)}, {num(high)}]", str(test["n_pairs"]),
            p_text(test["p_value"])]


def main_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table as (header, rows) of text, shared by the Markdown and the HTML."""
    header = ["method", "seeds", *(SHORT[m] for m in MAIN_METRICS), "p (Holm)", "effect [95% CI]",
              "pairs", "p (raw)", "trainable params", "up / client / round", "down / client / round",
              "total bytes"]
    rows = []
    for m in doc["main"]["methods"]:
        rows.append([m["method"], str(m["n_seeds"]), *(summary_cell(m["macro"][k]) for k in MAIN_METRICS),
                     *_test_cells(m), f"{m['trainable_parameters']:,}",
                     bytes_text(m["bytes_up_per_client_per_round"]),
                     bytes_text(m["bytes_down_per_client_per_round"]), bytes_text(m["bytes_total"])])
    return header, rows


def site_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "site", *(SHORT[m] for m in MAIN_METRICS)]
    rows = []
    for m in doc["main"]["methods"]:
        for site, metrics in m["per_site"].items():
            rows.append([m["method"], site, *(summary_cell(metrics[k]) for k in MAIN_METRICS)])
    return header, rows


def ablation_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["blocks", "rank", "method", f"{doc['tested_metric'].replace('_', ' ')} [95% CI]", "p (Holm)",
              "trainable params", "up / client / round", "total bytes", "s / round"]
    rows = []
    for s in doc["settings"]:
        for m in s["methods"]:
            test = m["test_vs_reference"]
            rows.append([str(s["blocks"]), str(s["rank"]), m["method"], summary_cell(m["tested_metric"]),
                         "reference" if test is None else p_text(test["p_holm"]),
                         f"{m['trainable_parameters']:,}", bytes_text(m["bytes_up_per_client_per_round"]),
                         bytes_text(m["bytes_total"]), num(m["seconds_per_round"], 2)])
    return header, rows


def participation_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The participation gap as (header, rows) of text; empty when no site was held out."""
    part = doc.get("participation")
    if not part:
        return [], []
    header = ["method", "held-out site", "seeds", *(f"{label} [95% CI]" for _, label in PARTICIPATION),
              "member − zero-shot", "member − adapted"]
    rows = []
    for row in part["rows"]:
        member = row["member"]["mean"]
        rows.append([row["method"], row["site"], str(len(row["seeds"])),
                     *(summary_cell(row[kind]) for kind, _ in PARTICIPATION),
                     num(nan_of(member) - nan_of(row["held_out"]["mean"])),
                     num(nan_of(member) - nan_of(row["adapted"]["mean"]))])
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def long_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Every summary number, one row each (setting, method, scope, metric)."""
    header = ["blocks", "rank", "method", "scope", "metric", "mean", "sd", "ci_low", "ci_high", "n_seeds"]
    rows = []
    for s in doc["settings"]:
        for m in s["methods"]:
            scopes = {"macro": m["macro"], **m["per_site"]}
            for scope, metrics in scopes.items():
                for metric, v in metrics.items():
                    rows.append([s["blocks"], s["rank"], m["method"], scope, metric, v["mean"], v["sd"],
                                 v["ci95"][0], v["ci95"][1], v["n"]])
    return header, rows


def main_csv(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["blocks", "rank", "method", "n_seeds",
              *(f"{m}_{k}" for m in MAIN_METRICS for k in ("mean", "sd", "ci_low", "ci_high")),
              "test", "n_pairs", "p_value", "p_holm", "effect_name", "effect", "effect_ci_low",
              "effect_ci_high", "trainable_parameters", "bytes_up_per_client_per_round",
              "bytes_down_per_client_per_round", "bytes_total", "seconds_per_round"]
    rows = []
    for s in doc["settings"]:
        for m in s["methods"]:
            t = m["test_vs_reference"] or {}
            rows.append([s["blocks"], s["rank"], m["method"], m["n_seeds"],
                         *(v for metric in MAIN_METRICS for v in (
                             m["macro"][metric]["mean"], m["macro"][metric]["sd"],
                             *m["macro"][metric]["ci95"])),
                         t.get("test", ""), t.get("n_pairs", ""), t.get("p_value", ""), t.get("p_holm", ""),
                         t.get("effect_name", ""), t.get("effect", ""), *(t.get("effect_ci95") or ["", ""]),
                         m["trainable_parameters"], m["bytes_up_per_client_per_round"],
                         m["bytes_down_per_client_per_round"], m["bytes_total"], m["seconds_per_round"]])
    return header, rows


def participation_csv(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per (method, held-out site, seed, how it took part) with the tested metric."""
    part = doc["participation"]
    header = ["method", "site", "seed", "participation", part["metric"], "cell"]
    rows = []
    for row in part["rows"]:
        for index, seed in enumerate(row["seeds"]):
            for kind, _ in PARTICIPATION:
                cell = row["member_cells" if kind == "member" else "cells"][index]
                rows.append([row["method"], row["site"], seed, kind, row[kind]["values"][index], cell])
    return header, rows


def ablation_csv(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["blocks", "rank", "method", "metric", "mean", "sd", "ci_low", "ci_high", "p_holm",
              "trainable_parameters", "bytes_up_per_client_per_round", "bytes_down_per_client_per_round",
              "bytes_total", "seconds_per_round"]
    rows = []
    for s in doc["settings"]:
        for m in s["methods"]:
            t, v = m["test_vs_reference"] or {}, m["tested_metric"]
            rows.append([s["blocks"], s["rank"], m["method"], doc["tested_metric"], v["mean"], v["sd"],
                         *v["ci95"], t.get("p_holm", ""), m["trainable_parameters"],
                         m["bytes_up_per_client_per_round"], m["bytes_down_per_client_per_round"],
                         m["bytes_total"], m["seconds_per_round"]])
    return header, rows
