"""Utility against the privacy budget, and what DP-SGD costs per round.

Run: ``python benchmarks/bench_dp.py [--quick]``. Every site runs DP-SGD (cmrfed/fed/privacy.py)
with the noise calibrated so that its whole run stays within epsilon (delta 1e-5, clip 1); the
epsilon = inf rows are the same runs without DP (Poisson sampling, clipping and noise off).
A synthetic cohort of 60 subjects per dataset; tiny backbone, 2 adapted blocks, rank 8, batch 8,
lr 1e-2, E = 1, no class-balanced loss in any row (DP refuses it, so the non-DP reference drops
it too). Utility: test balanced accuracy and AUC of each site's own model at the best round
(``cmrfed evaluate``), macro over sites and pooled, mean ± sd over seeds (one seed by default). Time: CPU
seconds of a steady round (rounds 2 on, median) against the non-DP run of the same method and
seed; CPU time rather than wall time because the machine is shared.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from common import CohortSpec, Suite, make_cohort, markdown_table, median, standalone, timed_federate
from rich.console import Console

from cmrfed import paths
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.fed.config import FederateConfig

NAME = "dp"
TITLE = "Differential privacy: utility against epsilon, and the time DP-SGD costs"
METHODS = ("duallora", "fedlora", "ffalora")
EPSILONS = (math.inf, 8.0, 3.0, 1.0)
LR = 1e-2
# more subjects than the shared cohort: DP noise is divided by the batch a site can draw, and a
# site of a handful of training subjects is all noise at any useful epsilon
COHORT = CohortSpec(subjects=60)


def config(prepared: Path, method: str, epsilon: float, seed: int, rounds: int) -> FederateConfig:
    return FederateConfig(data=str(prepared), method=method, blocks=2, rank=8, rounds=rounds,
                          local_epochs=1, batch_size=8, lr=LR, class_balanced=False, seed=seed,
                          backbone="tiny", dp_epsilon=None if math.isinf(epsilon) else epsilon)


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "—"
    if len(finite) == 1:
        return f"{finite[0]:.3f}"
    return f"{statistics.mean(finite):.3f} ± {statistics.stdev(finite):.3f}"


def _train_counts(prepared: Path) -> dict[str, int]:
    from cmrfed.data.shards import load_manifest

    manifest = load_manifest(prepared)
    return {c: sum(1 for s in manifest.subjects if s.client == c and s.split == "train")
            for c in manifest.clients}


def run(suite: Suite) -> str:
    seeds = (0,)  # one seed: 12 runs already take ~10 minutes on 2 shared cores
    rounds = 3 if suite.quick else 6
    prepared = make_cohort(suite.scratch / "dp-cohort", COHORT)
    n_train = _train_counts(prepared)
    quiet = Console(quiet=True)
    rows, cost_rows = [], []
    for method in METHODS:
        plain_cpu: dict[int, float] = {}
        for epsilon in EPSILONS:
            bal, auc, pooled, cpu, spent, sigma = [], [], [], [], [], []
            for seed in seeds:
                out = suite.scratch / "runs" / "dp" / f"{method}-{epsilon}-{seed}"
                timing = timed_federate(config(prepared, method, epsilon, seed, rounds), out)
                round_cpu = median([r.cpu for r in timing.steady_rounds])
                cpu.append(round_cpu)
                if math.isinf(epsilon):
                    plain_cpu[seed] = round_cpu
                metrics = evaluate_run(out, n_boot=10, device="cpu", console=quiet)
                bal.append(metrics.macro["balanced_accuracy"])
                auc.append(metrics.macro["auc"])
                pooled.append(json.loads((metrics.out / "metrics.json").read_text())["pooled"]["auc"])
                record = json.loads(paths.run_config_path(out).read_text())
                if "privacy" in record:
                    sites = record["result"]["privacy"].values()
                    spent.append(max(s["epsilon"] for s in sites))
                    sigma += [s["noise_multiplier"] for s in sites]
                suite.console.log(f"dp {method} eps={epsilon:g} seed {seed}: bal.acc "
                                  f"{bal[-1]:.3f}, round cpu {round_cpu:.2f} s")
            ratio = statistics.mean(c / plain_cpu[s] for c, s in zip(cpu, seeds, strict=True))
            eps_text = "inf (no DP)" if math.isinf(epsilon) else f"{epsilon:g}"
            rows.append([method, eps_text, f"{max(spent):.3f}" if spent else "—",
                         f"{min(sigma):.2f}–{max(sigma):.2f}" if sigma else "—",
                         _mean_sd(bal), _mean_sd(auc), _mean_sd(pooled)])
            cost_rows.append([method, eps_text, f"{statistics.mean(cpu):.2f}", f"{ratio:.2f}x"])
    sizes = ", ".join(f"{c} {n}" for c, n in n_train.items())
    return (
        f"## Utility against epsilon\n\n{COHORT.describe()}; training subjects per site: {sizes}. "
        f"Tiny backbone (random init), 2 adapted blocks, rank 8, batch 8, lr {LR:g}, "
        f"E = 1, {rounds} rounds, delta 1e-5, clip 1, RDP accountant, seeds "
        f"{', '.join(map(str, seeds))}. Spent epsilon: the largest over sites (each site's noise is "
        "calibrated to its own size). Metrics: macro over sites of each site's own model on its "
        "test split, best round.\n\n"
        + markdown_table(["method", "target epsilon", "spent epsilon (max site)",
                          "noise multiplier (sites)", "test balanced accuracy (macro)",
                          "test AUC (macro)", "test AUC (pooled)"], rows)
        + "\n\n## Time per round\n\nCPU seconds of a steady round (all sites' training and "
        "validation), median of rounds 2 on, mean over seeds; ratio against the same method and "
        "seed without DP.\n\n"
        + markdown_table(["method", "target epsilon", "CPU s / round", "vs no DP"], cost_rows)
        + "\n"
    )


def main() -> None:
    standalone(NAME, TITLE, run, (__doc__ or "").splitlines()[0])


if __name__ == "__main__":
    main()
