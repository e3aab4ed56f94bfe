"""The ``cmrfed`` command line: each subcommand only parses options and calls one stage function.

Errors a user can cause are :class:`cmrfed.errors.CmrfedError`; they are printed on one line
without a traceback, with exit code 2 for usage errors and 1 for data errors.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

from cmrfed import __version__
from cmrfed.errors import CmrfedError

err_console = Console(stderr=True)


def _int_triple(text: str, option: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{option} takes three integers like 192,192,16") from exc
    if len(values) != 3 or min(values) <= 0:
        raise click.BadParameter(f"{option} takes three positive integers like 192,192,16")
    return values  # type: ignore[return-value]


def _float_triple(text: str, option: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{option} takes three numbers like 1,1,10") from exc
    if len(values) != 3 or min(values) <= 0:
        raise click.BadParameter(f"{option} takes three positive numbers like 1,1,10")
    return values  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cmrfed")
def cli() -> None:
    """Federated, parameter-efficient fine-tuning of the CineMA cine CMR foundation model.

    Stages: synth -> prepare -> federate -> evaluate -> compare; `cmrfed demo` runs them all.
    """


# --- commands (one block each) -------------------------------------------------------------


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
@click.option("--lr", default=1e-3, show_default=True, type=float)
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
    options["targets"] = tuple(t.strip() for t in str(options["targets"]).split(",") if t.strip())
    config = FederateConfig(**options)  # type: ignore[arg-type]
    run_federate(config, out, device=device, resume=resume, overwrite=overwrite)


@cli.command()
@click.argument("run", type=click.Path(path_type=str))
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]))
@click.option("--round", "which", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The best round by mean client val balanced accuracy, or the last.")
@click.option("--threshold", default="0.5", show_default=True, type=click.Choice(["0.5", "youden-val"]),
              help="Fixed 0.5, or each model's Youden threshold on its val split.")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap replicates for CIs.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def evaluate(run: str, split: str, which: str, threshold: str, n_boot: int, device: str) -> None:
    """Per-client, pooled, macro and cross-site metrics of a finished RUN."""
    from cmrfed.eval.evaluate import evaluate_run

    evaluate_run(run, split=split, which=which, threshold=threshold, n_boot=n_boot, device=device)


# --- end of commands -----------------------------------------------------------------------


def main() -> None:
    """Console entry point: run the click group, turning CmrfedError into a one-line message."""
    try:
        cli.main(standalone_mode=False)
    except CmrfedError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
