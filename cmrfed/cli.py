"""The ``cmrfed`` command line: each subcommand only parses options and calls one stage function.

Errors a user can cause are :class:`cmrfed.errors.CmrfedError`; they are printed on one line
without a traceback, with exit code 2 for usage errors and 1 for data errors.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape

from cmrfed import __version__
from cmrfed.errors import CmrfedError, UsageError, from_os_error
from cmrfed.validate import ValidatedCommand

if TYPE_CHECKING:
    from cmrfed.data.prepare import PrepareOptions
    from cmrfed.fed.config import FederateConfig

err_console = Console(stderr=True)


def _triple(text: str, option: str, cast: type, example: str) -> tuple:
    """Three positive numbers given as ``a,b,c`` (shapes and spacings)."""
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{option} takes three numbers like {example}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise click.BadParameter(f"{option} takes three positive numbers like {example}")
    return values


def _int_triple(text: str, option: str) -> tuple[int, int, int]:
    return _triple(text, option, int, "192,192,16")


def _float_triple(text: str, option: str) -> tuple[float, float, float]:
    return _triple(text, option, float, "1,1,10")


class _Group(click.Group):
    """Prints a CmrfedError on one line (no traceback) and exits with its code: 2 for usage
    errors, 1 for data errors; the same whether run as a console script or under a test runner.
    Every command under it validates all its options before it runs (:mod:`cmrfed.validate`)."""

    command_class = ValidatedCommand
    group_class = type  # subgroups (``flower``) are _Groups too

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CmrfedError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a folder that turned out read-only or full: still one line
            error = from_os_error(exc)
            if error is None:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            ctx.exit(error.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cmrfed")
def cli() -> None:
    """Federated, parameter-efficient fine-tuning of the CineMA cine CMR foundation model.

    Stages: synth -> prepare -> federate -> evaluate -> compare; `cmrfed demo` runs them all.
    """


# --- commands (one block each) -------------------------------------------------------------


@cli.command()
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="Folder to write the acdc/, mnms/ and mnms2/ trees into.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same files.")
@click.option("--subjects", default=24, show_default=True, type=int, help="Subjects per dataset.")
@click.option("--shape", default="96,96,8", show_default=True,
              help="Nominal matrix x,y,z (each vendor's protocol scales it).")
@click.option("--frames", default=None, type=int, help="Cine frames for all [per-vendor range].")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT folder.")
def synth(out: str, seed: int, subjects: int, shape: str, frames: int | None,
          overwrite: bool) -> None:
    """Write a synthetic multi-vendor cine CMR cohort in the ACDC / M&Ms-1 / M&Ms-2 layouts."""
    from cmrfed.data.synth import cohort_table, write_synthetic_cohort

    summary = write_synthetic_cohort(out, seed=seed, subjects=subjects,
                                     shape=_int_triple(shape, "--shape"), frames=frames,
                                     overwrite=overwrite)
    Console().print(cohort_table(summary))


@cli.command()
@click.option("--acdc", type=click.Path(path_type=str), help="ACDC folder (holding database/, or it).")
@click.option("--mnms", type=click.Path(path_type=str), help="M&Ms-1 folder (holding OpenDataset/, or it).")
@click.option("--mnms2", type=click.Path(path_type=str), help="M&Ms-2 folder (holding MnM2/, or it).")
@click.option("--out", required=True, type=click.Path(path_type=str), help="PREPARED folder to write.")
@click.option("--spacing", default="1,1,10", show_default=True, help="Target voxel spacing in mm (x,y,z).")
@click.option("--shape", default="192,192,16", show_default=True, help="Target volume shape (x,y,z).")
@click.option("--split", default="0.6,0.2,0.2", show_default=True,
              help="Train,val,test fractions per client.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
@click.option("--workers", default=1, show_default=True, type=int, help="Subjects processed in parallel.")
@click.option("--skip-invalid", is_flag=True, help="Leave out bad subjects (listed in the manifest).")
@click.option("--overwrite", is_flag=True, help="Replace an existing PREPARED folder.")
@click.option("--tables", type=click.Path(path_type=str), help="Alternative data_manifests folder.")
def prepare(acdc: str | None, mnms: str | None, mnms2: str | None, out: str, spacing: str, shape: str,
            split: str, seed: int, workers: int, skip_invalid: bool, overwrite: bool,
            tables: str | None) -> None:
    """Read ACDC / M&Ms-1 / M&Ms-2 as downloaded into per-vendor HDF5 shards + manifest.json."""

    from cmrfed.data.prepare import prepare as run_prepare

    run_prepare(prepare_options(dict(
        out=out, acdc=acdc, mnms=mnms, mnms2=mnms2, spacing=spacing, shape=shape, split=split,
        seed=seed, workers=workers, skip_invalid=skip_invalid, overwrite=overwrite, tables=tables,
    )))


def prepare_options(options: dict[str, object]) -> PrepareOptions:
    """The PrepareOptions of parsed `prepare` options (the `prepare` and `study` commands)."""
    from cmrfed.data.prepare import PrepareOptions, parse_split

    def as_path(text: object) -> Path | None:
        return Path(str(text)) if text is not None else None

    return PrepareOptions(
        out=Path(str(options["out"])), acdc=as_path(options["acdc"]), mnms=as_path(options["mnms"]),
        mnms2=as_path(options["mnms2"]), spacing=_float_triple(str(options["spacing"]), "--spacing"),
        shape=_int_triple(str(options["shape"]), "--shape"), split=parse_split(str(options["split"])),
        seed=int(options["seed"]), workers=int(options["workers"]),  # type: ignore[call-overload]
        skip_invalid=bool(options["skip_invalid"]), overwrite=bool(options["overwrite"]),
        tables=as_path(options["tables"]),
    )


@cli.command()
@click.option("--data", "data", default=None, type=click.Path(path_type=str),
              help="PREPARED folder written by `cmrfed prepare` (with --resume: from run.json).")
@click.option("--method", default="duallora", show_default=True,
              type=click.Choice(["duallora", "fedlora", "ffalora", "fedsa", "local", "central",
                                 "central-full"]))
@click.option("--blocks", default="2", show_default=True,
              help="Adapt the last N transformer blocks, or 'all'.")
@click.option("--rank", default=8, show_default=True, type=int, help="Rank of the (global) LoRA.")
@click.option("--local-rank", default=None, type=int, help="Rank of DualLoRA's local LoRA [--rank].")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scale alpha/r).")
@click.option("--local-alpha", default=None, type=float, help="Alpha of the local LoRA [--alpha].")
@click.option("--targets", default="q,kv,proj,fc1,fc2", show_default=True,
              help="Comma-separated linear layers to adapt in each adapted block.")
@click.option("--head", default="shared", show_default=True, type=click.Choice(["shared", "local"]),
              help="Share the classification head, or keep it private per site.")
@click.option("--rounds", default=10, show_default=True, type=int)
@click.option("--local-epochs", default=1, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--class-balanced/--no-class-balanced", default=True, show_default=True,
              help="Weight the loss by inverse class frequency per site.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--backbone", default="tiny", show_default=True,
              help="tiny|small|base (seeded random init), tiny-pretrained (shipped) or a CineMA "
                   "safetensors file.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Cache the frozen trunk's features (used when fewer than all blocks are adapted).")
@click.option("--cache-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--augment", default="cinema", show_default=True, type=click.Choice(["cinema", "none"]),
              help="Training augmentation: CineMA's random affine + gamma + noise, or none.")
@click.option("--augment-views", default=8, show_default=True, type=int,
              help="Seeded augmented views per train subject (cached with the trunk); 0: a fresh "
                   "view every step (needs --no-cache).")
@click.option("--augment-seed", default=0, show_default=True, type=int,
              help="Seed of the views (shared by every method and --seed of a study).")
@click.option("--label-smoothing", default=0.1, show_default=True, type=float)
@click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "constant"]),
              help="lr: warm-up then cosine decay to --min-lr across rounds, or --lr throughout.")
@click.option("--warmup-rounds", default=1.0, show_default=True, type=float,
              help="Rounds of linear lr warm-up (cosine schedule).")
@click.option("--min-lr", default=1e-5, show_default=True, type=float, help="lr at the end of the cosine.")
@click.option("--layer-decay", default=0.75, show_default=True, type=float,
              help="Layer-wise lr decay when the backbone is trained (central-full).")
@click.option("--select", default="mcc", show_default=True, type=click.Choice(["mcc", "balanced_accuracy"]),
              help="Mean client validation metric that picks the best round.")
@click.option("--dp-epsilon", type=float, default=None,
              help="Differential privacy: DP-SGD at every site, noise calibrated so each site's "
                   "whole run stays within this epsilon (needs --no-class-balanced).")
@click.option("--dp-delta", type=float, default=None,
              help="DP delta of every site [1e-5; must be below 1 / its training subjects].")
@click.option("--dp-clip", type=float, default=None,
              help="DP per-sample gradient clipping norm [1.0].")
@click.option("--sites-per-round", default=None, type=int,
              help="Ask K sites per round (seeded by seed and round) [every site].")
@click.option("--holdout", default=None, help="Leave this site out of training (leave-one-vendor-out).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--out", required=True, type=click.Path(path_type=str), help="RUN folder to write.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last round.")
@click.option("--overwrite", is_flag=True, help="Replace an existing RUN folder.")
def federate(**options: object) -> None:
    """Federated LoRA fine-tuning, every vendor a client, in this process."""
    from cmrfed.fed.config import FederateConfig
    from cmrfed.fed.inprocess import federate as run_federate

    device, out = options.pop("device"), options.pop("out")
    resume, overwrite = options.pop("resume"), options.pop("overwrite")
    values = federate_options(options)
    if resume:
        from cmrfed.fed.runlog import resume_options

        values = resume_options(Path(str(out)), bool(overwrite), values,
                                typed=_typed(click.get_current_context()))
    elif values["data"] is None:
        FederateConfig(**{**values, "data": ""})  # other bad options are reported first
        raise UsageError("federate needs --data PREPARED (the folder written by `cmrfed prepare`)")
    run_federate(FederateConfig(**values), out, device=device, resume=resume, overwrite=overwrite)


def federate_options(options: dict[str, object]) -> dict[str, object]:
    """Parsed `federate` options as FederateConfig's fields (the `federate` and `study` commands)."""
    from cmrfed.fed.config import parse_blocks

    options = dict(options)
    if options.get("data") is not None:
        options["data"] = str(Path(str(options["data"])).resolve())
    options["blocks"] = parse_blocks(str(options["blocks"]))
    options["targets"] = tuple(t.strip() for t in str(options["targets"]).split(",") if t.strip())
    return options


