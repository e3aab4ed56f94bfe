"""The study's participation experiment: what a hospital that did not train gets.

For every participation cell (a main-setting run trained with ``--holdout SITE``) the held-out
site is scored three ways, through the same functions the commands use:

- *zero-shot*: ``cmrfed evaluate RUN --client SITE`` with no adapter (the run's shared tensors,
  its adapted groups at their start values), in ``STUDY/newcomers/<cell>/held-out/``;
- *after adapt*: ``cmrfed adapt RUN --client SITE`` (its local adapter trained on its own train
  split over the frozen shared tensors) into ``adapted/``, then scored into ``adapted-eval/``;
- *as a full member*: its score in the grid cell of the same method and seed, in which it
  trained (read by the report from that run's evaluation).

Each folder is written atomically and carries what it was computed from (the run's tensors, the
split, threshold and bootstrap count; for ``adapted/`` the epochs and learning rate), so on
``--resume`` a folder is kept exactly when it still matches, and anything else is recomputed;
adapting and scoring are seeded, so a resumed study writes the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cmrfed import paths
from cmrfed.atomic import read_json_or_none
from cmrfed.eval.evaluate_site import evaluate_site
from cmrfed.faults import fault_point
from cmrfed.fed.adapt import adapt, run_identity
from cmrfed.fed.runinfo import load_run
from cmrfed.study.config import StudyConfig
from cmrfed.study.plan import Cell

HELD_OUT, ADAPTED, ADAPTED_EVAL = "held-out", "adapted", "adapted-eval"


@dataclass(frozen=True)
class Newcomer:
    """Where one participation cell's held-out site was scored."""

    cell: Cell
    member: Cell  # the grid cell in which the site trained
    folder: Path  # STUDY/newcomers/<cell>/

    @property
    def site(self) -> str:
        assert self.cell.holdout is not None
        return self.cell.holdout

    @property
    def held_out(self) -> Path:
        return self.folder / HELD_OUT

    @property
    def adapted(self) -> Path:
        return self.folder / ADAPTED

    @property
    def adapted_eval(self) -> Path:
        return self.folder / ADAPTED_EVAL



def _scored(folder: Path, identity: dict[str, Any], evaluate: dict[str, Any]) -> bool:
    """A site evaluation of these run tensors with the study's evaluate options."""
    record = read_json_or_none(paths.site_eval_record_path(folder))
    return bool(record) and paths.site_predictions_path(folder).exists() and (
        record.get("run"), record.get("split"), record.get("threshold", {}).get("mode"), record.get("n_boot")
    ) == (identity, evaluate["split"], evaluate["threshold"], evaluate["n_boot"])


def _adapted(folder: Path, identity: dict[str, Any], epochs: int, lr: float) -> bool:
    """An ADAPTED folder of these run tensors with these adapt options."""
    record = read_json_or_none(paths.adapt_record_path(folder))
    return bool(record) and (record.get("run"), record.get("epochs"), record.get("lr")) == (
        identity, epochs, lr)


def score_newcomer(newcomer: Newcomer, run: Path, prepared: Path, study: StudyConfig, device: str,
                   console: Console) -> bool:
    """Make (or keep) the three folders of ``newcomer``; True when anything was computed."""
    info = load_run(run)
    which = study.evaluate["which"]
    identity = run_identity(info, which)
    options = dict(split=study.evaluate["split"], which=which, threshold=study.evaluate["threshold"],
                   n_boot=study.evaluate["n_boot"], device=device, console=Console(quiet=True))
    epochs = int(study.adapt["epochs"])
    lr = info.config.lr if study.adapt["lr"] is None else float(study.adapt["lr"])
    site, worked = newcomer.site, False
    if not _scored(newcomer.held_out, identity, study.evaluate):
        evaluate_site(run, site, prepared, out=newcomer.held_out, **options)
        worked = True
    fresh = not _adapted(newcomer.adapted, identity, epochs, lr)
    if fresh:
        console.print(f"{newcomer.cell.name}: {site} adapts its own adapter ({epochs} epochs)",
                      highlight=False)
        adapt(run, site, prepared, newcomer.adapted, which=which, epochs=epochs, lr=lr, device=device,
              overwrite=True, console=Console(quiet=True))
        fault_point("study.newcomer-adapted")
        worked = True
    if fresh or not _scored(newcomer.adapted_eval, identity, study.evaluate):
        evaluate_site(run, site, prepared, private=newcomer.adapted, out=newcomer.adapted_eval, **options)
        worked = True
    return worked
