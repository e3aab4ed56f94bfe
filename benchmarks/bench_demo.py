"""Where ``cmrfed demo``'s time goes, phase by phase, before and after the speed work.

Run: ``python benchmarks/bench_demo.py --variant before|after [--threads 2] [--seeds K]`` (one
variant per invocation; each is a whole demo, minutes of CPU). ``--seeds K`` runs the demo study
with its first K seeds only (every method, blocks setting and participation cell, K times fewer
cells): on a busy machine a slice is what fits, and the per-cell phases scale with the seeds, so
the table projects the full demo as (fixed phases) + 5 / K x (per-cell phases). ``--rounds R``
likewise runs R of the demo's rounds, and the projection scales the federate phase by 10 / R
(its set-up is small beside its rounds once the trunk cache is built). The variants:

- ``before``: the demo as it ran before ``--precision`` and ``--jobs``: float32, one cell at a time
  (the shipped demo study with ``precision = "fp32"`` added to its ``[federate]``);
- ``after``: ``cmrfed demo`` as shipped (its study's precision and its ``--jobs`` default).

Each run's phase table (the study's own timings, :mod:`cmrfed.study.timing`, plus synth) is kept
in ``results/demo-timings.json`` under the variant's name, and ``results/demo.md`` is rewritten
from every variant measured so far, with the after / before ratio per phase. CPU time is the
process's user + system time, worker processes included: on a shared machine it is the demo's
own cost, while wall time also counts the neighbours (both are shown).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import tomllib
from pathlib import Path

import torch
from common import RESULTS_DIR, Machine, cpu_seconds, markdown_table, show, write_results
from rich.console import Console

from cmrfed import paths
from cmrfed.demo import DEMO_JOBS, demo_paths, run_demo
from cmrfed.study.timing import PHASES
from cmrfed.templates import template_text

NAME = "demo"
TITLE = "cmrfed demo: where the time goes"
VARIANTS = {
    "before": "float32, one cell at a time (the demo before --precision and --jobs)",
    "after": "the demo as shipped (`cmrfed demo`)",
}


PER_CELL = ("federate", "evaluate", "adapt")
"""Phases whose work grows with the number of cells (the rest is done once per demo)."""


def study_text(variant: str, seeds: int | None, rounds: int | None) -> str:
    """The demo study of a variant (with its first ``seeds`` seeds and ``rounds`` rounds only, if
    given)."""
    text = template_text("demo")
    if rounds is not None:
        text = text.replace(f"rounds = {demo_rounds()}\n", f"rounds = {rounds}\n", 1)
        assert tomllib.loads(text)["federate"]["rounds"] == rounds, "the demo template's rounds line moved"
    if seeds is not None:
        grid = tomllib.loads(text)["grid"]
        kept = grid["seeds"][:seeds]
        text = text.replace(f"seeds = {grid['seeds']}".replace("'", '"'), f"seeds = {kept}", 1)
        assert tomllib.loads(text)["grid"]["seeds"] == kept, "the demo template's seeds line moved"
    if variant == "before":
        text = re.sub(r'^precision = ".*"\n', "", text, flags=re.M)  # the template's own line, if any
        return text.replace("[federate]\n", '[federate]\nprecision = "fp32"\n', 1)
    return text


def demo_seeds() -> int:
    return len(tomllib.loads(template_text("demo"))["grid"]["seeds"])


def demo_rounds() -> int:
    return int(tomllib.loads(template_text("demo"))["federate"]["rounds"])


def measure(variant: str, seeds: int | None, rounds: int | None, scratch: Path, console: Console) -> dict:
    """One whole demo; its phase table, elapsed wall and total CPU (this process and its workers)."""
    jobs = 1 if variant == "before" else DEMO_JOBS
    cpu, wall = cpu_seconds(), time.perf_counter()
    text = study_text(variant, seeds, rounds)
    result = run_demo(scratch / "demo", study_text=text, jobs=jobs, console=console)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    record = json.loads(paths.study_record_path(result.out).read_text(encoding="utf-8"))
    cells = len(record["cells"])
    assert paths.study_report_dir(demo_paths(scratch / "demo")["study"]).exists()
    return {"variant": variant, "description": VARIANTS[variant], "jobs": jobs, "cells": cells,
            "seeds": seeds or demo_seeds(), "rounds": rounds or demo_rounds(),
            "threads": torch.get_num_threads(), "elapsed_s": wall, "cpu_s": cpu,
            "phases": record["timings"]}


def projected(m: dict) -> float:
    """CPU seconds of the whole demo: the once-per-demo phases plus the per-cell ones scaled from
    the seeds measured to the demo's."""
    scale = demo_seeds() / m["seeds"]
    rounds = demo_rounds() / m["rounds"]
    return sum(p["cpu_s"] * (scale if name in PER_CELL else 1.0) * (rounds if name == "federate" else 1.0)
               for name, p in m["phases"].items())


