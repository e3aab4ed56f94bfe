"""When does a private adapter pay? duallora, fedlora, ffalora, fedsa, local and central over fixed
levels of the synthetic cohort's heterogeneity dial (cmrfed/data/synth_dial.py).

Run: ``python benchmarks/bench_heterogeneity.py --work WORK [--jobs 2]``. Each point of the dial is
one synthetic cohort and one ``cmrfed study`` on it (under WORK/<point>/), so an interrupted sweep
continues where it stopped when rerun (``run_study(resume=True)``). The levels, seeds, options and
hypotheses were fixed in benchmarks/results/heterogeneity.md before any run; this script only
appends the results below that page's ``## Results`` heading and draws heterogeneity.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = RESULTS / "heterogeneity.md"
FIGURE = RESULTS / "heterogeneity.png"
METHODS = ("duallora", "fedlora", "ffalora", "fedsa", "local", "central")
SEEDS = (0, 1, 2)
SITES = ("siemens", "philips", "ge", "canon")
COHORT = {"seed": 0, "subjects": 40, "shape": (64, 64, 8), "frames": 8}


@dataclass(frozen=True)
class Point:
    """One cohort of the sweep: its name and its dial."""

    name: str
    appearance: float
    label_shift: float
    concept_shift: float


# In run order.
POINTS = (Point("L1-C0", 1, 1, 0), Point("L0-C0", 1, 0, 0), Point("L2-C0", 1, 2, 0),
          Point("L1-C1", 1, 1, 1), Point("L1-C2", 1, 1, 2))
SWEEPS = {"label_shift": ("L0-C0", "L1-C0", "L2-C0"),
          "concept_shift": ("L1-C0", "L1-C1", "L1-C2")}

STUDY = f"""
[prepare]
acdc = "cohort/acdc"
mnms = "cohort/mnms"
mnms2 = "cohort/mnms2"
spacing = [2.0, 2.0, 10.0]
shape = [64, 64, 8]
split = [0.6, 0.2, 0.2]
seed = 0

[federate]
backbone = "tiny-pretrained"
rounds = 5
local-epochs = 2
batch-size = 8
lr = 3e-3
augment = "none"
cache = true

[grid]
methods = {json.dumps(list(METHODS))}
seeds = {json.dumps(list(SEEDS))}
blocks = [2]
ranks = [8]

[evaluate]
split = "test"
round = "best"
threshold = "0.5"
n-boot = 200

[compare]
test = "wilcoxon"
reference = "duallora"
metric = "balanced_accuracy"

