"""``cmrfed study``: every cell of the grid through the same ``federate`` and ``evaluate`` code,
one ``compare`` per (blocks, rank) setting, then the study report. With ``[participation]``, the
main setting's cells again without each held-out site, whose zero-shot and adapted scores
(:mod:`cmrfed.study.newcomers`) the report sets beside its score as a member.

State lives in STUDY/study.json (rewritten atomically after every step), but the truth is in
the run folders: a cell is complete when a run under STUDY/runs/ records the cell's exact
configuration and input hashes (manifest sha256, backbone fingerprint), has finished and has
been evaluated with the study's evaluate options. With ``--resume`` such cells are skipped, an
interrupted cell continues from its last checkpointed round (``federate --resume``), and every
later step is redone from the runs, so the outputs equal those of an uninterrupted study.

All cells read one PREPARED folder, so the frozen-trunk cache (keyed by backbone fingerprint and
first adapted block) is computed once per (backbone, blocks) and shared by every method and rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.rule import Rule
from rich.text import Text

from cmrfed import __version__, paths
from cmrfed import options as declared
from cmrfed.atomic import read_json_or_none, write_json
from cmrfed.data.shards import load_manifest
from cmrfed.errors import UsageError
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.eval.report import compare_runs
from cmrfed.faults import fault_point
from cmrfed.fed.inprocess import federate
from cmrfed.lock import folder_lock
from cmrfed.model.cinema import SIZES, backbone_fingerprint, load_backbone
from cmrfed.outputs import STUDY, replacing
from cmrfed.study.config import StudyConfig, grid_settings
from cmrfed.study.newcomers import Newcomer, score_newcomer
from cmrfed.study.plan import Cell, config_key, member_cell, plan_cells, plan_participation, setting_name
from cmrfed.study.report import StudyReport, write_study_report

STUDY_FORMAT_VERSION = 1
PENDING, TRAINING, TRAINED, COMPLETE = "pending", "training", "trained", "complete"


@dataclass(frozen=True)
class StudyResult:
    out: Path
    report: StudyReport
    trained: int  # cells trained (or continued) in this invocation
    skipped: int  # cells found complete


# --- inputs ------------------------------------------------------------------------------------


def _prepare_data(study: StudyConfig, out: Path, record: dict[str, Any], console: Console) -> Path:
    """The PREPARED folder of the study; prepares the raw datasets first when the study says so."""
    if study.prepared is not None:
        return Path(study.prepared)
    from cmrfed.data.prepare import prepare

    target = paths.study_prepared_dir(out)
    # what shapes the prepared data (the number of worker processes does not)
    wanted = {k: v for k, v in study.to_dict()["prepare"].items() if k != "workers"}
    done = record.get("prepared_with")
    if paths.manifest_path(target).exists() and done == wanted:
        console.print(f"prepared data: {target} (already prepared with these options)", highlight=False)
        return target
    console.print(Rule("prepare: the raw datasets into per-vendor shards"))
    prepare(declared.prepare_options({**(study.prepare or {}), "out": str(target), "overwrite": True}),
            console=console)
    record["prepared_with"] = wanted
    return target


def _fingerprints(cells: tuple[Cell, ...], shape: tuple[int, int, int]) -> dict[tuple[str, int], str]:
    """Backbone fingerprint per (backbone, seed): a random-init size depends on the seed, a file
    does not (its fingerprint is computed once)."""
    out: dict[tuple[str, int], str] = {}
    by_file: dict[str, str] = {}
    for cell in cells:
        key = (cell.config.backbone, cell.config.seed)
        if key in out:
            continue
        if cell.config.backbone in by_file:
            out[key] = by_file[cell.config.backbone]
            continue
        out[key] = backbone_fingerprint(load_backbone(cell.config.backbone, input_shape=shape,
                                                      seed=cell.config.seed))
        if cell.config.backbone not in SIZES:  # weights read from a file do not depend on the seed
            by_file[cell.config.backbone] = out[key]
    return out


# --- what is on disk ---------------------------------------------------------------------------



def _run_index(runs_dir: Path) -> dict[str, list[Path]]:
    """Configuration key -> run folders under STUDY/runs holding a run.json of it."""
    index: dict[str, list[Path]] = {}
    for folder in sorted(runs_dir.iterdir()) if runs_dir.exists() else []:
        info = read_json_or_none(paths.run_config_path(folder))
        if info and "config" in info:
            index.setdefault(config_key(info["config"]), []).append(folder)
    return index


def _inputs_match(info: dict[str, Any], manifest_sha: str, fingerprint: str) -> bool:
    return (info.get("data", {}).get("manifest_sha256") == manifest_sha
            and info.get("backbone", {}).get("fingerprint") == fingerprint)


def _evaluated(run: Path, options: dict[str, Any]) -> bool:
    """RUN/eval/metrics.json exists and was made with the study's evaluate options."""
    metrics = read_json_or_none(paths.metrics_path(run))
    if not metrics or not paths.predictions_path(run).exists():
        return False
    return (metrics.get("split"), metrics.get("round"), metrics.get("threshold", {}).get("mode"),
            metrics.get("n_boot")) == (options["split"], options["which"], options["threshold"],
                                       options["n_boot"])


