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

All cells read one PREPARED folder, so the frozen-trunk cache (keyed by backbone fingerprint,
first adapted block and precision) is computed once per (backbone, blocks), before any cell runs,
and shared by every method and rank. ``--jobs N`` runs the cells in N worker processes
(:mod:`cmrfed.study.cells`); the report is the same. The time of every phase is printed at the end
and recorded in study.json (:mod:`cmrfed.study.timing`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.rule import Rule
from rich.text import Text

from cmrfed import __version__, paths
from cmrfed import options as declared
from cmrfed.atomic import read_json_or_none, write_json
from cmrfed.data.shards import Manifest, load_manifest
from cmrfed.errors import UsageError
from cmrfed.eval.consortium import study_consortium
from cmrfed.eval.report import compare_runs
from cmrfed.faults import fault_point
from cmrfed.fed.task import parse_devices, resolve_device
from cmrfed.lock import folder_lock
from cmrfed.model.cinema import SIZES, backbone_fingerprint, load_backbone
from cmrfed.outputs import STUDY, replacing
from cmrfed.study.cells import (
    COMPLETE,
    PENDING,
    TRAINED,
    TRAINING,
    CellDone,
    CellJob,
    CellPool,
    build_caches,
    cell_device,
    run_cell,
    startup_cpu,
)
from cmrfed.study.config import StudyConfig, grid_settings
from cmrfed.study.newcomers import Newcomer
from cmrfed.study.plan import Cell, config_key, member_cell, plan_cells, plan_participation, setting_name
from cmrfed.study.report import StudyReport, write_study_report
from cmrfed.study.timing import PhaseTimes

STUDY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class StudyResult:
    out: Path
    report: StudyReport
    trained: int  # cells trained (or continued) in this invocation
    skipped: int  # cells found complete


# --- inputs ------------------------------------------------------------------------------------


def _prepare_data(study: StudyConfig, out: Path, record: dict[str, Any], console: Console,
                  times: PhaseTimes) -> Path:
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
    with times.phase("prepare"):
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
              device: str | None = None, jobs: int = 1, devices: str | None = None,
              console: Console | None = None, times: PhaseTimes | None = None) -> StudyResult:
    """Run (or continue) the study into OUT and write its report; OUT is locked throughout.

    ``jobs`` cells run at once in worker processes (1: in this process), on the CUDA devices
    ``devices`` names (``"0,1"``) round robin; ``times`` collects the phases' times (the demo
    passes the synth phase in)."""
    console = console or Console()
    out = Path(out).resolve()
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    gpus = parse_devices(devices)
    times = times or PhaseTimes()
    with folder_lock(out):
        if overwrite and not resume and out.exists() and any(out.iterdir()):
            with replacing(out, STUDY, overwrite):  # the old study is kept until the new one is complete
                return _run_study(study, out, resume, overwrite, device, jobs, gpus, console, times)
        return _run_study(study, out, resume, overwrite, device, jobs, gpus, console, times)


def _resolved(cells: tuple[Cell, ...], device: str) -> tuple[Cell, ...]:
    """The cells with their precision resolved for the study's device, as their run.json records
    it (a cell is found complete by comparing configurations)."""
    torch_device = resolve_device(device)
    return tuple(replace(c, config=c.config.resolved(torch_device)) for c in cells)


