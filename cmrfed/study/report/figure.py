"""The ablation figure: the tested metric, the bytes and the time per round against adapted blocks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cmrfed.study.report.document import nan_of


def plot_ablation(doc: Mapping[str, Any], path: Path) -> None:
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
            mean = np.array([nan_of(p[1]["tested_metric"]["mean"]) for p in points])
            low = np.array([nan_of(p[1]["tested_metric"]["ci95"][0]) for p in points])
            high = np.array([nan_of(p[1]["tested_metric"]["ci95"][1]) for p in points])
            label = method if len(ranks) == 1 else f"{method}, rank {rank}"
            style = dict(color=f"C{i % 10}", linestyle=styles[j % len(styles)], marker="o", label=label)
            errors = np.nan_to_num(np.clip(np.vstack([mean - low, high - mean]), 0, None))
            axes[0].errorbar(x, mean, yerr=errors, capsize=3, **style)
            axes[1].plot(x, [p[1]["bytes_up_per_client_per_round"] + p[1]["bytes_down_per_client_per_round"]
                             for p in points], **style)
            axes[2].plot(x, [nan_of(p[1]["seconds_per_round"]) for p in points], **style)
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
