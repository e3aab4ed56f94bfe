"""The RUN folder of a federated run, written the same way whichever engine drives the rounds.

The in-process engine and the Flower ServerApp record the same run.json, the same rounds.jsonl
lines and the same tensor files, so ``evaluate`` and ``compare`` cannot tell the engines apart.
Everything here is a plain function of records the engine already holds; no engine logic.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from cmrfed import paths
from cmrfed.atomic import atomic_file, clean_stale_temporaries, json_text, swap_in, write_json
from cmrfed.errors import DataError, UsageError
from cmrfed.fed.accounting import analytic_shared_params
from cmrfed.fed.client import Client
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import HEAD, MethodSpec
from cmrfed.fed.strategy import TensorState
from cmrfed.fed.task import RunModel
from cmrfed.lock import folder_lock
from cmrfed.metrics import binary_metrics
from cmrfed.model.classifier import param_group
from cmrfed.outputs import RUN, check_replaceable, is_empty_dir
from cmrfed.provenance import versions

RUN_FORMAT_VERSION = 1
SELECTION_METRIC = "balanced_accuracy"


@dataclass(frozen=True)
class RunFolder:
    """Where a federate command writes: ``work`` is RUN itself, or (``--overwrite`` of an
    existing run) the staging folder beside it that is swapped in only once complete."""

    final: Path
    work: Path
    resume: bool  # whether ``work`` holds a run to continue


def resumable_folder(out: Path, overwrite: bool) -> Path:
    """The folder ``--resume`` continues: the staging folder of an interrupted ``--overwrite``
    when ``overwrite`` is given and one exists, else RUN itself."""
    staging = paths.run_staging_dir(out)
    return staging if overwrite and RUN.recognise(staging) else Path(out)


def recorded_config(out: Path, overwrite: bool) -> dict[str, Any]:
    """The ``config`` block of the run.json that ``--resume`` would continue."""
    folder = resumable_folder(out, overwrite)
    config_file = paths.run_config_path(folder)
    if not config_file.exists():
        raise UsageError(f"{out}: no run.json to resume; start the run without --resume")
    try:
        return dict(json.loads(config_file.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{config_file}: not a cmrfed run.json ({exc}); start again without "
                        "--resume") from exc


def resume_options(out: Path, overwrite: bool, options: Mapping[str, Any],
                   typed: set[str]) -> dict[str, Any]:
    """The FederateConfig options of the run ``--resume`` continues, read from its run.json.

    Options the user typed (``typed``; defaults do not count) must equal the recorded ones, so a
    resumed run is the run that was started; the rest need not be retyped.
    """
    recorded = FederateConfig.from_dict(recorded_config(out, overwrite))
    values = {f.name: getattr(recorded, f.name) for f in fields(recorded)}
    differ = []
    for name in sorted(typed & set(values)):
        given, kept = options[name], values[name]
        if (list(given) if isinstance(given, tuple) else given) != (
                list(kept) if isinstance(kept, tuple) else kept):
            differ.append(f"--{name.replace('_', '-')} {given!r} (the run has {kept!r})")
    if differ:
        raise UsageError(f"{out}: --resume with options that differ from the run: {'; '.join(differ)}. "
                         "Drop them to continue the run as it was started, or start a new run")
    return values


@contextlib.contextmanager
def open_run_folder(out: Path, *, overwrite: bool, resume: bool) -> Iterator[RunFolder]:
    """Lock RUN for the whole command and decide where the run is written.

    - a new run is written into RUN directly (rounds are appended as they finish, so an
      interrupted run can be continued with ``--resume``);
    - ``--overwrite`` of an existing run (only a cmrfed RUN folder; anything else is refused)
      builds the new run in the staging folder ``.RUN.overwrite`` beside it and swaps it in when
      it has finished: a failed or killed run never destroys the finished one. An interrupted
      overwrite is continued with ``--overwrite --resume`` (it continues the staging folder);
      ``--overwrite`` alone discards it and starts the replacement again; ``--resume`` alone
      continues RUN itself.

    A failure before the first round is checkpointed removes what this command created (so the
    same command can simply be rerun); a later one leaves a run to ``--resume``.
    """
    out = Path(out)
    with folder_lock(out):
        clean_stale_temporaries(out)
        staging = paths.run_staging_dir(out)
        occupied = out.exists() and not is_empty_dir(out)
        if overwrite and occupied:
            check_replaceable(out, RUN, overwrite=True)
            if resume and RUN.recognise(staging):
                work, continuing = staging, True
            else:
                shutil.rmtree(staging, ignore_errors=True)
                work, continuing = staging, False
        elif resume:
            work, continuing = resumable_folder(out, overwrite), True
        else:
            if occupied:
                raise UsageError(f"{out} already exists; pass --resume to continue it, --overwrite "
                                 "to replace it, or choose another --out")
            work, continuing = out, False
        created = not work.exists()
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {work} ({exc.strerror}); choose an --out you can "
                             "write") from exc
        try:
            yield RunFolder(out, work, continuing)
        except BaseException:
            if created and not paths.checkpoint_path(work).exists():
                shutil.rmtree(work, ignore_errors=True)
            raise
        if work != out:
            swap_in(work, out)


def val_metrics(client: Client, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """A client's own model on its own validation split (empty when it has none)."""
    if client.val is None or len(client.val) == 0:
        return {}
    probs = client.predict(model, client.val, device)
    return binary_metrics(client.val.labels.numpy(), probs)


