"""report.json: every number of the study report as one JSON-ready dict, read from the evaluated runs.

Every number comes through the functions ``cmrfed compare`` uses
(:func:`cmrfed.eval.compare.summarise_methods` for the per-metric summaries, the per-setting
:class:`Comparison` for the tests); nothing statistical is computed here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from cmrfed import paths
from cmrfed.eval.compare import MethodSummary, MetricSummary, TestRow, summarise_methods, summarise_values
from cmrfed.eval.report import FIGURES, ComparisonResult, json_ready
from cmrfed.eval.run_evaluation import load_evaluation
from cmrfed.fed.privacy import run_privacy
from cmrfed.provenance import versions
from cmrfed.study.config import StudyConfig, grid_settings
from cmrfed.study.newcomers import Newcomer
from cmrfed.study.plan import Cell, setting_name

REPORT_FORMAT_VERSION = 1


MAIN_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc", "f1", "mcc")


ABLATION_FIGURE = "ablation"

PARTICIPATION = (("held_out", "held out, zero-shot"), ("adapted", "after adapt"), ("member", "full member"))


def _numel(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys()))  # noqa: SIM118


def trainable_parameters(run: Path) -> int:
    """Scalars one client's model trains: its shared tensors plus its private ones, counted in
    the run's own tensor files (the method table decides what is in each)."""
    info = json.loads(paths.run_config_path(run).read_text(encoding="utf-8"))
    first = next(iter(info["clients"]))
    return _numel(paths.shared_tensors_path(run)) + _numel(paths.private_tensors_path(run, first))


def seconds_per_round(run: Path) -> float:
    """Mean measured wall time of a run's rounds (rounds.jsonl)."""
    lines = paths.rounds_log_path(run).read_text(encoding="utf-8").splitlines()
    walls = [json.loads(line)["wall_s"] for line in lines if line.strip()]
    return float(np.mean(walls)) if walls else float("nan")


def _summary_record(summary: MetricSummary) -> dict[str, Any]:
    return {"mean": summary.mean, "sd": summary.sd, "ci95": [summary.ci_low, summary.ci_high],
            "n": len([v for v in summary.values if math.isfinite(v)]), "values": list(summary.values)}


def _row_record(row: TestRow | None) -> dict[str, Any] | None:
    if row is None:
        return None
    r = row.result
    return {"test": r.test, "n_pairs": r.n, "p_value": r.p_value, "p_holm": row.p_holm,
            "effect_name": r.effect_name, "effect": r.effect, "effect_ci95": [r.ci_low, r.ci_high],
            "warnings": list(row.warnings)}


def _methods_of_setting(study: StudyConfig, runs: Mapping[str, Path], comparison: ComparisonResult,
                        ) -> list[dict[str, Any]]:
    """Per method of one setting (``runs``: cell name -> run folder): every metric (macro and per
    site), the test, the costs."""
    cell_of = {Path(run): name for name, run in runs.items()}
    evaluations = [load_evaluation(run) for run in runs.values()]
    reference = study.compare["reference"]
    by_metric: dict[str, dict[str, MethodSummary]] = {
        metric: {m.method: m for m in summarise_methods(evaluations, reference, metric)}
        for metric in MAIN_METRICS
    }
    rows = {row.baseline: row for row in comparison.comparison.primary_rows}
    tested = {m.method: m for m in comparison.comparison.methods}
    runs_of: dict[str, list[Path]] = {}
    for ev in evaluations:
        runs_of.setdefault(ev.method, []).append(Path(ev.run))
    out = []
    for method in tested:
        comm = tested[method].communication
        method_runs = runs_of[method]
        out.append({
            "method": method,
            "n_seeds": len(method_runs),
            "seeds": list(tested[method].seeds),
            "cells": sorted(cell_of[run] for run in method_runs),
            "macro": {metric: _summary_record(by_metric[metric][method].macro) for metric in MAIN_METRICS},
            "per_site": {s.client: {metric: _summary_record(next(
                x for x in by_metric[metric][method].per_client if x.client == s.client))
                for metric in MAIN_METRICS} for s in by_metric[MAIN_METRICS[0]][method].per_client},
            "test_vs_reference": _row_record(rows.get(method)),
            "trainable_parameters": trainable_parameters(method_runs[0]),
            "bytes_up_per_client_per_round": comm.bytes_up_per_client_round,
            "bytes_down_per_client_per_round": comm.bytes_down_per_client_round,
            "bytes_total": comm.bytes_up_total + comm.bytes_down_total,
            "rounds": comm.rounds,
            "seconds_per_round": float(np.mean([seconds_per_round(r) for r in method_runs])),
            "tested_metric": _summary_record(tested[method].macro),
        })
    return out


