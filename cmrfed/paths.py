"""Every artefact path of the pipeline, decided in one place.

Stages talk only through files at these derivable paths; nothing else builds artefact paths by
string concatenation.
"""

from __future__ import annotations

from pathlib import Path

# prepared data (``cmrfed prepare``)
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
CACHE_DIR = "cache"


def manifest_path(prepared: Path) -> Path:
    return Path(prepared) / MANIFEST


def shard_path(prepared: Path, client: str) -> Path:
    return Path(prepared) / SHARDS_DIR / f"{client}.h5"


def feature_cache_dir(prepared: Path) -> Path:
    """Frozen-trunk feature caches live next to the prepared data they were computed from."""
    return Path(prepared) / CACHE_DIR


# federated runs (``cmrfed federate``)
def run_config_path(run: Path) -> Path:
    return Path(run) / "run.json"


def rounds_log_path(run: Path) -> Path:
    return Path(run) / "rounds.jsonl"


def shared_tensors_path(run: Path, which: str = "final") -> Path:
    """``final`` -> RUN/shared.safetensors; ``best`` -> RUN/best/shared.safetensors."""
    if which == "final":
        return Path(run) / "shared.safetensors"
    return Path(run) / which / "shared.safetensors"


def private_tensors_path(run: Path, client: str, which: str = "final") -> Path:
    if which == "final":
        return Path(run) / "clients" / client / "private.safetensors"
    return Path(run) / which / "clients" / client / "private.safetensors"


def run_staging_dir(run: Path) -> Path:
    """``federate --overwrite``: the new run is built here, beside RUN, and swapped in at the end."""
    run = Path(run)
    return run.with_name(f".{run.name}.overwrite")


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoint"


def checkpoint_path(run: Path) -> Path:
    """The one file that lets ``--resume`` continue after the last completed round."""
    return checkpoint_dir(run) / "state.safetensors"


def wire_log_path(run: Path) -> Path:
    """Flower engine: one JSON line per message the server sent or received (keys and bytes)."""
    return Path(run) / "wire.jsonl"


def site_run_dir(site_dir: Path, run_name: str) -> Path:
    """Flower engine: a site's RUN-shaped folder for its private tensors (never sent anywhere)."""
    return Path(site_dir) / run_name


def site_state_path(site_dir: Path, run_name: str) -> Path:
    """Flower engine: a site's own checkpoint of a run (its tensors by round), beside its RUN-shaped
    folder so that copying that folder never carries it."""
    return Path(site_dir) / ".state" / f"{run_name}.safetensors"


# evaluation (``cmrfed evaluate``)
def eval_dir(run: Path) -> Path:
    return Path(run) / "eval"


def predictions_path(run: Path) -> Path:
    return eval_dir(run) / "predictions.csv"


def metrics_path(run: Path) -> Path:
    return eval_dir(run) / "metrics.json"


def site_eval_dir(folder: Path, client: str) -> Path:
    """``cmrfed evaluate RUN --client C``: where a site's own evaluation goes by default (under its
    private folder, or under RUN for a site that holds no private tensors)."""
    return Path(folder) / "site-eval" / client


def site_eval_record_path(site_eval: Path) -> Path:
    """A per-site evaluation: what the site measured (merged by ``cmrfed evaluate --merge``)."""
    return Path(site_eval) / "site_eval.json"


def site_predictions_path(site_eval: Path) -> Path:
    """A per-site evaluation's per-subject predictions (absent when it sends metrics only)."""
    return Path(site_eval) / "predictions.csv"


# a site that joins after training (``cmrfed adapt``)
def adapt_record_path(adapted: Path) -> Path:
    """ADAPTED/adapt.json; its tensors are at ``private_tensors_path(ADAPTED, client)``."""
    return Path(adapted) / "adapt.json"


# comparison report (``cmrfed compare``)
def comparison_json_path(report: Path) -> Path:
    return Path(report) / "comparison.json"


def comparison_csv_path(report: Path) -> Path:
    return Path(report) / "comparison.csv"


def comparison_md_path(report: Path) -> Path:
    return Path(report) / "comparison.md"


def report_figure_path(report: Path, name: str) -> Path:
    """A report figure: REPORT/<name>.png."""
    return Path(report) / f"{name}.png"


# the demo study (``cmrfed demo``)
# synthetic cohort (``cmrfed synth``)
SYNTH_SUMMARY = "synth_summary.json"


def synth_summary_path(cohort: Path) -> Path:
    """What ``cmrfed synth`` wrote into its OUT: every subject, the planted duplicate, options."""
    return Path(cohort) / SYNTH_SUMMARY


# consortium inspection (``cmrfed inspect``)
def inspect_json_path(out: Path) -> Path:
    """Every measure of how non-IID the consortium is."""
    return Path(out) / "inspect.json"


def inspect_md_path(out: Path) -> Path:
    return Path(out) / "inspect.md"


def inspect_figure_path(out: Path) -> Path:
    return Path(out) / "inspect.png"


def inspect_dir(prepared: Path) -> Path:
    """Where ``cmrfed inspect PREPARED`` writes unless told otherwise."""
    return Path(prepared) / "inspect"


# pretrained backbones (``cmrfed pretrain``)
def pretrain_checkpoint_dir(backbone: Path) -> Path:
    """The resumable state of ``cmrfed pretrain --out BACKBONE.safetensors``: BACKBONE.checkpoint/."""
    return Path(backbone).with_suffix(".checkpoint")


# studies (``cmrfed study``)
def study_record_path(study: Path) -> Path:
    """STUDY/study.json: the resolved study, every cell's state and where its run is."""
    return Path(study) / "study.json"


def study_prepared_dir(study: Path) -> Path:
    """Where a study that starts from raw datasets prepares them."""
    return Path(study) / "prepared"


def study_runs_dir(study: Path) -> Path:
    return Path(study) / "runs"


def study_run_dir(study: Path, cell: str) -> Path:
    return study_runs_dir(study) / cell


def study_newcomer_dir(study: Path, cell: str) -> Path:
    """STUDY/newcomers/<cell>/: the held-out site of a participation cell, scored zero-shot
    (``held-out/``), adapted (``adapted/``, what ``cmrfed adapt`` writes) and scored after adapting
    (``adapted-eval/``); each a folder ``evaluate --client`` or ``adapt`` writes."""
    return Path(study) / "newcomers" / cell


def study_compare_dir(study: Path, setting: str) -> Path:
    """STUDY/compare/<setting>/: the `compare` report of one (blocks, rank) setting."""
    return Path(study) / "compare" / setting


def study_inspect_dir(study: Path) -> Path:
    """STUDY/inspect/: ``cmrfed inspect`` of the study's prepared data with its backbone."""
    return Path(study) / "inspect"


def study_report_dir(study: Path) -> Path:
    """STUDY/report/: the main and ablation tables, figures and report.html."""
    return Path(study) / "report"