def analytic_params_per_message(run_model: RunModel, cfg: FederateConfig) -> int:
    """Scalars one client sends per round, counted from layer shapes (0 when nothing travels)."""
    if not run_model.spec.federated:
        return 0
    model = run_model.model
    head_params = sum(int(p.numel()) for n, p in model.named_parameters() if param_group(n) == HEAD)
    return analytic_shared_params(model, run_model.spec, cfg, run_model.start_block, head_params)


def method_record(spec: MethodSpec) -> dict[str, Any]:
    return {
        "name": spec.name, "summary": spec.summary, "adapters": list(spec.adapters),
        "trained": sorted(spec.trained), "shared": sorted(spec.shared),
        "private": sorted(spec.private), "frozen": sorted(spec.frozen), "adapted": sorted(spec.adapted),
        "phases": [{"trains": sorted(spec.phase_groups(p)),
                    "adapters": None if p.mix is None else dict(p.mix)} for p in spec.training_phases],
        "mixing": spec.mixing,
    }


def run_record(
    cfg: FederateConfig,
    spec: MethodSpec,
    *,
    created_by: str,
    data: Mapping[str, Any],
    clients: Mapping[str, Mapping[str, int]],
    backbone: Mapping[str, Any],
    analytic: int,
    device: str,
    engine: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run.json of a run before its first round (``result`` is added when it finishes);
    ``privacy`` is the DP plan of every site (cmrfed/fed/privacy.py), absent without DP."""
    record = {
        "format_version": RUN_FORMAT_VERSION,
        "created_by": created_by,
        "config": cfg.to_dict(),
        "method": method_record(spec),
        "data": dict(data),
        "clients": {name: dict(counts) for name, counts in clients.items()},
        "backbone": dict(backbone),
        "communication": {"analytic_params_per_message": analytic},
        "versions": versions(),
        "seed": cfg.seed,
        "device": device,
    }
    if engine is not None:
        record["engine"] = dict(engine)
    if privacy is not None:
        record["privacy"] = dict(privacy)
    return record


def client_round_record(
    train_loss: float, n_train: int, val: Mapping[str, float], bytes_up: int, bytes_down: int,
    params: int,
) -> dict[str, Any]:
    """One client's entry of a rounds.jsonl line."""
    return {
        "train_loss": train_loss, "n_train": n_train, "val": dict(val),
        "bytes_up": bytes_up, "bytes_down": bytes_down, "params_up": params, "params_down": params,
    }


def _mean_val(clients: Mapping[str, Mapping[str, Any]], metric: str) -> float:
    """Mean over clients whose ``metric`` is defined (NaN when it is nowhere). An undefined MCC (a
    model that predicts one class for every subject) counts as 0, chance level, as scikit-learn
    and so CineMA's early stopping count it; otherwise such a round would be ranked by its other
    sites alone."""
    values = [c["val"][metric] for c in clients.values() if metric in c["val"]]
    if metric == "mcc":
        values = [v if np.isfinite(v) else 0.0 for v in values]
    scores = [v for v in values if np.isfinite(v)]
    return float(np.mean(scores)) if scores else float("nan")


def round_record(round_index: int, clients: Mapping[str, Mapping[str, Any]], wall_s: float,
                 select: str = SELECTION_METRIC, participants: list[str] | None = None,
                 failed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A rounds.jsonl line: always the mean val balanced accuracy, plus the mean of the ``select``
    metric the best round is chosen by (``--select``), and which metric that is.

    ``participants``: the sites asked to train this round (every site without
    ``--sites-per-round``); ``failed``: site -> why it did not answer (Flower engine).
    """
    record = {
        "round": round_index,
        "clients": {name: dict(entry) for name, entry in clients.items()},
        "participants": list(participants) if participants is not None else list(clients),
        "failed": dict(failed or {}),
        "mean_val_balanced_accuracy": _mean_val(clients, SELECTION_METRIC),
        "wall_s": wall_s,
    }
    record[f"mean_val_{select}"] = _mean_val(clients, select)
    record["select"] = select
    return record


def selection_score(record: Mapping[str, Any]) -> float:
    """The mean val metric a round is ranked by (balanced accuracy for lines without ``select``)."""
    value = record.get(f"mean_val_{record.get('select', SELECTION_METRIC)}")
    return float("nan") if value is None else float(value)


def has_score(record: Mapping[str, Any]) -> bool:
    """Whether a round has a selection score (rounds.jsonl holds ``null`` where it has none)."""
    return bool(np.isfinite(selection_score(record)))


def append_round(out: Path, record: Mapping[str, Any]) -> None:
    """One strict JSON line (NaN written as null) appended to rounds.jsonl."""
    with paths.rounds_log_path(out).open("a", encoding="utf-8") as handle:
        handle.write(json_text(record) + "\n")


def save_tensors(path: Path, state: TensorState) -> None:
    """A safetensors file of adapter/head tensors, written atomically."""
    with atomic_file(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        except SafetensorError as exc:  # safetensors reports an unwritable folder as its own error
            raise DataError(f"cannot write {path} ({exc}); choose a folder you can write, or free "
                            "space, and run the command again") from exc


def write_result(out: Path, completed_rounds: int, best_round: int, best_score: float,
                 bytes_up: int, bytes_down: int, select: str = SELECTION_METRIC,
                 privacy: Mapping[str, Any] | None = None,
                 stopped: Mapping[str, Any] | None = None) -> None:
    """Add ``result`` to run.json: the mark ``evaluate`` checks for a finished run. The best round's
    mean val balanced accuracy is always there (read from rounds.jsonl when it was selected by
    another metric), with the selected metric's value next to it. ``privacy``: what each site
    spent (DP runs); ``stopped``: the round the run stopped before, and why (``round``,
    ``reason``), when it ended before its last round."""
    run_info = json.loads(paths.run_config_path(out).read_text(encoding="utf-8"))
    best_balanced = best_score
    if select != SELECTION_METRIC:
        log = paths.rounds_log_path(out)
        lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        rows = [json.loads(ln) for ln in lines if ln.strip()]
        best_balanced = next((r["mean_val_balanced_accuracy"] for r in rows if r["round"] == best_round),
                             float("nan"))
    run_info["result"] = {
        "completed_rounds": completed_rounds, "best_round": best_round,
        "best_mean_val_balanced_accuracy": best_balanced,
        "selected_by": select, f"best_mean_val_{select}": best_score,
        "bytes_up_total": bytes_up, "bytes_down_total": bytes_down,
    }
    if privacy is not None:
        run_info["result"]["privacy"] = dict(privacy)
    if stopped is not None:
        run_info["result"]["stopped"] = dict(stopped)
    write_json(paths.run_config_path(out), run_info)


def round_line(record: Mapping[str, Any]) -> str:
    """The one line a round prints."""
    clients = record["clients"].values()
    losses = [c["train_loss"] for c in clients if np.isfinite(c["train_loss"])]  # those that trained
    loss = float(np.mean(losses)) if losses else float("nan")
    up = sum(c["bytes_up"] for c in clients)
    down = sum(c["bytes_down"] for c in clients)
    select = record.get("select", SELECTION_METRIC)

    def shown(key: str) -> str:
        value = record.get(key)
        return "—" if value is None or not np.isfinite(value) else f"{value:.3f}"

    selected = "" if select == SELECTION_METRIC else f"  val {select} {shown(f'mean_val_{select}')}"
    return (f"round {record['round']:>3}  loss {loss:.4f}  val bal.acc "
            f"{shown('mean_val_balanced_accuracy')}{selected}  up {up / 1024:.1f} KiB  "
            f"down {down / 1024:.1f} KiB  {record['wall_s']:.1f}s")
