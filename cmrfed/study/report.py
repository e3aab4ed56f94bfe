"""STUDY/report/: the study's main table, its ablation, figures and one self-contained report.html.

Every number comes from the evaluated runs through the functions ``cmrfed compare`` uses
(:func:`cmrfed.eval.compare.summarise_methods` for the per-metric summaries, the per-setting
:class:`Comparison` for the tests); nothing statistical is computed here. What this module adds
is the study's shape:

- the main table (one (blocks, rank) setting): per method, mean ± sd over seeds and 95% CI of
  balanced accuracy, sensitivity, specificity, AUC, F1 and MCC, macro over sites and per site;
  the p-value against the reference (the study's test, Holm-corrected), effect size and pair
  count; trainable parameters, bytes per client per round and total bytes;
- the ablation: the tested metric with its CI against adapted blocks and rank, with the
  communication and the measured time per round beside it;
- the participation gap, when the study holds sites out: per method and held-out site, the
  tested metric of the site zero-shot, after ``cmrfed adapt`` and as a full member (the grid
  cell of the same method and seed), mean ± sd over seeds.

The folder is written atomically; report.html embeds its figures as base64 data URIs and loads
nothing from the network.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors import safe_open

from cmrfed import paths
from cmrfed.atomic import atomic_dir, write_json
from cmrfed.eval.compare import MethodSummary, MetricSummary, TestRow, summarise_methods, summarise_values
from cmrfed.eval.report import FIGURES, ComparisonResult, json_ready
from cmrfed.eval.tables import load_evaluation
from cmrfed.faults import fault_point
from cmrfed.fed.methods import resolve_method
from cmrfed.fed.privacy import privacy_markdown, run_privacy
from cmrfed.fed.strategy import AGGREGATE_RULES
from cmrfed.provenance import versions
from cmrfed.study.config import StudyConfig, grid_settings
from cmrfed.study.newcomers import Newcomer
from cmrfed.study.plan import Cell, setting_name

REPORT_FORMAT_VERSION = 1
MAIN_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc", "f1", "mcc")
SHORT = {"balanced_accuracy": "bal. acc.", "sensitivity": "sens.", "specificity": "spec.", "auc": "AUC",
         "f1": "F1", "mcc": "MCC"}
ABLATION_FIGURE = "ablation"


@dataclass(frozen=True)
class StudyReport:
    out: Path
    html: Path
    document: dict[str, Any]


# --- numbers from the runs ---------------------------------------------------------------------


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


PARTICIPATION = (("held_out", "held out, zero-shot"), ("adapted", "after adapt"), ("member", "full member"))


def _metric_of(path: Path, *keys: str) -> tuple[float, tuple[float, float]]:
    """A metric and its bootstrap interval from a JSON file of metrics (null read as NaN; NaN too
    when the site has no metrics, e.g. no subjects in the evaluated split)."""
    doc: Any = json.loads(path.read_text(encoding="utf-8"))
    for key in keys[:-1]:
        doc = doc.get(key) or {}
    metric = keys[-1]
    ci = doc.get("ci95", {}).get(metric) or [None, None]
    return _nan(doc.get(metric)), (_nan(ci[0]), _nan(ci[1]))


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
        "aggregate": study.base.aggregate,
        "mixing": {"feddpa_scale": study.base.feddpa_scale, "feddpa_k": study.base.feddpa_k}
        if any(resolve_method(m, study.base.head).mixing for m in study.methods) else None,
        "main": {"blocks": main["blocks"], "rank": main["rank"], "methods": main["methods"]},
        "settings": settings,
        "privacy": privacy,
        "participation": participation_document(study, runs, newcomers),
        "figures": [f"{ABLATION_FIGURE}.png", *(f"{name}.png" for name in FIGURES)],
        "versions": versions(),
    })


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "—"


def _p(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _cell(summary: Mapping[str, Any]) -> str:
    low, high = summary["ci95"]
    return f"{_num(summary['mean'])} ± {_num(summary['sd'])} [{_num(low)}, {_num(high)}]"


def _test_cells(method: Mapping[str, Any]) -> list[str]:
    test = method["test_vs_reference"]
    if test is None:
        return ["reference", "—", "—", "—"]
    low, high = test["effect_ci95"]
    return [_p(test["p_holm"]), f"{_num(test['effect'])} [{_num(low)}, {_num(high)}]", str(test["n_pairs"]),
            _p(test["p_value"])]


def main_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table as (header, rows) of text, shared by the Markdown and the HTML."""
    header = ["method", "seeds", *(SHORT[m] for m in MAIN_METRICS), "p (Holm)", "effect [95% CI]",
              "pairs", "p (raw)", "trainable params", "up / client / round", "down / client / round",
              "total bytes"]
    rows = []
    for m in doc["main"]["methods"]:
        rows.append([m["method"], str(m["n_seeds"]), *(_cell(m["macro"][k]) for k in MAIN_METRICS),
                     *_test_cells(m), f"{m['trainable_parameters']:,}",
                     _bytes(m["bytes_up_per_client_per_round"]), _bytes(m["bytes_down_per_client_per_round"]),
                     _bytes(m["bytes_total"])])
    return header, rows


