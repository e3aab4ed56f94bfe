"""The ``cmrfed`` command line: each subcommand only parses options and calls one stage function.

Errors a user can cause are :class:`cmrfed.errors.CmrfedError`; they are printed on one line
without a traceback, with exit code 2 for usage errors and 1 for data errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from cmrfed import __version__
from cmrfed.errors import CmrfedError

err_console = Console(stderr=True)


def _triple(text: str, option: str, cast: type, example: str) -> tuple:
    """Three positive numbers given as ``a,b,c`` (shapes and spacings)."""
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{option} takes three numbers like {example}") from exc
    if len(values) != 3 or min(values) <= 0:
        raise click.BadParameter(f"{option} takes three positive numbers like {example}")
    return values


def _int_triple(text: str, option: str) -> tuple[int, int, int]:
    return _triple(text, option, int, "192,192,16")


def _float_triple(text: str, option: str) -> tuple[float, float, float]:
    return _triple(text, option, float, "1,1,10")


class _Group(click.Group):
    """Prints a CmrfedError on one line (no traceback) and exits with its code: 2 for usage
    errors, 1 for data errors; the same whether run as a console script or under a test runner."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CmrfedError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)


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

    from cmrfed.data.prepare import PrepareOptions, parse_split
    from cmrfed.data.prepare import prepare as run_prepare

    def as_path(text: str | None) -> Path | None:
        return Path(text) if text is not None else None

    run_prepare(PrepareOptions(
        out=Path(out), acdc=as_path(acdc), mnms=as_path(mnms), mnms2=as_path(mnms2),
        spacing=_float_triple(spacing, "--spacing"), shape=_int_triple(shape, "--shape"),
        split=parse_split(split), seed=seed, workers=workers, skip_invalid=skip_invalid,
        overwrite=overwrite, tables=as_path(tables),
    ))


@cli.command()
@click.option("--data", "data", required=True, type=click.Path(path_type=str),
              help="PREPARED folder written by `cmrfed prepare`.")
@click.option("--method", default="duallora", show_default=True,
              type=click.Choice(["duallora", "fedlora", "ffalora", "fedsa", "local", "central"]))
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
              help="tiny|small|base (seeded random init) or a CineMA safetensors file.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Cache the frozen trunk's features (used when fewer than all blocks are adapted).")
@click.option("--cache-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16"]))
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
    from cmrfed.fed.config import FederateConfig, parse_blocks
    from cmrfed.fed.inprocess import federate as run_federate

    device, out = options.pop("device"), options.pop("out")
    resume, overwrite = options.pop("resume"), options.pop("overwrite")
    options["blocks"] = parse_blocks(str(options["blocks"]))
    options["data"] = str(Path(str(options["data"])).resolve())
    options["targets"] = tuple(t.strip() for t in str(options["targets"]).split(",") if t.strip())
    config = FederateConfig(**options)  # type: ignore[arg-type]
    run_federate(config, out, device=device, resume=resume, overwrite=overwrite)


@cli.command()
@click.argument("run", type=click.Path(path_type=str))
@click.argument("site_evals", nargs=-1, type=click.Path(path_type=str))
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]))
@click.option("--round", "which", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The best round by mean client val balanced accuracy, or the last.")
@click.option("--threshold", default="0.5", show_default=True, type=click.Choice(["0.5", "youden-val"]),
              help="Fixed 0.5, or each model's Youden threshold on its val split.")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap replicates for CIs.")
@click.option("--client", default=None, help="Evaluate only this site, on its own data (needs --data).")
@click.option("--private", default=None, type=click.Path(path_type=str),
              help="With --client: the site's RUN-shaped folder of private tensors, or its ADAPTED folder.")
@click.option("--data", default=None, type=click.Path(path_type=str),
              help="With --client: the site's own PREPARED folder.")
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

        evaluate_run(run, split=split, which=which, threshold=threshold, n_boot=n_boot, device=device)


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
def demo(out: str, overwrite: bool) -> None:
    """The whole pipeline on a synthetic cohort: synth, prepare, federate (duallora, fedlora,
    ffalora x 5 seeds), evaluate, compare --test wilcoxon."""
    from cmrfed.demo import run_demo

    run_demo(out, overwrite=overwrite)


# --- end of commands -----------------------------------------------------------------------


def main() -> None:
    """Console entry point: exit codes 0 ok, 1 data error, 2 usage error, 130 interrupted."""
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