def federate_config(options: dict[str, object]) -> FederateConfig:
    """The FederateConfig of parsed `federate` options."""
    from cmrfed.fed.config import FederateConfig

    return FederateConfig(**federate_options(options))  # type: ignore[arg-type]


@cli.command()
@click.argument("run", type=click.Path(path_type=str))
@click.argument("site_evals", nargs=-1, type=click.Path(path_type=str))
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]))
@click.option("--round", "which", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The best round by the run's --select metric (mean client val), or the last.")
@click.option("--threshold", default="0.5", show_default=True, type=click.Choice(["0.5", "youden-val"]),
              help="Fixed 0.5, or each model's Youden threshold on its val split.")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap replicates for CIs.")
@click.option("--client", default=None, help="Evaluate only this site, on its own data (needs --data).")
@click.option("--private", default=None, type=click.Path(path_type=str),
              help="With --client: the site's RUN-shaped folder of private tensors, or its ADAPTED folder.")
@click.option("--data", default=None, type=click.Path(path_type=str),
              help="With --client: the site's own PREPARED folder; without: the run's PREPARED "
                   "folder, if it moved since the run [from run.json].")
@click.option("--out", default=None, type=click.Path(path_type=str),
              help="With --client: SITE_EVAL folder to write [<private or RUN>/site-eval/<site>].")
@click.option("--metrics-only", is_flag=True, help="With --client: send metrics, no per-subject predictions.")
@click.option("--merge", is_flag=True, help="Merge the SITE_EVAL folders given after RUN into RUN/eval/.")
@click.option("--member-run", default=None, type=click.Path(path_type=str),
              help="With --merge: an evaluated run in which the held-out site trained (participation gap).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def evaluate(run: str, site_evals: tuple[str, ...], split: str, which: str, threshold: str, n_boot: int,
             client: str | None, private: str | None, data: str | None, out: str | None,
             metrics_only: bool, merge: bool, member_run: str | None, device: str) -> None:
    """Per-client, pooled, macro and cross-site metrics of a finished RUN.

    Site by site, with nothing pooled: each site runs `evaluate RUN --client SITE --private DIR
    --data PREPARED`, then `evaluate RUN --merge SITE_EVAL...` writes RUN/eval/.
    """
    from cmrfed.eval.site_eval import check_evaluate_modes

    mode = check_evaluate_modes(site_evals, client=client, private=private, data=data, out=out,
                                metrics_only=metrics_only, merge=merge, member_run=member_run)
    if mode == "merge":
        from cmrfed.eval.site_eval import merge_evaluations

        merge_evaluations(run, list(site_evals), member_run=member_run)
    elif mode == "site":
        from cmrfed.eval.site_eval import evaluate_site

        evaluate_site(run, str(client), str(data), private=private, out=out, split=split, which=which,
                      threshold=threshold, n_boot=n_boot, metrics_only=metrics_only, device=device)
    else:
        from cmrfed.eval.evaluate import evaluate_run

        evaluate_run(run, split=split, which=which, threshold=threshold, n_boot=n_boot, device=device,
                     data=data)


@cli.command()
@click.argument("run", type=click.Path(path_type=str))
@click.option("--client", required=True, help="The new site (a client of its PREPARED data, not of RUN).")
@click.option("--data", required=True, type=click.Path(path_type=str), help="The site's own PREPARED folder.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="ADAPTED folder to write.")
@click.option("--epochs", default=3, show_default=True, type=int, help="Local epochs over its train split.")
@click.option("--lr", default=None, type=float, help="Learning rate [the run's].")
@click.option("--round", "which", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="Adapt over the shared tensors of the run's best or last round.")
@click.option("--overwrite", is_flag=True, help="Replace an existing ADAPTED folder.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def adapt(run: str, client: str, data: str, out: str, epochs: int, lr: float | None, which: str,
          overwrite: bool, device: str) -> None:
    """A site that joins after training: train only its own local adapter over RUN's frozen
    shared tensors (DualLoRA's local LoRA; see the method table for the others)."""
    from cmrfed.fed.adapt import adapt as run_adapt

    run_adapt(run, client, data, out, which=which, epochs=epochs, lr=lr, device=device,
              overwrite=overwrite)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--test", required=True, type=click.Choice(["wilcoxon", "mcnemar", "bootstrap", "delong"]),
              help="wilcoxon: per (seed, client) metric; mcnemar / bootstrap / delong: per subject.")
@click.option("--reference", default="duallora", show_default=True,
              help="The method every other method is paired with.")
@click.option("--metric", default="balanced_accuracy", show_default=True,
              type=click.Choice(["balanced_accuracy", "sensitivity", "specificity", "auc", "f1", "mcc",
                                 "accuracy"]),
              help="Metric of the tables, Wilcoxon pairs and bootstrap difference.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="REPORT folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing REPORT folder.")
def compare(runs: tuple[str, ...], test: str, reference: str, metric: str, out: str,
            overwrite: bool) -> None:
    """Paired significance tests of evaluated RUNs against a reference method, and a report."""
    from cmrfed.eval.report import compare_runs

    compare_runs(list(runs), test, reference=reference, metric=metric, out=out, overwrite=overwrite)


@cli.command()
@click.option("--data", "data", required=True, multiple=True, type=click.Path(path_type=str),
              help="PREPARED folder whose train images to pretrain on (repeat for several); "
                   "labels are never read.")
@click.option("--size", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "base"]))
@click.option("--objective", default="mae", show_default=True, type=click.Choice(["mae", "disease"]),
              help="mae: CineMA's masked autoencoder (images only); disease: fine-tune for disease "
                   "detection (reads labels).")