def body(measured: dict[str, dict]) -> str:
    """The markdown of every variant measured so far."""
    order = [v for v in VARIANTS if v in measured]
    phases = sorted({p for v in order for p in measured[v]["phases"]},
                    key=lambda p: (PHASES.index(p) if p in PHASES else len(PHASES), p))
    columns = ["phase"] + [f"{v} CPU s" for v in order] + [f"{v} share" for v in order]
    if {"before", "after"} <= set(order):
        columns.append("after / before (CPU)")
    rows = []
    for phase in phases:
        cpu = {v: measured[v]["phases"].get(phase, {}).get("cpu_s") for v in order}
        totals = {v: sum(p["cpu_s"] for p in measured[v]["phases"].values()) for v in order}
        row = [phase] + [f"{cpu[v]:.1f}" if cpu[v] is not None else "-" for v in order]
        row += [f"{cpu[v] / totals[v]:.0%}" if cpu[v] is not None else "-" for v in order]
        if len(columns) > len(row):
            row.append(f"{cpu['after'] / cpu['before']:.2f}" if cpu["after"] and cpu["before"] else "-")
        rows.append(row)
    totals = ["total (phases)"] + [f"{sum(p['cpu_s'] for p in measured[v]['phases'].values()):.1f}"
                                   for v in order] + ["100%" for _ in order]
    if len(columns) > len(totals):
        a, b = (sum(p["cpu_s"] for p in measured[v]["phases"].values()) for v in ("after", "before"))
        totals.append(f"{a / b:.2f}")
    rows.append(totals)
    lines = ["Each variant is one whole `cmrfed demo` (synth, prepare, the trunk cache, "
             f"{measured[order[0]]['cells']} federated cells, their evaluations, GE's adaptation and "
             "scoring, compare, report) on this machine, measured once. CPU seconds are process user + "
             "system time, worker processes included; the machine is shared with other jobs, so wall "
             "times (and, less so, CPU times) are noisy: compare the ratios, not the seconds.", ""]
    for v in order:
        m = measured[v]
        lines.append(f"- **{v}**: {m['description']}; {m['seeds']} of {demo_seeds()} seeds ({m['cells']} "
                     f"cells), {m['rounds']} of {demo_rounds()} rounds, --jobs {m['jobs']}, {m['threads']} "
                     f"threads in the study process; elapsed "
                     f"{m['elapsed_s']:.0f} s wall, {m['cpu_s']:.0f} s CPU in all (getrusage); projected "
                     f"full demo: {projected(m):.0f} s CPU.")
    lines += ["", markdown_table(columns, rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(VARIANTS), required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the study process")
    parser.add_argument("--seeds", type=int, default=None, help="only the demo's first K seeds")
    parser.add_argument("--rounds", type=int, default=None, help="only R of the demo's rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console, machine = Console(), Machine()
    store = RESULTS_DIR / "demo-timings.json"
    measured = json.loads(store.read_text(encoding="utf-8")) if store.exists() else {}
    with tempfile.TemporaryDirectory() as scratch:
        measured[args.variant] = measure(args.variant, args.seeds, args.rounds, Path(scratch), console)
    store.write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
    text = body(measured)
    show(console, text, write_results(RESULTS_DIR, NAME, machine, TITLE, text))


if __name__ == "__main__":
    main()
