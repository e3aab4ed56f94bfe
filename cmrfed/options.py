"""Every command's options, declared once.

The click commands of :mod:`cmrfed.cli` are built from these lists, and study files
(:mod:`cmrfed.study.config`) parse their ``[prepare]``, ``[federate]``, ``[evaluate]``, ``[adapt]``
and ``[compare]`` tables with the very same parameters (:func:`parser`), so an option added here
is a command-line option and a study key at once, with one default and one check. The
conversions from parsed values to the stages' own types (:func:`prepare_options`,
:func:`federate_config`) live here too, shared by both callers.

The stage modules are imported inside the conversion functions only to keep ``cmrfed --help``
fast (they import torch); nothing here is imported by the library below the study.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from cmrfed.data.prepare import PrepareOptions
    from cmrfed.fed.config import FederateConfig


def _triple(text: str, option: str, cast: type, example: str) -> tuple:
    """Three positive numbers given as ``a,b,c`` (shapes and spacings)."""
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{option} takes three numbers like {example}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise click.BadParameter(f"{option} takes three positive numbers like {example}")
    return values


def int_triple(text: str, option: str) -> tuple[int, int, int]:
    return _triple(text, option, int, "192,192,16")


def float_triple(text: str, option: str) -> tuple[float, float, float]:
    return _triple(text, option, float, "1,1,10")


class Owned(click.Choice):
    """A choice whose values the module that owns them names (``"module:ATTRIBUTE"``).

    The owner (the method table, the model, a stage) is the one place that decides which values
    exist, and checks them again when called from Python; the command line reads the same list,
    so the two cannot drift apart. It is read when first needed, which keeps ``cmrfed --help``
    from importing torch.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        module, attribute = self.owner.split(":")
        return tuple(getattr(importlib.import_module(module), attribute))

    @choices.setter
    def choices(self, _placeholder: Sequence[str]) -> None:
        """click.Choice's __init__ assigns its values; the owner's are read instead."""


# --- the options of each command ------------------------------------------------------------

def device_option() -> click.Option:
    """``--device``, as every command that computes takes it (a fresh object per command)."""
    return click.Option(["--device"], default="auto", show_default=True,
                        type=Owned("cmrfed.fed.task:DEVICES"))