@click.option("--init", default="", help="Backbone to start from (e.g. an MAE output) [seeded random init].")
@click.option("--layer-decay", default=0.75, show_default=True, type=float,
              help="Layer-wise lr decay of the disease objective (CineMA's fine-tuning).")
@click.option("--augment", default="cinema", show_default=True, type=click.Choice(["cinema", "none"]),
              help="CineMA's augmentation of the stage (MAE: its pretraining affine; disease: its "
                   "fine-tuning gamma, noise and affine), or none.")
@click.option("--epochs", default=800, show_default=True, type=int)
@click.option("--warmup-epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--mask-ratio", default=0.75, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="Precision of the written weights.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--out", required=True, type=click.Path(path_type=str), help="BACKBONE.safetensors to write.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output and checkpoint.")
def pretrain(**options: object) -> None:
    """Pretrain the SAX encoder: CineMA's masked autoencoder on images only, or disease
    fine-tuning from --init; writes a --backbone file."""
    from cmrfed.pretrain import PretrainConfig
    from cmrfed.pretrain import pretrain as run_pretrain

    device, out = options.pop("device"), str(options.pop("out"))
    resume, overwrite = options.pop("resume"), options.pop("overwrite")
    config = PretrainConfig(**options)  # type: ignore[arg-type]
    run_pretrain(config, out, device=str(device), resume=bool(resume), overwrite=bool(overwrite),
                 command=config.command(out))