def _metric_of(path: Path, *keys: str) -> tuple[float, tuple[float, float]]:
    """A metric and its bootstrap interval from a JSON file of metrics (null read as NaN; NaN too
    when the site has no metrics, e.g. no subjects in the evaluated split)."""
    doc: Any = json.loads(path.read_text(encoding="utf-8"))
    for key in keys[:-1]:
        doc = doc.get(key) or {}
    metric = keys[-1]
    ci = doc.get("ci95", {}).get(metric) or [None, None]
    return nan_of(doc.get(metric)), (nan_of(ci[0]), nan_of(ci[1]))


def participation_document(study: StudyConfig, runs: Mapping[str, Path],
                           newcomers: Sequence[Newcomer]) -> dict[str, Any] | None:
    """Per method and held-out site, the tested metric over seeds of the site zero-shot, after
    ``adapt`` and as a member; None when the study holds no site out."""
    if not newcomers:
        return None
    metric = study.compare["metric"]
    grouped: dict[tuple[str, str], list[Newcomer]] = {}
    for n in newcomers:
        grouped.setdefault((n.cell.config.method, n.site), []).append(n)
    rows = []
    for method in study.methods:
        for site in study.holdout:
            group = sorted(grouped.get((method, site), []), key=lambda n: n.cell.config.seed)
            if not group:
                continue
            values: dict[str, list[tuple[float, tuple[float, float]]]] = {
                "held_out": [_metric_of(paths.site_eval_record_path(n.held_out), "metrics", metric)
                             for n in group],
                "adapted": [_metric_of(paths.site_eval_record_path(n.adapted_eval), "metrics", metric)
                            for n in group],
                "member": [_metric_of(paths.metrics_path(runs[n.member.name]), "per_client", site, metric)
                           for n in group],
            }
            seeds = tuple(n.cell.config.seed for n in group)
            adapt = [json.loads(paths.adapt_record_path(n.adapted).read_text(encoding="utf-8"))
                     for n in group]
            rows.append({
                "method": method, "site": site, "seeds": list(seeds),
                "cells": [n.cell.name for n in group], "member_cells": [n.member.name for n in group],
                **{kind: _summary_record(summarise_values(site, seeds, [v for v, _ in vals], metric,
                                                          vals[0][1])) for kind, vals in values.items()},
                "adapt_best_epoch": [a["best_epoch"] for a in adapt],
                "adapt_val_loss": [[a["val_loss"][0], a["val_loss"][a["best_epoch"]]] for a in adapt],
            })
    return {"metric": metric, "holdout": list(study.holdout), "adapt": dict(study.adapt), "rows": rows}


def study_document(study: StudyConfig, runs: Mapping[str, Path], cells: Sequence[Cell],
                   comparisons: Mapping[tuple[int | str, int], ComparisonResult],
                   newcomers: Sequence[Newcomer] = ()) -> dict[str, Any]:
    """Every number of the report as one JSON-ready dict (report.json)."""
    settings = []
    for blocks, rank in grid_settings(study):
        setting_runs = {c.name: runs[c.name] for c in cells if c.setting == (blocks, rank)}
        comparison = comparisons[(blocks, rank)]
        settings.append({"blocks": blocks, "rank": rank, "name": setting_name(blocks, rank),
                         "methods": _methods_of_setting(study, setting_runs, comparison),
                         "warnings": list(comparison.comparison.warnings)})
    main = next(s for s in settings if (s["blocks"], s["rank"]) == (study.main_blocks, study.main_rank))
    main_cells = [c for c in cells if c.setting == (study.main_blocks, study.main_rank)]
    privacy = {"runs": [[c.config.method, c.config.seed, c.name] for c in main_cells],
               "summaries": {c.name: run_privacy(runs[c.name]) for c in main_cells}}
    any_comparison = comparisons[(study.main_blocks, study.main_rank)].comparison
    return json_ready({
        "format_version": REPORT_FORMAT_VERSION,
        "created_by": "cmrfed study",
        "title": study.title,
        "test": study.compare["test"],
        "reference": study.compare["reference"],
        "tested_metric": study.compare["metric"],
        "pairing": any_comparison.pairing,
        "split": any_comparison.split,
        "round": any_comparison.round_choice,
        "clients": list(any_comparison.clients),
        "backbone": study.base.backbone,
        "main": {"blocks": main["blocks"], "rank": main["rank"], "methods": main["methods"]},
        "settings": settings,
        "privacy": privacy,
        "participation": participation_document(study, runs, newcomers),
        "figures": [f"{ABLATION_FIGURE}.png", *(f"{name}.png" for name in FIGURES)],
        "versions": versions(),
    })


def nan_of(value: Any) -> float:
    return float("nan") if value is None else float(value)