SYNTH: list[click.Parameter] = [
    click.Option(["--out"], required=True, type=click.Path(path_type=str),
                 help="Folder to write the acdc/, mnms/ and mnms2/ trees into."),
    click.Option(["--seed"], default=0, show_default=True, type=int, help="Same seed, same files."),
    click.Option(["--subjects"], default=24, show_default=True, type=int, help="Subjects per dataset."),
    click.Option(["--shape"], default="96,96,8", show_default=True,
                 help="Nominal matrix x,y,z (each vendor's protocol scales it)."),
    click.Option(["--frames"], default=None, type=int, help="Cine frames for all [per-vendor range]."),
    click.Option(["--appearance"], default=1.0, show_default=True, type=float,
                 help="Heterogeneity dial: how far each vendor's image chain (contrast curve, SNR, bias "
                      "field, resolution) departs from a common one; 0 alike, 1 today's vendors."),
    click.Option(["--label-shift"], default=1.0, show_default=True, type=float,
                 help="Heterogeneity dial: how far each site's normal/abnormal mix departs from the "
                      "pooled mix; 0 alike, 1 the real per-vendor mixes."),
    click.Option(["--concept-shift"], default=0.0, show_default=True, type=float,
                 help="Heterogeneity dial: how far each site's wall-thickness cut-off for an abnormal "
                      "heart departs from the common one; 0 one rule everywhere (today's cohort), 1 a "
                      "realistic spread of centres' criteria."),
    click.Option(["--site"], default=None,
                 help="Write instead a hospital site of this name: a CSV plus DICOM series (prepare --csv)."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing OUT folder."),
]

PREPARE: list[click.Parameter] = [
    click.Option(["--acdc"], type=click.Path(path_type=str), help="ACDC folder (holding database/, or it)."),
    click.Option(["--mnms"], type=click.Path(path_type=str),
                 help="M&Ms-1 folder (holding OpenDataset/, or it)."),
    click.Option(["--mnms2"], type=click.Path(path_type=str), help="M&Ms-2 folder (holding MnM2/, or it)."),
    click.Option(["--csv"], multiple=True, type=click.Path(path_type=str),
                 help="A site's CSV of its own exams (DICOM or NIfTI); repeatable."),
    click.Option(["--out"], required=True, type=click.Path(path_type=str), help="PREPARED folder to write."),
    click.Option(["--spacing"], default="1,1,10", show_default=True,
                 help="Target voxel spacing in mm (x,y,z)."),
    click.Option(["--shape"], default="192,192,16", show_default=True, help="Target volume shape (x,y,z)."),
    click.Option(["--split"], default="0.6,0.2,0.2", show_default=True,
                 help="Train,val,test fractions per client."),
    click.Option(["--seed"], default=0, show_default=True, type=int, help="Seed of the split."),
    click.Option(["--workers"], default=1, show_default=True, type=int,
                 help="Subjects processed in parallel."),
    click.Option(["--skip-invalid"], is_flag=True, help="Leave out bad subjects (listed in the manifest)."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing PREPARED folder."),
    click.Option(["--tables"], type=click.Path(path_type=str), help="Alternative data_manifests folder."),
]

FEDERATE: list[click.Parameter] = [
    click.Option(["--data", "data"], default=None, type=click.Path(path_type=str),
                 help="PREPARED folder written by `cmrfed prepare` (with --resume: from run.json)."),
    click.Option(["--method"], default="duallora", show_default=True,
                 type=Owned("cmrfed.fed.methods:METHODS")),
    click.Option(["--blocks"], default="2", show_default=True,
                 help="Adapt the last N transformer blocks, or 'all'."),
    click.Option(["--rank"], default=8, show_default=True, type=int, help="Rank of the (global) LoRA."),
    click.Option(["--local-rank"], default=None, type=int, help="Rank of DualLoRA's local LoRA [--rank]."),
    click.Option(["--alpha"], default=16.0, show_default=True, type=float,
                 help="LoRA alpha (scale alpha/r)."),
    click.Option(["--local-alpha"], default=None, type=float, help="Alpha of the local LoRA [--alpha]."),
    click.Option(["--targets"], default="q,kv,proj,fc1,fc2", show_default=True,
                 help="Comma-separated linear layers to adapt in each adapted block."),
    click.Option(["--head"], default="shared", show_default=True,
                 type=Owned("cmrfed.fed.methods:HEAD_CHOICES"),
                 help="Share the classification head, or keep it private per site."),
    click.Option(["--rounds"], default=10, show_default=True, type=int),
    click.Option(["--local-epochs"], default=1, show_default=True, type=int),
    click.Option(["--batch-size"], default=8, show_default=True, type=int),
    click.Option(["--lr"], default=3e-3, show_default=True, type=float),
    click.Option(["--weight-decay"], default=0.05, show_default=True, type=float),
    click.Option(["--class-balanced/--no-class-balanced"], default=True, show_default=True,
                 help="Weight the loss by inverse class frequency per site (under --dp-epsilon: from "
                      "label counts released with DP noise, see --dp-count-share)."),
    click.Option(["--seed"], default=0, show_default=True, type=int),
    click.Option(["--backbone"], default="tiny", show_default=True,
                 help="tiny|small|base (seeded random init), tiny-pretrained (shipped) or a CineMA "
                      "safetensors file."),
    click.Option(["--cache/--no-cache"], default=True, show_default=True,
                 help="Cache the frozen trunk's features (used when fewer than all blocks are adapted)."),
    click.Option(["--cache-dtype"], default=None, type=Owned("cmrfed.fed.config:CACHE_DTYPES"),
                 help="Dtype of cached trunk features [bfloat16 under bf16 precision, else float32]."),
    click.Option(["--precision"], default="auto", show_default=True, type=Owned("cmrfed.precision:CHOICES"),
                 help="Forward pass in float32, or under bfloat16 autocast (float32 weights, optimiser and "
                      "loss); auto: bf16 where the device computes it natively (run.json records which)."),
    click.Option(["--augment"], default="cinema", show_default=True,
                 type=Owned("cmrfed.data.augment:AUGMENT_CHOICES"),
                 help="Training augmentation: CineMA's random affine + gamma + noise, or none."),
    click.Option(["--augment-views"], default=8, show_default=True, type=int,
                 help="Seeded augmented views per train subject (cached with the trunk); 0: a fresh view "
                      "every step (needs --no-cache)."),
    click.Option(["--augment-seed"], default=0, show_default=True, type=int,
                 help="Seed of the views (shared by every method and --seed of a study)."),
    click.Option(["--label-smoothing"], default=0.1, show_default=True, type=float),
    click.Option(["--schedule"], default="cosine", show_default=True,
                 type=Owned("cmrfed.fed.schedule:SCHEDULE_CHOICES"),
                 help="lr: warm-up then cosine decay to --min-lr across rounds, or --lr throughout."),
    click.Option(["--warmup-rounds"], default=1.0, show_default=True, type=float,
                 help="Rounds of linear lr warm-up (cosine schedule)."),
    click.Option(["--min-lr"], default=1e-5, show_default=True, type=float,
                 help="lr at the end of the cosine."),
    click.Option(["--layer-decay"], default=0.75, show_default=True, type=float,
                 help="Layer-wise lr decay when the backbone is trained (central-full)."),
    click.Option(["--select"], default="mcc", show_default=True,
                 type=Owned("cmrfed.fed.config:SELECT_CHOICES"),
                 help="Mean client validation metric that picks the best round."),
    click.Option(["--dp-epsilon"], type=float, default=None,
                 help="Differential privacy: DP-SGD at every site, noise calibrated so each site's whole "
                      "run stays within this epsilon (label counts for class balancing included)."),
    click.Option(["--dp-delta"], type=float, default=None,
                 help="DP delta of every site [1e-5; must be below 1 / its training subjects]."),
    click.Option(["--dp-clip"], type=float, default=None, help="DP per-sample gradient clipping norm [1.0]."),
    click.Option(["--aggregate"], default="weighted", show_default=True,
                 type=Owned("cmrfed.fed.strategy:AGGREGATE_RULES"),
                 help="FedAvg's client weights: by train-set size, or uniform (FedDPA's code)."),
    click.Option(["--feddpa-scale"], default=0.5, show_default=True, type=float,
                 help="FedDPA's inference mixing: the local adapter's weight is this times the mean cosine "
                      "similarity to the site's k reference subjects, the global's 1 minus it."),
    click.Option(["--feddpa-k"], default=5, show_default=True, type=int,
                 help="FedDPA's inference mixing: training subjects each site keeps (privately) to compare "
                      "test instances with."),
    click.Option(["--dp-count-share"], type=float, default=None,
                 help="Share of each site's DP budget spent releasing its label counts for class "
                      "balancing [0.1; needs --dp-epsilon and class balancing]."),
    click.Option(["--sites-per-round"], default=None, type=int,
                 help="Ask K sites per round (seeded by seed and round) [every site]."),
    click.Option(["--holdout"], default=None, help="Leave this site out of training (leave-one-vendor-out)."),
    device_option(),
    click.Option(["--out"], required=True, type=click.Path(path_type=str), help="RUN folder to write."),
    click.Option(["--resume"], is_flag=True, help="Continue an interrupted run from its last round."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing RUN folder."),
]

EVALUATE: list[click.Parameter] = [
    click.Argument(["run"], type=click.Path(path_type=str)),
    click.Argument(["site_evals"], nargs=-1, type=click.Path(path_type=str)),
    click.Option(["--split"], default="test", show_default=True,
                 type=Owned("cmrfed.data.shards:EVAL_SPLITS")),
    click.Option(["--round", "which"], default="best", show_default=True,
                 type=Owned("cmrfed.fed.runinfo:ROUND_CHOICES"),
                 help="The best round by the run's --select metric (mean client val), or the last."),
    click.Option(["--threshold"], default="0.5", show_default=True,
                 type=Owned("cmrfed.eval.scoring:THRESHOLD_MODES"),
                 help="Fixed 0.5, or each model's Youden threshold on its val split."),
    click.Option(["--n-boot"], default=1000, show_default=True, type=int,
                 help="Bootstrap replicates for CIs."),
    click.Option(["--client"], default=None, help="Evaluate only this site, on its own data (needs --data)."),
    click.Option(["--private"], default=None, type=click.Path(path_type=str),
                 help="With --client: the site's RUN-shaped folder of private tensors, or its ADAPTED "
                      "folder."),
    click.Option(["--data"], default=None, type=click.Path(path_type=str),
                 help="With --client: the site's own PREPARED folder; without: the run's PREPARED folder, "
                      "if it moved since the run [from run.json]."),
    click.Option(["--out"], default=None, type=click.Path(path_type=str),
                 help="With --client: SITE_EVAL folder to write [<private or RUN>/site-eval/<site>]."),
    click.Option(["--metrics-only"], is_flag=True,
                 help="With --client: send metrics, no per-subject predictions."),
    click.Option(["--merge"], is_flag=True,
                 help="Merge the SITE_EVAL folders given after RUN into RUN/eval/."),
    click.Option(["--member-run"], default=None, type=click.Path(path_type=str),
                 help="With --merge: an evaluated run in which the held-out site trained (participation "
                      "gap)."),
    click.Option(["--precision"], default=None, type=Owned("cmrfed.precision:CHOICES"),
                 help="Forward-pass precision [the run's, as run.json records it]."),
    device_option(),
]

ADAPT: list[click.Parameter] = [
    click.Argument(["run"], type=click.Path(path_type=str)),
    click.Option(["--client"], required=True,
                 help="The new site (a client of its PREPARED data, not of RUN)."),
    click.Option(["--data"], required=True, type=click.Path(path_type=str),
                 help="The site's own PREPARED folder."),
    click.Option(["--out"], required=True, type=click.Path(path_type=str), help="ADAPTED folder to write."),
    click.Option(["--epochs"], default=3, show_default=True, type=int,
                 help="Local epochs over its train split."),
    click.Option(["--lr"], default=None, type=float, help="Learning rate [the run's]."),
    click.Option(["--round", "which"], default="best", show_default=True,
                 type=Owned("cmrfed.fed.runinfo:ROUND_CHOICES"),
                 help="Adapt over the shared tensors of the run's best or last round."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing ADAPTED folder."),
    click.Option(["--precision"], default=None, type=Owned("cmrfed.precision:CHOICES"),
                 help="Forward-pass precision [the run's, as run.json records it]."),
    device_option(),
]

COMPARE: list[click.Parameter] = [
    click.Argument(["runs"], nargs=-1, required=True, type=click.Path(path_type=str)),
    click.Option(["--test"], required=True, type=Owned("cmrfed.eval.compare:TESTS"),
                 help="wilcoxon: per (seed, client) metric; mcnemar / bootstrap / delong: per subject."),
    click.Option(["--reference"], default="duallora", show_default=True,
                 type=Owned("cmrfed.fed.methods:METHODS"),
                 help="The method every other method is paired with."),
    click.Option(["--metric"], default="balanced_accuracy", show_default=True,
                 type=Owned("cmrfed.metrics:METRICS"),
                 help="Metric of the tables, Wilcoxon pairs and bootstrap difference."),
    click.Option(["--out"], required=True, type=click.Path(path_type=str), help="REPORT folder to write."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing REPORT folder."),
]

PRETRAIN: list[click.Parameter] = [
    click.Option(["--data", "data"], required=True, multiple=True, type=click.Path(path_type=str),
                 help="PREPARED folder whose train images to pretrain on (repeat for several); labels are "
                      "never read."),
    click.Option(["--size"], default="tiny", show_default=True, type=Owned("cmrfed.model.cinema:SIZES")),
    click.Option(["--objective"], default="mae", show_default=True, type=Owned("cmrfed.pretrain:OBJECTIVES"),
                 help="mae: CineMA's masked autoencoder (images only); disease: fine-tune for disease "
                      "detection (reads labels)."),
    click.Option(["--init"], default="",
                 help="Backbone to start from (e.g. an MAE output) [seeded random init]."),
    click.Option(["--layer-decay"], default=0.75, show_default=True, type=float,
                 help="Layer-wise lr decay of the disease objective (CineMA's fine-tuning)."),
    click.Option(["--augment"], default="cinema", show_default=True,
                 type=Owned("cmrfed.data.augment:AUGMENT_CHOICES"),
                 help="CineMA's augmentation of the stage (MAE: its pretraining affine; disease: its "
                      "fine-tuning gamma, noise and affine), or none."),
    click.Option(["--epochs"], default=800, show_default=True, type=int),
    click.Option(["--warmup-epochs"], default=10, show_default=True, type=int),
    click.Option(["--batch-size"], default=64, show_default=True, type=int),
    click.Option(["--lr"], default=1e-3, show_default=True, type=float),
    click.Option(["--mask-ratio"], default=0.75, show_default=True, type=float),
    click.Option(["--seed"], default=0, show_default=True, type=int),
    click.Option(["--dtype"], default="float32", show_default=True, type=Owned("cmrfed.pretrain:DTYPES"),
                 help="Precision of the written weights."),
    click.Option(["--precision"], default="fp32", show_default=True, type=Owned("cmrfed.precision:CHOICES"),
                 help="Forward pass in float32 or under bfloat16 autocast (float32 weights and optimiser; "
                      "bf16 is faster but not bitwise repeatable here); auto: bf16 where native."),
    device_option(),
    click.Option(["--out"], required=True, type=click.Path(path_type=str),
                 help="BACKBONE.safetensors to write."),
    click.Option(["--resume"], is_flag=True, help="Continue an interrupted run from its last epoch."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing output and checkpoint."),
]

FLOWER_SITE_CONFIG: list[click.Parameter] = [
    click.Option(["--client"], required=True, help="This site's client name (as in the manifest)."),
    click.Option(["--data"], required=True, type=click.Path(path_type=str),
                 help="This site's PREPARED folder (holding its shard)."),
    click.Option(["--site-dir"], required=True, type=click.Path(path_type=str),
                 help="Folder where this site keeps its private tensors."),
    device_option(),
]

FLOWER_RUN_OWN: list[click.Parameter] = [
    click.Option(["--superlink"], help="SuperLink address HOST:PORT to submit the run to."),
    click.Option(["--connection"], help="Or: a SuperLink connection of your own Flower config (flwr login)."),
    click.Option(["--insecure"], is_flag=True, help="Plain HTTP to the SuperLink (loopback tests only)."),
    click.Option(["--root-certificates"], type=click.Path(path_type=str),
                 help="CA certificate (PEM) that signed the SuperLink's TLS certificate."),
    click.Option(["--sites"], required=True, type=int, help="Number of sites (SuperNodes) to wait for."),
    click.Option(["--data"], default="", type=click.Path(path_type=str),
                 help="PREPARED folder recorded for `cmrfed evaluate` (when the sites share one)."),
    click.Option(["--node-timeout"], default=600.0, show_default=True, type=float,
                 help="Seconds to wait for the SuperNodes to connect, and for each reply."),
    click.Option(["--min-sites"], default=None, type=int,
                 help="Go on with a round when at least this many sites answered [every site asked]."),
    click.Option(["--out"], required=True, type=click.Path(path_type=str),
                 help="RUN folder the ServerApp writes (on the SuperLink's machine)."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing RUN folder."),
    click.Option(["--resume"], is_flag=True,
                 help="Continue RUN after its ServerApp or SuperLink was killed (with the options "
                      "recorded in its run.json)."),
]

DEMO_JOBS = 2
"""The demo's cells at once: on two cores, two workers of one thread each beat one of two threads."""

DEMO: list[click.Parameter] = [
    click.Option(["--out"], default="cmrfed-demo", show_default=True, type=click.Path(path_type=str),
                 help="Folder for the cohort, prepared data, runs and report."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing --out folder."),
    click.Option(["--resume"], is_flag=True, help="Continue an interrupted demo."),
    click.Option(["--dp-epsilon"], type=float, default=None,
                 help="Run the demo under differential privacy at this epsilon per site (class "
                      "balancing with private label counts), scored at each site's Youden threshold "
                      "on its val split."),
    click.Option(["--jobs"], default=DEMO_JOBS, show_default=True, type=int,
                 help="Cells run at once, each in a worker process (as `cmrfed study --jobs`)."),
]

INSPECT: list[click.Parameter] = [
    click.Argument(["prepared"], type=click.Path(path_type=str)),
    click.Option(["--backbone"], default="tiny-pretrained", show_default=True,
                 help="Frozen encoder whose features are compared: tiny|small|base, tiny-pretrained or a "
                      "CineMA safetensors file."),
    click.Option(["--out"], type=click.Path(path_type=str), help="Folder to write [PREPARED/inspect]."),
    click.Option(["--seed"], default=0, show_default=True, type=int,
                 help="Cross-validation folds (and a random backbone's init)."),
    device_option(),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing inspect folder."),
]

STUDY: list[click.Parameter] = [
    click.Argument(["study_file"], required=False, type=click.Path(path_type=str)),
    click.Option(["--out"], type=click.Path(path_type=str), help="STUDY folder to write."),
    click.Option(["--resume"], is_flag=True, help="Continue an interrupted study: complete cells are kept."),
    click.Option(["--overwrite"], is_flag=True, help="Replace an existing STUDY folder."),
    click.Option(["--device"], default=None, type=Owned("cmrfed.fed.task:DEVICES"),
                 help="Device of every run [the study file's [federate] device, else auto]."),
    click.Option(["--jobs"], default=1, show_default=True, type=int,
                 help="Cells run at once, each in a worker process with its share of the CPU threads."),
    click.Option(["--devices"], default=None,
                 help="CUDA device indices the workers take cells to, e.g. 0,1 [every worker: --device]."),
    click.Option(["--template"], is_flag=False, flag_value="example", default=None,
                 type=Owned("cmrfed.templates:TEMPLATES"),
                 help="Print a commented study file (the paper's setting), or `--template demo` the demo's."),
]

FLOWER_RUN: list[click.Parameter] = [
    # `flower run` takes every option of `federate` that shapes the result, declared once there
    *(p for p in FEDERATE if p.name not in ("data", "device", "out", "resume", "overwrite")),
    *FLOWER_RUN_OWN,
]

COMMANDS: dict[str, list[click.Parameter]] = {
    "synth": SYNTH,
    "prepare": PREPARE,
    "federate": FEDERATE,
    "evaluate": EVALUATE,
    "adapt": ADAPT,
    "compare": COMPARE,
    "pretrain": PRETRAIN,
    "demo": DEMO,
    "study": STUDY,
    "inspect": INSPECT,
}
"""Command name -> its parameters (the ``flower`` subcommands are declared above by name)."""


def parser(name: str) -> click.Command:
    """A callback-less command holding ``name``'s parameters: what a study table is parsed with."""
    return click.Command(name, params=list(COMMANDS[name]))


# --- parsed values -> the stages' own types (the command and the study alike) ---------------


def prepare_options(options: dict[str, object]) -> PrepareOptions:
    """The PrepareOptions of parsed `prepare` options (the `prepare` and `study` commands)."""
    from cmrfed.data.prepare import PrepareOptions, parse_split

    def as_path(text: object) -> Path | None:
        return Path(str(text)) if text is not None else None

    return PrepareOptions(
        out=Path(str(options["out"])),
        acdc=as_path(options["acdc"]),
        mnms=as_path(options["mnms"]),
        mnms2=as_path(options["mnms2"]),
        csv=tuple(Path(str(path)) for path in options.get("csv") or ()),
        spacing=float_triple(str(options["spacing"]), "--spacing"),
        shape=int_triple(str(options["shape"]), "--shape"),
        split=parse_split(str(options["split"])),
        seed=int(options["seed"]),
        workers=int(options["workers"]),  # type: ignore[call-overload]
        skip_invalid=bool(options["skip_invalid"]),
        overwrite=bool(options["overwrite"]),
        tables=as_path(options["tables"]),
    )


def federate_options(options: dict[str, object]) -> dict[str, object]:
    """Parsed `federate` options as FederateConfig's fields (`federate`, `flower run`, `study`)."""
    from cmrfed.fed.config import parse_blocks

    options = dict(options)
    if options.get("data"):
        options["data"] = str(Path(str(options["data"])).resolve())
    options["blocks"] = parse_blocks(str(options["blocks"]))
    options["targets"] = tuple(t.strip() for t in str(options["targets"]).split(",") if t.strip())
    return options


def federate_config(options: dict[str, object]) -> FederateConfig:
    """The FederateConfig of parsed `federate` options."""
    from cmrfed.fed.config import FederateConfig

    return FederateConfig(**federate_options(options))  # type: ignore[arg-type]