@cli.group()
def flower() -> None:
    """Federate over Flower: a SuperNode next to each site's data, the server at a SuperLink.

    Needs the optional extra: pip install 'cmrfed[flower]'.
    """


@flower.command("site-config")
@click.option("--client", required=True, help="This site's client name (as in the manifest).")
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="This site's PREPARED folder (holding its shard).")
@click.option("--site-dir", required=True, type=click.Path(path_type=str),
              help="Folder where this site keeps its private tensors.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def flower_site_config(client: str, data: str, site_dir: str, device: str) -> None:
    """Check this site's shard and print the --node-config of its flower-supernode."""

    from cmrfed.fed.flower import site_node_config

    click.echo(site_node_config(client, Path(data), Path(site_dir), device))


@flower.command("run")
@click.option("--superlink", help="SuperLink address HOST:PORT to submit the run to.")
@click.option("--connection", help="Or: a SuperLink connection of your own Flower config (flwr login).")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the SuperLink (loopback tests only).")
@click.option("--root-certificates", type=click.Path(path_type=str),
              help="CA certificate (PEM) that signed the SuperLink's TLS certificate.")
@click.option("--sites", required=True, type=int, help="Number of sites (SuperNodes) to wait for.")
@click.option("--data", default="", type=click.Path(path_type=str),
              help="PREPARED folder recorded for `cmrfed evaluate` (when the sites share one).")
@click.option("--node-timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait for the SuperNodes to connect, and for each reply.")
@click.option("--min-sites", default=None, type=int,
              help="Go on with a round when at least this many sites answered [every site asked].")
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="RUN folder the ServerApp writes (on the SuperLink's machine).")
@click.option("--overwrite", is_flag=True, help="Replace an existing RUN folder.")
def flower_run(**options: object) -> None:
    """Submit a federated run to a SuperLink and stream its log (same options as `federate`)."""

    from cmrfed.fed.config import FederateConfig, parse_blocks
    from cmrfed.fed.flower_launch import run_flower

    launch = {k: options.pop(k) for k in ("superlink", "connection", "insecure", "sites", "overwrite",
                                          "min_sites")}
    certificates, node_timeout, out = (options.pop(k) for k in ("root_certificates", "node_timeout", "out"))
    options["blocks"] = parse_blocks(str(options["blocks"]))
    options["data"] = str(Path(str(options["data"])).resolve())
    options["targets"] = tuple(t.strip() for t in str(options["targets"]).split(",") if t.strip())
    config = FederateConfig(**options)  # type: ignore[arg-type]
    run_flower(config, Path(str(out)), root_certificates=Path(str(certificates)) if certificates else None,
               node_timeout_s=float(node_timeout), **launch)  # type: ignore[arg-type]


