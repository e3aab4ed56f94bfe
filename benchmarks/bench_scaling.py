"""How round time grows with the number of subjects and the number of clients.

Run: ``python benchmarks/bench_scaling.py [--quick]``. Subjects: synthetic cohorts of growing size,
prepared the same way. Clients: ONE cohort prepared three times with vendor tables that map its
scanner vendors to 1, 2 or 4 clients (same subjects, same total work per round; what changes is
the per-client work: a fresh optimiser, a partial last batch, one payload up and down, a
validation pass). Small size, duallora, 2 blocks, rank 8, E = 1, plain and cached runs
interleaved; times are the steady round (round 2 on).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench_cache import config
from common import (
    CohortSpec,
    Suite,
    drop_cache,
    make_cohort,
    markdown_table,
    median,
    split_counts,
    standalone,
    timed_federate,
)

from cmrfed.data.shards import load_manifest

NAME = "scaling"
TITLE = "Round time against subjects and clients"
SIZE = "small"
TABLES_DIR = Path(__file__).resolve().parents[1] / "data_manifests"
# vendor -> client for 1, 2 and 4 clients (4 is the packaged one-client-per-vendor table)
GROUPINGS: dict[int, dict[str, str]] = {
    1: {"siemens": "all", "philips": "all", "ge": "all", "canon": "all"},
    2: {"siemens": "siemens_ge", "ge": "siemens_ge", "philips": "philips_canon",
        "canon": "philips_canon"},
    4: {"siemens": "siemens", "philips": "philips", "ge": "ge", "canon": "canon"},
}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_tables(folder: Path, grouping: dict[str, str]) -> Path:
    """A copy of the packaged tables whose vendors.toml maps each vendor's client through ``grouping``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("labels.toml", "layouts.toml"):
        (folder / name).write_text((TABLES_DIR / name).read_text(encoding="utf-8"), encoding="utf-8")
    vendors = tomllib.loads((TABLES_DIR / "vendors.toml").read_text(encoding="utf-8"))
    clients = list(dict.fromkeys(grouping[c] for c in vendors["clients"]))
    lines = ["clients = [" + ", ".join(_quote(c) for c in clients) + "]", ""]
    for dataset, table in vendors.items():
        if isinstance(table, dict):
            lines.append(f"[{dataset}]")
            lines += [f"{_quote(vendor)} = {_quote(grouping[client])}" for vendor, client in table.items()]
            lines.append("")
    (folder / "vendors.toml").write_text("\n".join(lines), encoding="utf-8")
    return folder


def round_times(suite: Suite, prepared: Path, rounds: int) -> tuple[float, float]:
    """Median steady round, plain and cached (the cache is built first, outside the timing)."""
    drop_cache(prepared)
    samples: dict[bool, list[float]] = {False: [], True: []}
    for cache in (False, True):
        timing = timed_federate(config(prepared, SIZE, 2, cache, rounds), suite.scratch / "runs" / "scaling")
        samples[cache] += [r.wall for r in timing.steady_rounds]
    return median(samples[False]), median(samples[True])


def run(suite: Suite) -> str:
    rounds = 2 if suite.quick else 3
    per_dataset = (5, 10) if suite.quick else (5, 10, 20, 40)
    rows = []
    for subjects in per_dataset:
        spec = CohortSpec(subjects=subjects, shape=suite.cohort.shape, spacing=suite.cohort.spacing,
                          synth_shape=suite.cohort.synth_shape)
        prepared = make_cohort(suite.scratch / f"subjects-{subjects}", spec)
        n_train, n_val = split_counts(prepared)
        plain, cached = round_times(suite, prepared, rounds)
        suite.console.log(f"scaling {subjects}/dataset: plain {plain:.2f} s, cached {cached:.2f} s")
        rows.append([subjects, n_train, n_val, f"{plain:.2f}", f"{cached:.2f}", f"{plain / cached:.2f}x",
                     f"{1e3 * plain / (n_train + n_val):.0f}", f"{1e3 * cached / (n_train + n_val):.0f}"])
    subjects_table = markdown_table(
        ["subjects / dataset", "train", "val", "plain s / round", "cached s / round", "speed-up",
         "plain ms / subject", "cached ms / subject"], rows)

    raw_root = suite.scratch / "clients-cohort"
    rows = []
    for n_clients, grouping in GROUPINGS.items():
        root = raw_root / f"clients-{n_clients}"
        (root).mkdir(parents=True, exist_ok=True)
        raw = suite.prepared.parent / "raw"
        if not (root / "raw").exists():
            (root / "raw").symlink_to(raw, target_is_directory=True)
        tables = write_tables(suite.scratch / f"tables-{n_clients}", grouping)
        prepared = make_cohort(root, suite.cohort, tables=tables)
        n_train, n_val = split_counts(prepared)
        plain, cached = round_times(suite, prepared, rounds)
        suite.console.log(f"scaling {n_clients} clients: plain {plain:.2f} s, cached {cached:.2f} s")
        rows.append([n_clients, len(load_manifest(prepared).clients), n_train, n_val, f"{plain:.2f}",
                     f"{cached:.2f}", f"{plain / cached:.2f}x"])
    clients_table = markdown_table(
        ["clients", "clients with data", "train", "val", "plain s / round", "cached s / round", "speed-up"],
        rows)
    return (
        "## Round time against subjects and clients\n\n"
        f"Small size, duallora, 2 blocks, rank 8, E = 1, batch 8, validation every round; inputs "
        f"{'x'.join(map(str, suite.cohort.shape))} at {'x'.join(f'{s:g}' for s in suite.cohort.spacing)} mm; "
        f"{rounds} rounds per run, the median of rounds 2 on.\n\n"
        "### Subjects (4 vendor clients)\n\n" + subjects_table + "\n\n"
        f"### Clients ({suite.cohort.subjects} subjects per dataset; vendors grouped into 1, 2 or 4 "
        "clients; the split is stratified per client, so the train / val counts move a little)\n\n"
        + clients_table + "\n"
    )


def main() -> None:
    standalone(NAME, TITLE, run, (__doc__ or "").splitlines()[0])


if __name__ == "__main__":
    main()