@dataclass
class _Found:
    run: Path
    state: str  # PENDING (nothing usable), TRAINING (resume it), TRAINED, COMPLETE
    note: str = ""


def _locate(cell: Cell, out: Path, index: dict[str, list[Path]], manifest_sha: str, fingerprint: str,
            evaluate: dict[str, Any]) -> _Found:
    """Where the cell's run is and how far it got, from the run folders themselves."""
    default = paths.study_run_dir(out, cell.name)
    candidates = index.get(cell.key(), [])
    for run in candidates:  # a finished run with this configuration and these inputs, anywhere
        info = read_json_or_none(paths.run_config_path(run)) or {}
        # run.json gets its result only after every final tensor file is written
        if "result" in info and _inputs_match(info, manifest_sha, fingerprint):
            return _Found(run, COMPLETE if _evaluated(run, evaluate) else TRAINED)
    for run in candidates:  # an interrupted one: continue it
        info = read_json_or_none(paths.run_config_path(run)) or {}
        if _inputs_match(info, manifest_sha, fingerprint):
            return _Found(run, TRAINING)
    if default.exists() and any(default.iterdir()):
        info = read_json_or_none(paths.run_config_path(default))
        if info is None:  # killed before run.json was written: nothing in it is a result
            return _Found(default, PENDING, "restarted (no run.json)")
        if config_key(info.get("config", {})) == cell.key():  # same options, other inputs
            return _Found(default, PENDING, "restarted: its data or backbone changed since it ran")
        raise UsageError(f"{default} holds a run with other options than the study's cell {cell.name}; "
                         "move it away, or start the study again with --overwrite")
    return _Found(default, PENDING)


# --- study.json --------------------------------------------------------------------------------


def _cell_record(cell: Cell, found: _Found, out: Path, fingerprint: str, manifest_sha: str,
                 wall_s: float | None) -> dict[str, Any]:
    return {
        "name": cell.name, "state": found.state, "run": str(found.run.relative_to(out))
        if found.run.is_relative_to(out) else str(found.run),
        "setting": setting_name(*cell.setting), "method": cell.config.method,
        "seed": cell.config.seed, "blocks": cell.config.blocks, "rank": cell.config.rank,
        "inputs": {"manifest_sha256": manifest_sha, "backbone_fingerprint": fingerprint},
        "config": cell.config.to_dict(), "wall_s": wall_s,
    }


