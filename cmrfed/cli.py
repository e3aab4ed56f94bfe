"""The ``cmrfed`` command line: each subcommand only parses options and calls one stage function.

Errors a user can cause are :class:`cmrfed.errors.CmrfedError`; they are printed on one line
without a traceback, with exit code 2 for usage errors and 1 for data errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from cmrfed import __version__
from cmrfed import options as declared
from cmrfed.errors import CmrfedError, UsageError, from_os_error
from cmrfed.validate import ValidatedCommand

err_console = Console(stderr=True)


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


@cli.command(params=[*declared.SYNTH])
def synth(out: str, seed: int, subjects: int, shape: str, frames: int | None, appearance: float,
          label_shift: float, concept_shift: float, site: str | None, overwrite: bool) -> None:
    """Write a synthetic multi-vendor cine CMR cohort in the ACDC / M&Ms-1 / M&Ms-2 layouts, or
    (--site) one hospital site as a CSV plus DICOM series."""
    from cmrfed.data.synth import Heterogeneity, cohort_table, write_synthetic_cohort
    from cmrfed.errors import UsageError

    triple = declared.int_triple(shape, "--shape")
    dial = Heterogeneity(appearance, label_shift, concept_shift)
    if site is not None:
        if dial != Heterogeneity():
            raise UsageError("--appearance, --label-shift and --concept-shift set how the vendor sites "
                             "of the multi-vendor cohort differ; --site writes one hospital: drop one "
                             "or the other")
        from cmrfed.data.synth_site import site_table, write_synthetic_site

        written = write_synthetic_site(out, site, seed=seed, subjects=subjects, shape=triple, frames=frames,
                                       overwrite=overwrite)
        Console().print(site_table(Path(out), site, written))
        return
    summary = write_synthetic_cohort(out, seed=seed, subjects=subjects, shape=triple, frames=frames,
                                     overwrite=overwrite, dial=dial)
    Console().print(cohort_table(summary))


@cli.command(params=[*declared.PREPARE])
def prepare(acdc: str | None, mnms: str | None, mnms2: str | None, csv: tuple[str, ...], out: str,
            spacing: str, shape: str, split: str, seed: int, workers: int, skip_invalid: bool,
            overwrite: bool, tables: str | None) -> None:
    """Read ACDC / M&Ms-1 / M&Ms-2 as downloaded, and sites listed in CSVs, into per-client HDF5
    shards + manifest.json."""

    from cmrfed.data.prepare import prepare as run_prepare

    run_prepare(declared.prepare_options(dict(
        out=out, acdc=acdc, mnms=mnms, mnms2=mnms2, csv=csv, spacing=spacing, shape=shape, split=split,
        seed=seed, workers=workers, skip_invalid=skip_invalid, overwrite=overwrite, tables=tables,
    )))


@cli.command(params=[*declared.FEDERATE])
def federate(**options: object) -> None:
    """Federated LoRA fine-tuning, every vendor a client, in this process."""
    from cmrfed.fed.config import FederateConfig
    from cmrfed.fed.inprocess import federate as run_federate

    device, out = options.pop("device"), options.pop("out")
    resume, overwrite = options.pop("resume"), options.pop("overwrite")
    values = declared.federate_options(options)
    if resume:
        from cmrfed.fed.runlog import resume_options

        values = resume_options(Path(str(out)), bool(overwrite), values,
                                typed=_typed(click.get_current_context()))
    elif values["data"] is None:
        FederateConfig(**{**values, "data": ""})  # other bad options are reported first
        raise UsageError("federate needs --data PREPARED (the folder written by `cmrfed prepare`)")
    run_federate(FederateConfig(**values), out, device=device, resume=resume, overwrite=overwrite)


@cli.command(params=[*declared.EVALUATE])
def evaluate(run: str, site_evals: tuple[str, ...], split: str, which: str, threshold: str, n_boot: int,
             client: str | None, private: str | None, data: str | None, out: str | None,
             metrics_only: bool, merge: bool, member_run: str | None, precision: str | None,
             device: str) -> None:
    """Per-client, pooled, macro and cross-site metrics of a finished RUN.

    Site by site, with nothing pooled: each site runs `evaluate RUN --client SITE --private DIR
    --data PREPARED`, then `evaluate RUN --merge SITE_EVAL...` writes RUN/eval/.
    """
    from cmrfed.eval.evaluate_site import check_evaluate_modes

    mode = check_evaluate_modes(site_evals, client=client, private=private, data=data, out=out,
                                metrics_only=metrics_only, merge=merge, member_run=member_run)
    if mode == "merge":
        from cmrfed.eval.evaluate_site import merge_evaluations

        merge_evaluations(run, list(site_evals), member_run=member_run)
    elif mode == "site":
        from cmrfed.eval.evaluate_site import evaluate_site

        evaluate_site(run, str(client), str(data), private=private, out=out, split=split, which=which,
                      threshold=threshold, n_boot=n_boot, metrics_only=metrics_only, device=device,
                      precision=precision)
    else:
        from cmrfed.eval.evaluate_run import evaluate_run

        evaluate_run(run, split=split, which=which, threshold=threshold, n_boot=n_boot, device=device,
                     data=data, precision=precision)


@cli.command(params=[*declared.ADAPT])
def adapt(run: str, client: str, data: str, out: str, epochs: int, lr: float | None, which: str,
          overwrite: bool, precision: str | None, device: str) -> None:
    """A site that joins after training: train only its own local adapter over RUN's frozen
    shared tensors (DualLoRA's local LoRA; see the method table for the others)."""
    from cmrfed.fed.adapt import adapt as run_adapt

    run_adapt(run, client, data, out, which=which, epochs=epochs, lr=lr, device=device,
              overwrite=overwrite, precision=precision)


@cli.command(params=[*declared.COMPARE])
def compare(runs: tuple[str, ...], test: str, reference: str, metric: str, out: str,
            overwrite: bool) -> None:
    """Paired significance tests of evaluated RUNs against a reference method, and a report."""
    from cmrfed.eval.report import compare_runs

    compare_runs(list(runs), test, reference=reference, metric=metric, out=out, overwrite=overwrite)


@cli.command(params=[*declared.PRETRAIN])
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


@flower.command("site-config", params=[*declared.FLOWER_SITE_CONFIG])
def flower_site_config(client: str, data: str, site_dir: str, device: str) -> None:
    """Check this site's shard and print the --node-config of its flower-supernode."""

    from cmrfed.fed.flower_config import site_node_config

    click.echo(site_node_config(client, Path(data), Path(site_dir), device))


@flower.command("run", params=[*declared.FLOWER_RUN])
def flower_run(**options: object) -> None:
    """Submit a federated run to a SuperLink and stream its log (same options as `federate`)."""

    from cmrfed.fed.config import FederateConfig
    from cmrfed.fed.flower_launch import run_flower

    launch = {k: options.pop(k) for k in ("superlink", "connection", "insecure", "sites", "overwrite",
                                          "min_sites", "resume")}
    certificates, node_timeout, out = (options.pop(k) for k in ("root_certificates", "node_timeout", "out"))
    config = FederateConfig(**declared.federate_options(options))  # type: ignore[arg-type]
    run_flower(config, Path(str(out)), root_certificates=Path(str(certificates)) if certificates else None,
               node_timeout_s=float(node_timeout), typed=frozenset(_typed(click.get_current_context())),
               **launch)  # type: ignore[arg-type]


@cli.command(params=[*declared.DEMO])
def demo(out: str, overwrite: bool, resume: bool, dp_epsilon: float | None, jobs: int) -> None:
    """The whole pipeline on a synthetic cohort: synth, then the built-in demo study (prepare,
    federate duallora, fedlora, ffalora x 5 seeds x blocks on the pretrained tiny backbone,
    evaluate, GE's participation gap, compare, report)."""
    from cmrfed.demo import dp_demo_text, run_demo
    from cmrfed.templates import template_text

    text = None if dp_epsilon is None else dp_demo_text(template_text("demo"), dp_epsilon)
    run_demo(out, study_text=text, overwrite=overwrite, resume=resume, jobs=jobs)


@cli.command(params=[*declared.STUDY])
def study(study_file: str | None, out: str | None, resume: bool, overwrite: bool, device: str | None,
          jobs: int, devices: str | None, template: str | None) -> None:
    """Run a declared grid of federated runs (methods x seeds x blocks x ranks), evaluate and
    compare them, and write STUDY/report/ (tables, figures, report.html). Resumable."""
    from cmrfed.errors import UsageError
    from cmrfed.templates import template_text

    if template is not None:
        click.echo(template_text(template), nl=False)
        return
    if study_file is None or out is None:
        raise UsageError("give a study file and --out STUDY (write an example with "
                         "`cmrfed study --template`)")
    from cmrfed.study.config import load_study
    from cmrfed.study.runner import run_study

    run_study(load_study(study_file), out, resume=resume, overwrite=overwrite, device=device, jobs=jobs,
              devices=devices)


@cli.command(params=[*declared.INSPECT])
def inspect(prepared: str, backbone: str, out: str | None, seed: int, device: str, overwrite: bool) -> None:
    """How non-IID a consortium is, before anyone trains: per site the label mix and its divergence
    from the pooled mix, intensity distances, site identifiability from frozen backbone features and
    the site-to-site transfer of a linear probe. Writes inspect.json, inspect.md and inspect.png."""
    from pathlib import Path

    from cmrfed import paths
    from cmrfed.eval.consortium import inspect_consortium, inspect_table

    target = Path(out) if out is not None else paths.inspect_dir(Path(prepared))
    doc = inspect_consortium(prepared, target, backbone=backbone, seed=seed, device=device,
                             overwrite=overwrite)
    Console().print(inspect_table(doc))
    Console().print(f"written: {target}", highlight=False)


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