[report]
title = "heterogeneity sweep"
"""


def run_point(work: Path, point: Point) -> str:
    """synth (with the point's dial) -> the study -> inspect, under WORK/<point>; resumable."""
    import torch
    from rich.console import Console

    from cmrfed import paths
    from cmrfed.data.synth import Heterogeneity, write_synthetic_cohort
    from cmrfed.study.config import parse_study
    from cmrfed.study.runner import run_study

    torch.set_num_threads(1)
    root = work / point.name
    root.mkdir(parents=True, exist_ok=True)
    with (root / "log.txt").open("a", encoding="utf-8") as log:
        console = Console(file=log, width=120)
        cohort = root / "cohort"
        if not paths.synth_summary_path(cohort).exists():
            write_synthetic_cohort(cohort, **COHORT, overwrite=True,
                                   dial=Heterogeneity(point.appearance, point.label_shift,
                                                      point.concept_shift))
        study = parse_study(STUDY, f"heterogeneity sweep {point.name}", root.resolve())
        run_study(study, root / "study", resume=True, console=console)
    return point.name


def inspect_point(work: Path, point: Point) -> None:
    """``cmrfed inspect`` of the point's prepared data (frozen tiny-pretrained features)."""
    from cmrfed import paths
    from cmrfed.eval.consortium import inspect_consortium

    inspect_consortium(paths.study_prepared_dir(work / point.name / "study"), work / point.name / "inspect",
                       backbone="tiny-pretrained", seed=0, overwrite=True)


# --- reading the studies back -----------------------------------------------------------------


def _report(work: Path, name: str) -> dict[str, Any] | None:
    path = work / name / "study" / "report" / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _inspect(work: Path, name: str) -> dict[str, Any] | None:
    path = work / name / "inspect" / "inspect.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _methods(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["method"]: m for m in doc["main"]["methods"]}


def _macro(method: dict[str, Any]) -> tuple[float, float]:
    summary = method["macro"]["balanced_accuracy"]
    return summary["mean"], summary["sd"]


def results_markdown(work: Path) -> list[str]:
    lines: list[str] = []
    missing = [p.name for p in POINTS if _report(work, p.name) is None]
    if missing:
        lines += [f"Not finished: {', '.join(missing)} (the sweep ran out of time; see the design).", ""]
    for knob, names in SWEEPS.items():
        lines += [f"### {knob.replace('_', ' ')}", ""]
        lines += ["Macro test balanced accuracy (mean over sites), mean +- sd over seeds 0, 1, 2; per-site "
                  "means over seeds; duallora against each method: Wilcoxon signed-rank over the 12 "
                  "(seed, site) pairs, the Hodges-Lehmann median of (duallora - method) and the "
                  "Holm-corrected p.", ""]
        header = ["level", "method", "macro bal.acc", *SITES, "HL(duallora - method)", "p (Holm)"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for name in names:
            doc = _report(work, name)
            if doc is None:
                continue
            level = next(getattr(p, knob) for p in POINTS if p.name == name)
            for method_name, method in _methods(doc).items():
                mean, sd = _macro(method)
                sites = [_num(method["per_site"].get(s, {}).get("balanced_accuracy", {}).get("mean"))
                         for s in SITES]
                test = method.get("test_vs_reference") or {}
                effect = test.get("effect")
                lines.append("| " + " | ".join([f"{level:g}", method_name, f"{_num(mean)} +- {_num(sd)}",
                                                 *sites, _num(effect), _num(test.get("p_holm"))]) + " |")
        lines.append("")
    inspect_rows = [(p, _inspect(work, p.name)) for p in POINTS]
    if any(doc for _, doc in inspect_rows):
        lines += ["### What `cmrfed inspect` says about each cohort", "",
                  "| cohort | max JS divergence of a site's label mix from the pooled one | "
                  "site identifiability (bal.acc; chance 0.25) | mean off-diagonal probe transfer |",
                  "| --- | --- | --- | --- |"]
        for point, doc in inspect_rows:
            if doc is None:
                continue
            js = max(s["label_js_divergence"] for s in doc["sites"])
            ident = doc["identifiability"]["balanced_accuracy"]
            transfer = doc["transfer"]["mean_off_diagonal"]
            lines.append(f"| {point.name} | {_num(js)} | {_num(ident)} | {_num(transfer)} |")
        lines.append("")
    return lines


def plot(work: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SWEEPS), figsize=(10, 4), sharey=True)
    for ax, (knob, names) in zip(axes, SWEEPS.items(), strict=True):
        for index, method in enumerate(METHODS):
            xs, ys, errs = [], [], []
            for name in names:
                doc = _report(work, name)
                if doc is None or method not in _methods(doc):
                    continue
                mean, sd = _macro(_methods(doc)[method])
                xs.append(next(getattr(p, knob) for p in POINTS if p.name == name))
                ys.append(mean)
                errs.append(sd if sd is not None and math.isfinite(sd) else 0.0)
            if xs:
                ax.errorbar([x + 0.03 * (index - 2.5) for x in xs], ys, yerr=errs, marker="o",
                            capsize=3, label=method, linestyle="--" if method == "central" else "-")
        ax.set_xlabel(knob.replace("_", " ") + " (0 = sites alike)")
        ax.set_title(knob.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("macro test balanced accuracy")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(work: Path, page: Path = PAGE, figure: Path = FIGURE) -> None:
    """Replace what follows ``## Results`` on the page (the design above it stays as committed)."""
    text = page.read_text(encoding="utf-8")
    head = text[: text.index("## Results")]
    body = ["## Results", "", f"![macro balanced accuracy against the dial]({figure.name})", "",
            *results_markdown(work)]
    page.write_text(head + "\n".join(body) + "\n", encoding="utf-8")
    plot(work, figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where the cohorts and studies go (kept)")
    parser.add_argument("--jobs", type=int, default=1, help="cohorts run at once (one torch thread each)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the page from WORK")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.report_only:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {point.name: pool.submit(run_point, args.work, point) for point in POINTS}
            for name, future in futures.items():
                try:
                    print(f"done: {future.result()}", flush=True)
                except Exception as exc:  # one failed cohort must not lose the others: say so
                    print(f"FAILED: {name}: {exc!r}", flush=True)
                write_results(args.work)
        for point in POINTS:
            if _report(args.work, point.name) is not None:
                inspect_point(args.work, point)
    write_results(args.work)

if __name__ == "__main__":
    main()
