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