def _run_study(study: StudyConfig, out: Path, resume: bool, overwrite: bool, device: str | None,
               jobs: int, gpus: tuple[int, ...], console: Console, times: PhaseTimes) -> StudyResult:
    started_at = time.perf_counter()
    previous = _start(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    device = device or study.device
    record: dict[str, Any] = {
        "format_version": STUDY_FORMAT_VERSION, "created_by": "cmrfed study", "version": __version__,
        "config": study.to_dict(), "state": "running",
        "prepared_with": previous.get("prepared_with"),
    }
    prepared = _prepare_data(study, out, record, console, times)
    manifest = load_manifest(prepared)
    grid = _resolved(plan_cells(study, prepared.resolve()), device)
    _check_holdout(study, manifest, prepared)
    newcomers = {c.name: Newcomer(c, member_cell(c, grid), paths.study_newcomer_dir(out, c.name))
                 for c in _resolved(plan_participation(study, prepared.resolve()), device)}
    cells = grid + tuple(n.cell for n in newcomers.values())
    fingerprints = _fingerprints(cells, tuple(manifest.shape))
    record["inputs"] = {"prepared": str(prepared.resolve()), "manifest_sha256": manifest.sha256}
    record["jobs"] = jobs
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
        record["timings"] = times.to_dict()
        write_json(paths.study_record_path(out), record)

    save()
    todo = [CellJob(cell, found[cell.name].run, found[cell.name].state, cell_device(device, gpus, position),
                    study, prepared, newcomers.get(cell.name))
            for position, cell in enumerate(cells)
            if found[cell.name].state != COMPLETE or cell.name in newcomers]  # newcomers: check its scores
    if any(job.state in (PENDING, TRAINING) for job in todo):
        with times.phase("cache"):  # once, before any cell (and any worker) reads it
            build_caches(tuple(job.cell for job in todo), prepared, manifest, device)
    progress = _StudyProgress(len(cells))
    progress.done = sum(f.state == COMPLETE for f in found.values())
    skipped = progress.done
    trained = 0

    def finished(done: CellDone) -> None:
        nonlocal trained
        times.merge(done.times)
        if found[done.name].state == COMPLETE:  # a complete participation cell: scores checked
            return
        trained += done.trained
        found[done.name].state = COMPLETE
        cell_records[done.name].update(state=COMPLETE, wall_s=done.wall_s)
        save()
        fault_point("study.cell-recorded")
        progress.done += 1
        progress.timed.append(done.wall_s)

    with Live(progress, console=console, refresh_per_second=2, transient=False, redirect_stdout=False,
              redirect_stderr=False) as live:
        if jobs == 1:
            for job in todo:
                _run_here(job, found[job.cell.name], cell_records, save, progress, live, console, finished)
        elif todo:
            for job in todo:
                if job.state in (PENDING, TRAINING):
                    cell_records[job.cell.name]["state"] = TRAINING
            save()
            _run_pool(todo, jobs, progress, live, console, finished, times)
        progress.current = "comparing and writing the report"
        live.refresh()
        with times.phase("compare"):
            comparisons = _compare_settings(study, out, grid, found)
        with times.phase("inspect"):
            consortium = study_consortium(prepared, paths.study_inspect_dir(out), study.base.backbone,
                                          study.base.seed, device)
        with times.phase("report"):
            report = write_study_report(study, out, {c.name: found[c.name].run for c in cells}, grid,
                                        comparisons, tuple(newcomers.values()), consortium)
        progress.current = "done"
    save("complete")
    elapsed = time.perf_counter() - started_at
    console.print(times.table(f"Where the time went (this invocation, --jobs {jobs})", elapsed))
    console.print(f"\nstudy: {len(cells)} cells ({skipped} already complete, {trained} trained now); "
                  f"report: [bold]{report.html}[/]", highlight=False)
    return StudyResult(out, report, trained, skipped)


def _check_holdout(study: StudyConfig, manifest: Manifest, prepared: Path) -> None:
    for site in study.holdout:
        if site not in manifest.clients:
            raise UsageError(f"{study.source}: [participation] holdout = {site!r} is not a site of "
                             f"{paths.manifest_path(prepared)}; choose among {', '.join(manifest.clients)}")


def _run_pool(todo: list[CellJob], jobs: int, progress: _StudyProgress, live: Live, console: Console,
              finished: Any, times: PhaseTimes) -> None:
    """The cells to do in ``jobs`` worker processes (``--jobs`` above 1)."""
    progress.current = f"{min(jobs, len(todo))} workers"
    live.refresh()
    results = []
    for done in CellPool(min(jobs, len(todo))).run(todo):
        results.append(done)
        finished(done)
        console.print(f"{done.name}: done in {done.wall_s:.0f}s", highlight=False)
        live.refresh()
    times.add("workers (start-up)", 0.0, startup_cpu(results), len({r.pid for r in results}))


def _compare_settings(study: StudyConfig, out: Path, grid: tuple[Cell, ...],
                      found: dict[str, _Found]) -> dict[tuple[Any, int], Any]:
    """The comparison of each (blocks, rank) setting's runs, written under STUDY/compare/."""
    comparisons = {}
    for blocks, rank in grid_settings(study):
        runs = [found[c.name].run for c in grid if c.setting == (blocks, rank)]
        comparisons[(blocks, rank)] = compare_runs(
            runs, study.compare["test"], reference=study.compare["reference"],
            metric=study.compare["metric"], out=paths.study_compare_dir(out, setting_name(blocks, rank)),
            overwrite=True, console=Console(quiet=True))
    return comparisons


def _run_here(job: CellJob, where: _Found, cell_records: dict[str, dict[str, Any]], save: Any,
              progress: _StudyProgress, live: Live, console: Console, finished: Any) -> None:
    """One cell in this process, its state recorded as it goes (``--jobs 1``)."""
    if job.state != COMPLETE:
        progress.current = job.cell.name
        live.refresh()
        console.print(Rule(f"{job.cell.name}" + (f" ({where.note})" if where.note else "")))
        if job.state in (PENDING, TRAINING):
            cell_records[job.cell.name]["state"] = TRAINING
            save()

    def trained() -> None:
        where.state = TRAINED
        cell_records[job.cell.name]["state"] = TRAINED
        save()

    finished(run_cell(job, console, on_trained=trained))
