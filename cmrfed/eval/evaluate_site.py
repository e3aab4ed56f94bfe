"""``cmrfed evaluate RUN --client SITE`` (one site, on its own machine) and
``cmrfed evaluate RUN --merge SITE_EVAL...`` (the coordinator, from what the sites sent).

A site needs only a copy of run.json, the run's shared tensors, its own private tensors and its
own PREPARED shard. It writes SITE_EVAL/site_eval.json (its metrics, and how it took part: a
member, a held-out site scored zero-shot, or a site after ``cmrfed adapt``) and, unless it sends
metrics only, SITE_EVAL/predictions.csv. The merge checks that every result was computed on the
same shared tensors, then writes RUN/eval/ exactly as the pooled ``cmrfed evaluate RUN`` would
(see :mod:`cmrfed.eval.scoring`). Results of sites that did not train (held-out, adapted) are kept
apart under ``newcomers``; with the evaluation of a run in which the site was a member, the
merge also reports the participation gap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.atomic import atomic_dir, write_json
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.evaluate_run import EvalSummary, eval_header, print_table, write_eval
from cmrfed.eval.scoring import (
    ADAPTED,
    HELD_OUT,
    MEMBER,
    SHARED_MODEL,
    SiteResult,
    check_threshold,
    json_ready,
    merge_sites,
    read_rows,
    score_site,
    scores_from_rows,
    site_rows,
    write_predictions,
)
from cmrfed.fed.adapt import newcomer_client, open_site, read_adapted, run_identity
from cmrfed.fed.client import Client
from cmrfed.fed.runinfo import ROUND_CHOICES, load_run, load_shared
from cmrfed.fed.task import SPLITS, resolve_device
from cmrfed.provenance import versions

SITE_EVAL_FORMAT_VERSION = 1
GAP_METRIC = "balanced_accuracy"


@dataclass(frozen=True)
class SiteEvalRecord:
    """A SITE_EVAL folder read back."""

    folder: Path
    raw: dict[str, Any]
    result: SiteResult

    @property
    def key(self) -> tuple:
        """What must agree between the results merged into one evaluation."""
        r = self.raw
        return (json.dumps(r["run"], sort_keys=True), r["split"], r["threshold"]["mode"], r["n_boot"])


def evaluate_site(
    run: str | Path,
    client: str,
    data: str | Path,
    private: str | Path | None = None,
    out: str | Path | None = None,
    split: str = "test",
    which: str = "best",
    threshold: str = "0.5",
    n_boot: int = 1000,
    metrics_only: bool = False,
    device: str = "auto",
    console: Console | None = None,
) -> SiteResult:
    """Score one site's own model and the shared-only model on its own data; write SITE_EVAL."""
    console = console or Console()
    if split not in ("test", "val"):
        raise UsageError(f"--split must be test or val, not {split!r}")
    check_threshold(threshold, metrics_only)
    info = load_run(run)
    torch_device = resolve_device(device)
    run_model, base, site_data = open_site(info, client, Path(data), torch_device, SPLITS)
    spec = run_model.spec
    shared = load_shared(info, which)
    if client in info.clients:
        participation = MEMBER
        own = Client(base.name, base.index, spec, run_model.initial_state, base.train, base.val,
                     base.config, base.seed)
        own.set_shared(shared)
        own.set_private(_member_private(info.path, client, private, which, bool(spec.private)))
    elif private is None:
        participation = HELD_OUT
        own = newcomer_client(run_model, shared, base)
    else:
        participation = ADAPTED
        own = newcomer_client(run_model, shared, base, read_adapted(Path(private), client, info, which))
    shared_only = None
    if spec.shared:
        shared_only = Client(SHARED_MODEL, base.index, spec, run_model.initial_state, base.train, None,
                             base.config, base.seed)
        shared_only.set_shared(shared)
    result = score_site(own, shared_only, run_model.model, site_data, split, threshold, n_boot,
                        info.seed, torch_device, participation=participation, metrics_only=metrics_only)

    target = Path(out) if out is not None else paths.site_eval_dir(Path(private or info.path), client)
    if target.exists() and any(target.iterdir()) and not paths.site_eval_record_path(target).exists():
        raise UsageError(f"{target} exists and is not a site evaluation; choose another --out")
    record = {
        "format_version": SITE_EVAL_FORMAT_VERSION,
        "created_by": "cmrfed evaluate --client",
        "client": client,
        "participation": participation,
        "run": run_identity(info, which),
        "split": split,
        "threshold": {"mode": threshold, "own": result.threshold},
        "n_boot": n_boot,
        "metrics_only": metrics_only,
        "metrics": result.metrics,
        "absent": result.absent,
        "shared_metrics": result.shared_metrics,
        "versions": versions(),
    }
    with atomic_dir(target, overwrite=True) as tmp:
        write_json(paths.site_eval_record_path(tmp), json_ready(record))
        if not metrics_only:
            write_predictions(paths.site_predictions_path(tmp), site_rows(result, split))
    if result.absent is None:
        print_table(console, f"{info.method} ({participation})", split, {client: result.metrics}, None,
                    {client: result.shared_metrics} if result.shared_metrics else {})
    else:
        console.print(f"{client}: no metrics ({result.absent})", highlight=False)
    console.print(f"wrote {target}" + (" (metrics only)" if metrics_only else ""), highlight=False)
    return result