def _start(out: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Refuse or clear OUT as every stage does; return the previous study.json when resuming."""
    record_path = paths.study_record_path(out)
    if resume:
        if out.exists() and any(out.iterdir()) and not record_path.exists():
            raise UsageError(f"{out}: no study.json to resume; it is not a study folder (choose "
                             "another --out, or pass --overwrite to replace it)")
        return read_json_or_none(record_path) or {}
    if out.exists() and any(out.iterdir()):  # with --overwrite, run_study has set it aside
        raise UsageError(f"{out} already exists; pass --resume to continue the study, --overwrite "
                         "to replace it, or choose another --out")
    return {}


# --- progress ----------------------------------------------------------------------------------


class _StudyProgress:
    """The one line a study keeps on screen above the per-round lines: cells done / total, the
    current cell, elapsed time, and an estimate of what remains from the cells timed so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.current = ""
        self.started = time.monotonic()
        self.timed: list[float] = []

    def estimate(self) -> str:
        if not self.timed:
            return "estimating"
        remaining = (self.total - self.done) * (sum(self.timed) / len(self.timed))
        return f"~{_duration(remaining)} left"

    def __rich__(self) -> Text:
        elapsed = _duration(time.monotonic() - self.started)
        return Text.assemble(("study ", "bold"), f"{self.done}/{self.total} cells  ",
                             (self.current, "cyan"), f"  elapsed {elapsed}  {self.estimate()}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# --- the study ---------------------------------------------------------------------------------


def run_study(study: StudyConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              device: str | None = None, console: Console | None = None) -> StudyResult:
    """Run (or continue) the study into OUT and write its report; OUT is locked throughout."""
    console = console or Console()
    out = Path(out).resolve()
    with folder_lock(out):
        if overwrite and not resume and out.exists() and any(out.iterdir()):
            with replacing(out, STUDY, overwrite):  # the old study is kept until the new one is complete
                return _run_study(study, out, resume, overwrite, device, console)
        return _run_study(study, out, resume, overwrite, device, console)


def _run_study(study: StudyConfig, out: Path, resume: bool, overwrite: bool, device: str | None,
               console: Console) -> StudyResult:
    previous = _start(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    device = device or study.device
    record: dict[str, Any] = {
        "format_version": STUDY_FORMAT_VERSION, "created_by": "cmrfed study", "version": __version__,
        "config": study.to_dict(), "state": "running",
        "prepared_with": previous.get("prepared_with"),
    }
    prepared = _prepare_data(study, out, record, console)
    manifest = load_manifest(prepared)
    grid = plan_cells(study, prepared.resolve())
    for site in study.holdout:
        if site not in manifest.clients:
            raise UsageError(f"{study.source}: [participation] holdout = {site!r} is not a site of "
                             f"{paths.manifest_path(prepared)}; choose among {', '.join(manifest.clients)}")
    newcomers = {c.name: Newcomer(c, member_cell(c, grid), paths.study_newcomer_dir(out, c.name))
                 for c in plan_participation(study, prepared.resolve())}
    cells = grid + tuple(n.cell for n in newcomers.values())
    fingerprints = _fingerprints(cells, tuple(manifest.shape))
    record["inputs"] = {"prepared": str(prepared.resolve()), "manifest_sha256": manifest.sha256}
    index = _run_index(paths.study_runs_dir(out))
    def fingerprint(cell: Cell) -> str:
        return fingerprints[(cell.config.backbone, cell.config.seed)]

    found = {c.name: _locate(c, out, index, manifest.sha256, fingerprint(c), study.evaluate) for c in cells}
    walls = {c["name"]: c.get("wall_s") for c in previous.get("cells", [])}
    cell_records = {c.name: _cell_record(c, found[c.name], out, fingerprint(c), manifest.sha256,
                                         walls.get(c.name)) for c in cells}

    def save(state: str = "running") -> None:
        record["state"] = state
        record["cells"] = [cell_records[c.name] for c in cells]
        write_json(paths.study_record_path(out), record)

    save()
    progress = _StudyProgress(len(cells))
    progress.done = sum(f.state == COMPLETE for f in found.values())
    skipped = progress.done
    trained = 0
    with Live(progress, console=console, refresh_per_second=2, transient=False, redirect_stdout=False,
              redirect_stderr=False) as live:
        for cell in cells:
            where = found[cell.name]
            if where.state == COMPLETE:
                if cell.name in newcomers:  # its site's scores may be missing or stale
                    score_newcomer(newcomers[cell.name], where.run, prepared, study, device, console)
                continue
            progress.current = cell.name
            live.refresh()
            console.print(Rule(f"{cell.name}" + (f" ({where.note})" if where.note else "")))
            started = time.monotonic()
            if where.state in (PENDING, TRAINING):
                resuming = where.state == TRAINING
                cell_records[cell.name]["state"] = TRAINING
                save()
                federate(cell.config, where.run, device=device, resume=resuming,
                         overwrite=not resuming, console=console)
                trained += 1
                where.state = TRAINED
                cell_records[cell.name]["state"] = TRAINED
                fault_point("study.cell-trained")
                save()
            evaluate_run(where.run, device=device, console=Console(quiet=True), **study.evaluate)
            fault_point("study.cell-evaluated")
            if cell.name in newcomers:
                score_newcomer(newcomers[cell.name], where.run, prepared, study, device, console)
            wall = time.monotonic() - started
            where.state = COMPLETE
            cell_records[cell.name].update(state=COMPLETE, wall_s=wall)
            save()
            progress.done += 1
            progress.timed.append(wall)
            live.refresh()
        progress.current = "comparing and writing the report"
        live.refresh()
        comparisons = {}
        for blocks, rank in grid_settings(study):
            runs = [found[c.name].run for c in grid if c.setting == (blocks, rank)]
            name = setting_name(blocks, rank)
            comparisons[(blocks, rank)] = compare_runs(
                runs, study.compare["test"], reference=study.compare["reference"],
                metric=study.compare["metric"], out=paths.study_compare_dir(out, name), overwrite=True,
                console=Console(quiet=True))
        report = write_study_report(study, out, {c.name: found[c.name].run for c in cells}, grid,
                                    comparisons, tuple(newcomers.values()))
        progress.current = "done"
    save("complete")
    console.print(f"\nstudy: {len(cells)} cells ({skipped} already complete, {trained} trained now); "
                  f"report: [bold]{report.html}[/]", highlight=False)
    return StudyResult(out, report, trained, skipped)