# `flower run` takes every option of `federate` that shapes the result, defined once there.
flower_run.params[:0] = [p for p in federate.params
                         if p.name not in ("data", "device", "out", "resume", "overwrite")]


@cli.command()
@click.option("--out", default="cmrfed-demo", show_default=True, type=click.Path(path_type=str),
              help="Folder for the cohort, prepared data, runs and report.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo.")
def demo(out: str, overwrite: bool, resume: bool) -> None:
    """The whole pipeline on a synthetic cohort: synth, then the built-in demo study (prepare,
    federate duallora, fedlora, ffalora x 5 seeds x blocks on the pretrained tiny backbone,
    evaluate, GE's participation gap, compare, report)."""
    from cmrfed.demo import run_demo

    run_demo(out, overwrite=overwrite, resume=resume)


@cli.command()
@click.argument("study_file", required=False, type=click.Path(path_type=str))
@click.option("--out", type=click.Path(path_type=str), help="STUDY folder to write.")
@click.option("--resume", is_flag=True, help="Continue an interrupted study: complete cells are kept.")
@click.option("--overwrite", is_flag=True, help="Replace an existing STUDY folder.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Device of every run [the study file's [federate] device, else auto].")
@click.option("--template", is_flag=False, flag_value="example", default=None,
              type=click.Choice(["example", "demo"]),
              help="Print a commented study file (the paper's setting), or `--template demo` the demo's.")
def study(study_file: str | None, out: str | None, resume: bool, overwrite: bool, device: str | None,
          template: str | None) -> None:
    """Run a declared grid of federated runs (methods x seeds x blocks x ranks), evaluate and
    compare them, and write STUDY/report/ (tables, figures, report.html). Resumable."""
    from cmrfed.errors import UsageError
    from cmrfed.study import template_text

    if template is not None:
        click.echo(template_text(template), nl=False)
        return
    if study_file is None or out is None:
        raise UsageError("give a study file and --out STUDY (write an example with "
                         "`cmrfed study --template`)")
    from cmrfed.study.config import load_study
    from cmrfed.study.runner import run_study

    run_study(load_study(study_file), out, resume=resume, overwrite=overwrite, device=device)


# --- end of commands -----------------------------------------------------------------------


def _typed(ctx: click.Context) -> set[str]:
    """Parameters the user gave on the command line (or in the environment), not defaults."""
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {p.name for p in ctx.command.params if p.name and ctx.get_parameter_source(p.name) in given}


def main() -> None:
    """Console entry point: exit codes 0 ok, 1 data error, 2 usage error, 130 interrupted."""
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as exc:  # click's own usage errors, printed in cmrfed's style
        where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message() + where)}", highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