def _member_private(run: Path, client: str, private: str | Path | None, which: str, needed: bool) -> dict:
    folder = ROUND_CHOICES[which]
    if private is None:
        if needed:
            raise UsageError(f"{client!r} keeps private tensors in this method; pass --private with the "
                             "folder holding clients/<site>/private.safetensors (its site folder of the run)")
        return {}
    path = paths.private_tensors_path(Path(private), client, folder)
    try:
        return load_file(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {client!r}'s {which} private tensors ({exc}); --private "
                        "takes the site's RUN-shaped folder (e.g. <site-dir>/<run name>)") from exc


def read_site_eval(folder: Path) -> SiteEvalRecord:
    """A SITE_EVAL folder as a :class:`SiteResult` (scores rebuilt from its predictions)."""
    folder = Path(folder)
    check_sent(folder)
    try:
        raw = json.loads(paths.site_eval_record_path(folder).read_text(encoding="utf-8"))
        client, split = str(raw["client"]), str(raw["split"])
        metrics = _nan_for_null(raw["metrics"])
        shared_metrics = _nan_for_null(raw["shared_metrics"]) if raw["shared_metrics"] else None
        own_threshold, metrics_only = float(raw["threshold"]["own"]), bool(raw["metrics_only"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}: not a site evaluation of `cmrfed evaluate --client` ({exc})") from exc
    own = shared = None
    absent = raw.get("absent")
    if not metrics_only and absent is None:
        rows = read_rows(paths.site_predictions_path(folder))
        own = scores_from_rows(rows, client, split)
        if own is None:
            raise DataError(f"{folder}: predictions.csv has no rows of {client!r}'s own model")
        shared = {part: s for part in (split, "val")
                  if (s := scores_from_rows(rows, SHARED_MODEL, part)) is not None} or None
    result = SiteResult(client, str(raw.get("participation", MEMBER)), own_threshold, metrics,
                        shared_metrics, own, shared, absent=absent)
    return SiteEvalRecord(folder, raw, result)


def check_sent(folder: Path) -> None:
    """What a site sends is its site_eval.json and, optionally, its predictions.csv: refuse a
    SITE_EVAL folder holding anything else (a tensor file would carry a private adapter)."""
    allowed = {paths.site_eval_record_path(folder).name, paths.site_predictions_path(folder).name}
    if not folder.is_dir():
        raise DataError(f"{folder}: no such site evaluation folder")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if extra:
        raise DataError(f"{folder} holds {extra}; a site sends only site_eval.json and predictions.csv, "
                        "nothing else is merged")


def _nan_for_null(obj: Any) -> Any:
    """JSON null back to NaN, so merged metrics equal the pooled ones value for value."""
    if isinstance(obj, dict):
        return {k: _nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_for_null(v) for v in obj]
    return float("nan") if obj is None else obj


def merge_evaluations(
    run: str | Path,
    site_evals: list[str | Path],
    member_run: str | Path | None = None,
    console: Console | None = None,
) -> EvalSummary:
    """Combine per-site evaluations into RUN/eval/ (the same files the pooled evaluation writes)."""
    console = console or Console()
    if not site_evals:
        raise UsageError("--merge needs the SITE_EVAL folders the sites sent")
    info = load_run(run)
    records = [read_site_eval(Path(f)) for f in site_evals]
    keys = {r.key for r in records}
    if len(keys) != 1:
        raise DataError("the site evaluations differ in run tensors, split, threshold or --n-boot: "
                        + "; ".join(f"{r.folder}: {r.key[1:]}" for r in records))
    first = records[0].raw
    which = str(first["run"]["round"])
    if first["run"] != run_identity(info, which):
        raise DataError(f"the site evaluations were computed on other shared tensors than the {which} "
                        f"round of {info.path}; every site must evaluate this run's tensors")
    split, threshold, n_boot = first["split"], first["threshold"]["mode"], int(first["n_boot"])
    members = [r.result for r in records if r.result.participation == MEMBER]
    newcomers: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.result.participation != MEMBER:
            if r.result.participation in newcomers.get(r.result.client, {}):
                raise DataError(f"two {r.result.participation} evaluations of {r.result.client!r}")
            newcomers.setdefault(r.result.client, {})[r.result.participation] = r.result.metrics
    if sorted(m.client for m in members) != sorted(info.clients) or len(members) != len(info.clients):
        got = sorted(m.client for m in members)
        raise DataError(f"merge needs one member evaluation per site of {info.path} ({list(info.clients)}); "
                        f"got {got}")
    merged = merge_sites(members, list(info.clients), split, threshold, n_boot, info.seed)
    doc = {**eval_header(info, split, which, "cmrfed evaluate --merge"), **merged.fields}
    if newcomers:
        doc["newcomers"] = newcomers
    if member_run is not None:
        doc["participation_gap"] = participation_gap(newcomers, Path(member_run), split)
    out = write_eval(info, doc, merged.rows)
    print_table(console, info.method, split, doc["per_client"], doc["macro"], doc["shared_only"] or {})
    if "participation_gap" in doc:
        _print_gap(console, doc["participation_gap"])
    return EvalSummary(out, doc["per_client"], doc["macro"])


def participation_gap(newcomers: dict[str, dict[str, Any]], member_run: Path, split: str) -> dict[str, Any]:
    """For each site that did not train: its balanced accuracy zero-shot (held out), after
    ``adapt``, and as a full member (from the evaluation of a run in which it trained)."""
    if not newcomers:
        raise UsageError("--member-run needs the evaluations of a held-out or adapted site to compare")
    metrics_file = paths.metrics_path(member_run)
    try:
        member = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{metrics_file}: unreadable ({exc}); evaluate {member_run} first") from exc
    if member.get("split") != split:
        raise UsageError(f"{metrics_file} is of the {member.get('split')} split, these of {split}")
    gap: dict[str, Any] = {"metric": GAP_METRIC, "member_run": str(member_run), "sites": {}}
    for site, by_kind in newcomers.items():
        if site not in member.get("per_client", {}):
            raise DataError(f"{site!r} is not a member of {member_run}; pass a run it trained in")
        row = {kind: by_kind.get(kind, {}).get(GAP_METRIC) for kind in (HELD_OUT, ADAPTED)}
        row[MEMBER] = member["per_client"][site].get(GAP_METRIC)
        gap["sites"][site] = row
    return gap


def _print_gap(console: Console, gap: dict[str, Any]) -> None:
    table = Table(title=f"participation gap ({gap['metric'].replace('_', ' ')})")
    for column in ("site", "held out, zero-shot", "after adapt", "full member"):
        table.add_column(column, justify="left" if column == "site" else "right")

    def fmt(value: Any) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    for site, row in gap["sites"].items():
        table.add_row(site, fmt(row[HELD_OUT]), fmt(row[ADAPTED]), fmt(row[MEMBER]))
    console.print(table)


def check_evaluate_modes(site_evals: tuple[str, ...] | list[str], *, client: str | None,
                         private: str | None, data: str | None, out: str | None, metrics_only: bool,
                         merge: bool, member_run: str | None) -> str:
    """Which of evaluate's three modes the options ask for ("pooled", "site", "merge"), refusing
    options that belong to another mode."""
    site_only = {"--private": private, "--data": data, "--out": out,
                 "--metrics-only": metrics_only or None}
    if merge:
        stray = [k for k, v in {"--client": client, **site_only}.items() if v is not None]
        if stray:
            raise UsageError(f"--merge takes SITE_EVAL folders, not {', '.join(stray)}")
        if not site_evals:
            raise UsageError("--merge needs the SITE_EVAL folders after RUN: evaluate RUN --merge A B ...")
        return "merge"
    if site_evals:
        raise UsageError(f"unexpected extra arguments {list(site_evals)}; to merge site evaluations "
                         "pass --merge")
    if member_run is not None:
        raise UsageError("--member-run goes with --merge")
    if client is not None:
        if data is None:
            raise UsageError("--client needs --data: the site's own PREPARED folder")
        return "site"
    stray = [k for k, v in site_only.items() if v is not None and k != "--data"]
    if stray:
        raise UsageError(f"{', '.join(stray)} go with --client SITE")
    return "pooled"