def site_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "site", *(SHORT[m] for m in MAIN_METRICS)]
    rows = []
    for m in doc["main"]["methods"]:
        for site, metrics in m["per_site"].items():
            rows.append([m["method"], site, *(_cell(metrics[k]) for k in MAIN_METRICS)])
    return header, rows


def ablation_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["blocks", "rank", "method", f"{doc['tested_metric'].replace('_', ' ')} [95% CI]", "p (Holm)",
              "trainable params", "up / client / round", "total bytes", "s / round"]
    rows = []
    for s in doc["settings"]:
        for m in s["methods"]:
            test = m["test_vs_reference"]
            rows.append([str(s["blocks"]), str(s["rank"]), m["method"], _cell(m["tested_metric"]),
                         "reference" if test is None else _p(test["p_holm"]),
                         f"{m['trainable_parameters']:,}", _bytes(m["bytes_up_per_client_per_round"]),
                         _bytes(m["bytes_total"]), _num(m["seconds_per_round"], 2)])
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
                     *(_cell(row[kind]) for kind, _ in PARTICIPATION),
                     _num(_nan(member) - _nan(row["held_out"]["mean"])),
                     _num(_nan(member) - _nan(row["adapted"]["mean"]))])
    return header, rows


def _participation_lines(doc: Mapping[str, Any]) -> list[str]:
    part = doc.get("participation")
    if not part:
        return []
    lr = part["adapt"]["lr"]
    return [
        "## Participation gap: a site that did not train", "",
        f"Each held-out site ({', '.join(part['holdout'])}) is left out of a run of the main setting "
        f"(`federate --holdout`), per method and seed; it is then scored on its own "
        f"{doc['split']} split zero-shot (the run's shared tensors, its own adapter at its start), "
        f"after `cmrfed adapt` ({part['adapt']['epochs']} epochs on its own train split, "
        f"{'the run' + chr(39) + 's learning rate' if lr is None else f'lr {lr:g}'}, the epoch with "
        f"the lowest val loss kept), and as a full member (the same method and seed with every site "
        f"training). Metric: {part['metric'].replace('_', ' ')}, mean ± sd over seeds.", "",
        *_md_table(*participation_table(doc)), "",
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _notes(doc: Mapping[str, Any]) -> list[str]:
    main = doc["main"]
    return [
        f"Main setting: last {main['blocks']} blocks adapted, rank {main['rank']}; backbone "
        f"`{doc['backbone']}`; evaluated split `{doc['split']}`, round `{doc['round']}`; sites: "
        f"{', '.join(doc['clients'])}.",
        "Metrics: macro over sites of each site's own model; mean ± sd over seeds [95% CI: a t-interval "
        "over seeds clipped to the metric's range, or a single run's subject bootstrap].",
        f"Test: {doc['test']} against {doc['reference']} on {doc['tested_metric']} ({doc['pairing']}); "
        "p Holm-corrected across the baselines; effect = reference minus baseline.",
        "Trainable params: scalars a client's model trains (its shared plus private tensors). Bytes: "
        "as serialised per client per round, and up + down for the whole run, mean over seeds.",
        f"Aggregation (--aggregate {doc['aggregate']}): FedAvg {AGGREGATE_RULES[doc['aggregate']]} of "
        "the shared tensors of the sites that trained in a round.",
        *_mixing_notes(doc["mixing"]),
    ]


def _mixing_notes(mixing: Mapping[str, Any] | None) -> list[str]:
    if mixing is None:
        return []
    return [f"FedDPA's inference mixing: the local adapter weighted by {mixing['feddpa_scale']:g} x the mean "
            f"cosine similarity to {mixing['feddpa_k']} private reference subjects of the site, the "
            "global adapter by 1 minus that."]


def _privacy_lines(doc: Mapping[str, Any]) -> list[str]:
    """The main setting's "Differential privacy" section (the same one every report prints)."""
    runs = [(method, seed, cell) for method, seed, cell in doc["privacy"]["runs"]]
    return privacy_markdown(runs, doc["privacy"]["summaries"])


def _markdown(doc: Mapping[str, Any]) -> str:
    lines = [f"# {doc['title']}", "", *(f"- {note}" for note in _notes(doc)), "",
             f"## Main table (blocks {doc['main']['blocks']}, rank {doc['main']['rank']})", "",
             *_md_table(*main_table(doc)), "", "## Per site", "", *_md_table(*site_table(doc)), "",
             "## Ablation: adapted blocks and rank", "", *_md_table(*ablation_table(doc)), "",
             f"![ablation]({ABLATION_FIGURE}.png)", "", *_participation_lines(doc), *_privacy_lines(doc), ""]
    for name in FIGURES:
        lines.append(f"![{name}]({name}.png)")
    warnings = [w for s in doc["settings"] for w in s["warnings"]]
    warnings += [f"{m['method']} ({s['name']}): {w}" for s in doc["settings"] for m in s["methods"]
                 if m["test_vs_reference"] for w in m["test_vs_reference"]["warnings"]]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in dict.fromkeys(warnings))]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _long_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
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


