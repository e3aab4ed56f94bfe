"""``cmrfed study --jobs 2`` against ``--jobs 1`` on a small study.

Run: ``python benchmarks/bench_jobs.py``. One small synthetic cohort (32 x 32 x 4, 16 subjects per
dataset), one study of 3 methods x 2 seeds x 1 blocks setting (6 cells, 3 rounds, tiny random
backbone), run with ``--jobs 1`` (the study process with every core's thread) and ``--jobs 2``
(two workers, each with half the threads), cache built first and shared by both; the reports are
checked equal (timings aside) and the wall and CPU seconds (study process and workers) compared.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, CohortSpec, Machine, make_cohort, markdown_table, show, write_results
from rich.console import Console

from cmrfed import paths
from cmrfed.study.config import parse_study
from cmrfed.study.runner import run_study

NAME = "jobs"
TITLE = "study --jobs 2 against --jobs 1"
COHORT = CohortSpec(subjects=16, shape=(32, 32, 4), spacing=(4.0, 4.0, 10.0), synth_shape=(48, 48, 6))


def study_text(prepared: Path) -> str:
    return f"""
[data]
prepared = "{prepared}"
[federate]
backbone = "tiny"
rounds = 3
augment = "none"
device = "cpu"
[grid]
methods = ["duallora", "fedlora", "ffalora"]
seeds = [0, 1]
blocks = [2]
ranks = [4]
[evaluate]
n-boot = 100
"""


def _cpu() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _numbers(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _numbers(v) for k, v in doc.items() if k not in ("seconds_per_round", "versions")}
    if isinstance(doc, list):
        return [_numbers(v) for v in doc]
    return doc


def main() -> None:
    console, machine = Console(), Machine()
    rows, reports = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        prepared = make_cohort(Path(scratch) / "cohort", COHORT)
        study = parse_study(study_text(prepared), "bench_jobs", Path(scratch))
        run_study(study, Path(scratch) / "warm", jobs=1, console=Console(quiet=True))  # builds the cache
        for jobs in (1, 2):
            cpu, wall = _cpu(), time.perf_counter()
            result = run_study(study, Path(scratch) / f"jobs{jobs}", jobs=jobs, console=Console(quiet=True))
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            reports[jobs] = _numbers(json.loads((result.report.out / "report.json").read_text()))
            record = json.loads(paths.study_record_path(result.out).read_text())
            rows.append([str(jobs), f"{wall:.1f}", f"{cpu:.1f}",
                         f"{sum(p['cpu_s'] for p in record['timings'].values()):.1f}"])
    same = reports[1] == reports[2]
    body = "\n".join([
        f"{COHORT.describe()}; 3 methods x 2 seeds, 2 adapted blocks, rank 4, 3 rounds (6 cells), tiny "
        f"backbone, CPU; the trunk cache built beforehand (shared). {torch.get_num_threads()} threads in "
        "the study process; workers take cores // jobs each. The machine is shared with other jobs: "
        "wall times are noisy, read the ratio.", "",
        markdown_table(["--jobs", "wall s", "CPU s (getrusage, workers incl.)", "CPU s (phases)"], rows), "",
        f"Wall-time speed-up of --jobs 2: {float(rows[0][1]) / float(rows[1][1]):.2f}x. "
        f"Reports equal (timings aside): {same} (bitwise equality needs equal thread counts, which "
        "tests/test_study.py pins; here --jobs 1 has every core's threads)."])
    show(console, body, write_results(RESULTS_DIR, NAME, machine, TITLE, body))


if __name__ == "__main__":
    main()
