"""``cmrfed demo``: write the synthetic cohort, then run the built-in demo study on it.

The cohort is set to the realistic vendor profile of the heterogeneity dial (:class:`Cohort`).
The study is the shipped ``demo`` template (``cmrfed study --template demo``): synth -> prepare
-> federate (duallora, fedlora, ffalora x 5 seeds x a small blocks ablation, the shipped
``tiny-pretrained`` backbone; each method and seed again without GE) -> evaluate -> adapt GE as a
newcomer -> compare --test wilcoxon -> the study report. The sizes are chosen so it finishes in
minutes on two CPU cores; the numbers show the pipeline and the statistics working, not CineMA's
accuracy (that needs the real weights: ``backbone`` in a study's ``[federate]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from cmrfed import paths
from cmrfed.data.synth import REALISTIC, Heterogeneity, write_synthetic_cohort
from cmrfed.errors import UsageError
from cmrfed.lock import folder_lock
from cmrfed.options import DEMO_JOBS
from cmrfed.outputs import DEMO, replacing
from cmrfed.study.config import StudyConfig, parse_study
from cmrfed.study.runner import StudyResult, run_study
from cmrfed.study.timing import PhaseTimes
from cmrfed.templates import template_text


@dataclass(frozen=True)
class Cohort:
    """The synthetic cohort the demo study reads (the template's [prepare] points at it).

    ``dial`` is the realistic vendor profile (cmrfed/data/synth_dial.py, ``REALISTIC``): today's
    vendor image chains (appearance 1) and per-vendor label mixes (label shift 1), and the sites
    drawing the hypertrophy boundary at their own wall-thickness cut-offs, 10.5 to 15 mm around a
    common 12 mm (concept shift 1), as centres apply different criteria.
    """

    subjects_per_dataset: int = 60
    shape: tuple[int, int, int] = (64, 64, 8)
    frames: int = 12
    seed: int = 0
    dial: Heterogeneity = REALISTIC


def demo_paths(out: Path) -> dict[str, Path]:
    """Where the demo writes, under OUT: the cohort, and the study (its prepared data, runs, report)."""
    study = Path(out) / "study"
    return {"cohort": Path(out) / "cohort", "study": study, "prepared": paths.study_prepared_dir(study),
            "runs": paths.study_runs_dir(study), "report": paths.study_report_dir(study)}


def demo_study(out: Path, text: str | None = None) -> StudyConfig:
    """The demo study (or another study text) with its paths relative to OUT."""
    return parse_study(text or template_text("demo"), "demo study (cmrfed study --template demo)",
                       Path(out).resolve())


def dp_demo_text(text: str, epsilon: float) -> str:
    """The demo study under differential privacy: every run at ``--dp-epsilon`` (class balancing
    with privately released label counts, the default under DP), scored at each site's Youden
    threshold on its own val split, since a DP model can rank subjects well with its scores on
    one side of 0.5; the report says which threshold each row uses."""
    text = text.replace("[federate]\n", f"[federate]\ndp-epsilon = {float(epsilon)!r}\n", 1)
    threshold = 'threshold = "youden-val"\n'
    if "[evaluate]\n" in text:
        return text.replace("[evaluate]\n", f"[evaluate]\n{threshold}", 1)
    return f"{text}\n[evaluate]\n{threshold}"


def run_demo(out: str | Path, cohort: Cohort | None = None, study_text: str | None = None,
             overwrite: bool = False, resume: bool = False, jobs: int = DEMO_JOBS,
             console: Console | None = None) -> StudyResult:
    """Write the cohort into OUT/cohort and run the demo study into OUT/study (``jobs`` cells at
    once, as ``cmrfed study --jobs``).

    OUT is locked for the whole demo. ``--overwrite`` replaces only a folder an earlier
    ``cmrfed demo`` made (its cohort/ or study/), never a folder of other files. The study's
    timing table (study.json ``timings``) includes the synth phase.
    """
    cohort = cohort or Cohort()
    console = console or Console()
    out = Path(out)
    study = demo_study(out, study_text)  # checked before anything is written
    with folder_lock(out):
        return _run_demo(out, cohort, study, overwrite, resume, jobs, console)


def _run_demo(out: Path, cohort: Cohort, study: StudyConfig, overwrite: bool, resume: bool, jobs: int,
              console: Console) -> StudyResult:
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise UsageError(f"{out} already exists; pass --resume to continue the demo, --overwrite "
                             "to replace it, or choose another --out")
        with replacing(out, DEMO, overwrite):  # the old demo is kept until the new one is complete
            return _build_demo(out, cohort, study, resume, jobs, console)
    return _build_demo(out, cohort, study, resume, jobs, console)


def _build_demo(out: Path, cohort: Cohort, study: StudyConfig, resume: bool, jobs: int,
                console: Console) -> StudyResult:
    where = demo_paths(out)
    times = PhaseTimes()
    if not paths.synth_summary_path(where["cohort"]).exists():
        console.print(Rule("synth: a synthetic multi-vendor cohort in the real layouts"))
        with times.phase("synth"):
            write_synthetic_cohort(where["cohort"], seed=cohort.seed, subjects=cohort.subjects_per_dataset,
                                   shape=cohort.shape, frames=cohort.frames, overwrite=True, dial=cohort.dial)
    return run_study(study, where["study"], resume=resume, jobs=jobs, console=console, times=times)