def _main_csv(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
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


def _participation_csv(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
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


def _ablation_csv(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
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


# --- the ablation figure -----------------------------------------------------------------------


def _plot_ablation(doc: Mapping[str, Any], path: Path) -> None:
    """Tested metric (95% CI), bytes per client per round and seconds per round against blocks;
    one line per method (and rank)."""
    figure = Figure(figsize=(13.0, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    blocks = list(dict.fromkeys(str(s["blocks"]) for s in doc["settings"]))
    ranks = list(dict.fromkeys(s["rank"] for s in doc["settings"]))
    methods = list(dict.fromkeys(m["method"] for s in doc["settings"] for m in s["methods"]))
    styles = ["-", "--", ":", "-."]
    for i, method in enumerate(methods):
        for j, rank in enumerate(ranks):
            points = [(blocks.index(str(s["blocks"])), m) for s in doc["settings"] if s["rank"] == rank
                      for m in s["methods"] if m["method"] == method]
            if not points:
                continue
            x = np.array([p[0] for p in points], dtype=float) + 0.06 * (i - (len(methods) - 1) / 2)
            mean = np.array([_nan(p[1]["tested_metric"]["mean"]) for p in points])
            low = np.array([_nan(p[1]["tested_metric"]["ci95"][0]) for p in points])
            high = np.array([_nan(p[1]["tested_metric"]["ci95"][1]) for p in points])
            label = method if len(ranks) == 1 else f"{method}, rank {rank}"
            style = dict(color=f"C{i % 10}", linestyle=styles[j % len(styles)], marker="o", label=label)
            errors = np.nan_to_num(np.clip(np.vstack([mean - low, high - mean]), 0, None))
            axes[0].errorbar(x, mean, yerr=errors, capsize=3, **style)
            axes[1].plot(x, [p[1]["bytes_up_per_client_per_round"] + p[1]["bytes_down_per_client_per_round"]
                             for p in points], **style)
            axes[2].plot(x, [_nan(p[1]["seconds_per_round"]) for p in points], **style)
    metric = doc["tested_metric"].replace("_", " ")
    titles = (f"macro {metric} (mean over seeds, 95% CI)", "bytes per client per round (up + down)",
              "measured seconds per round")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_xlabel("adapted blocks (last N)")
        ax.set_title(title, fontsize="medium")
    axes[0].set_ylabel(metric)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("bytes")
    axes[2].set_ylabel("seconds")
    axes[0].legend(fontsize="small")
    figure.savefig(path)


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


# --- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1400px;padding:0 1em;color:#1d2430;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #d8dde6}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #d8dde6;padding:.3em .55em;text-align:right;white-space:pre}
th{white-space:normal;min-width:4em}
th{background:#eef1f6}td:first-child,th:first-child{text-align:left}
tr.reference td{background:#f6f9ee}ul.notes{font-size:.9em;color:#3b4556}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #e4e7ee}
figcaption{font-size:.85em;color:#556}.warn{color:#8a5a00}
"""

FIGURE_CAPTIONS = {
    ABLATION_FIGURE: "Ablation: the tested metric with its 95% CI, the bytes each client sends and "
                     "receives per round, and the measured time per round, against the adapted blocks.",
    "metric_by_client": "Main setting: the tested metric per site and macro (mean over seeds, 95% CI).",
    "roc_by_client": "Main setting: ROC per site, test subjects pooled over seeds.",
    "metric_vs_bytes": "Main setting: macro metric of each run against the bytes it communicated.",
    "val_curves": "Main setting: mean client validation balanced accuracy per round, mean over seeds.",
}


def _html_table(header: list[str], rows: list[list[str]], reference: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        css = ' class="reference"' if reference is not None and row and row[0] == reference else ""
        # a summary's CI goes on its own line so the wide tables fit a page
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c.replace(' [', chr(10) + '['))}</td>"
                                           for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _participation_html(doc: Mapping[str, Any]) -> list[str]:
    lines = _participation_lines(doc)
    if not lines:
        return []
    return [f"<h2>{html.escape(lines[0].removeprefix('## '))}</h2>",
            f'<p class="notes">{html.escape(lines[2])}</p>', _html_table(*participation_table(doc))]


def _html(doc: Mapping[str, Any], figures: Mapping[str, Path]) -> str:
    reference = doc["reference"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(doc['title'])}</h1>",
        '<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in _notes(doc)) + "</ul>",
        f"<h2>Main table (blocks {html.escape(str(doc['main']['blocks']))}, rank "
        f"{html.escape(str(doc['main']['rank']))})</h2>",
        _html_table(*main_table(doc), reference=reference),
        "<h2>Per site</h2>", _html_table(*site_table(doc), reference=reference),
        "<h2>Ablation: adapted blocks and rank</h2>", _html_table(*ablation_table(doc)),
        *_participation_html(doc),
        '<pre class="privacy">' + html.escape("\n".join(_privacy_lines(doc))) + "</pre>",
    ]
    for name, path in figures.items():
        if name == "metric_by_client":
            parts.append("<h2>Main setting: figures</h2>")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure id="fig-{name}"><img alt="{html.escape(name)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>'
                     f"{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>")
    warnings = [w for s in doc["settings"] for w in s["warnings"]]
    warnings += [f"{m['method']} ({s['name']}): {w}" for s in doc["settings"] for m in s["methods"]
                 if m["test_vs_reference"] for w in m["test_vs_reference"]["warnings"]]
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f'<li class="warn">{html.escape(w)}</li>' for w in dict.fromkeys(warnings)) + "</ul>")
    version = doc["versions"].get("cmrfed", "")
    parts.append(f'<p class="notes">Written by cmrfed study {html.escape(str(version))}; every number is '
                 "in report.json, main.csv, summaries.csv and ablation.csv next to this page.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the folder --------------------------------------------------------------------------------


def write_study_report(study: StudyConfig, out: Path, runs: Mapping[str, Path], cells: Sequence[Cell],
                       comparisons: Mapping[tuple[int | str, int], ComparisonResult],
                       newcomers: Sequence[Newcomer] = ()) -> StudyReport:
    """Write STUDY/report/ (replacing an older one only once the new one is complete)."""
    doc = study_document(study, runs, cells, comparisons, newcomers)
    target = paths.study_report_dir(out)
    main_compare = comparisons[(study.main_blocks, study.main_rank)].out
    with atomic_dir(target, overwrite=True) as tmp:
        write_json(tmp / "report.json", doc)
        (tmp / "report.md").write_text(_markdown(doc), encoding="utf-8")
        _write_csv(tmp / "main.csv", *_main_csv(doc))
        _write_csv(tmp / "summaries.csv", *_long_rows(doc))
        _write_csv(tmp / "ablation.csv", *_ablation_csv(doc))
        if doc["participation"]:
            _write_csv(tmp / "participation.csv", *_participation_csv(doc))
        figures = {ABLATION_FIGURE: paths.report_figure_path(tmp, ABLATION_FIGURE)}
        _plot_ablation(doc, figures[ABLATION_FIGURE])
        fault_point("study.report-write")
        for name in FIGURES:
            figures[name] = paths.report_figure_path(tmp, name)
            shutil.copyfile(paths.report_figure_path(main_compare, name), figures[name])
        (tmp / "report.html").write_text(_html(doc, figures), encoding="utf-8")
    return StudyReport(target, target / "report.html", doc)
