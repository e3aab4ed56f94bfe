"""Every option of every command checked before the command writes anything.

The checks are generated from the click command tree, not written per command: each parameter
is checked by its click type and name, so an option added later is covered the day it is added.

- numbers (``int`` / ``float``): finite (``nan`` and ``inf`` are refused) and at least the
  minimum :data:`MINIMA` gives by name; any other number must be non-negative;
- ``--device cuda`` (any parameter named ``device``) needs a CUDA device;
- paths (``click.Path``): an output (:data:`OUTPUTS`) must be creatable and writable with a
  writable parent (it is locked and swapped there); a folder a command writes into
  (:data:`WRITTEN_INTO`) must exist and be writable; any other path is an input and must exist;
- a command under a group listed in :data:`EXTRAS` needs that optional extra installed;
- a few text options whose values come from a table are checked by name (:data:`NAMED`).

Choices and malformed numbers are click's own checks. Every failure is a
:class:`~cmrfed.errors.UsageError` (exit code 2) naming the option.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cmrfed.errors import UsageError


@dataclass(frozen=True)
class Minimum:
    value: float
    inclusive: bool = True

    def allows(self, number: float) -> bool:
        return number >= self.value if self.inclusive else number > self.value

    def text(self) -> str:
        return f"at least {self.value:g}" if self.inclusive else f"greater than {self.value:g}"


NON_NEGATIVE = Minimum(0)
POSITIVE = Minimum(0, inclusive=False)
AT_LEAST_ONE = Minimum(1)

MINIMA: dict[str, Minimum] = {
    # counts
    "rank": AT_LEAST_ONE, "local_rank": AT_LEAST_ONE, "rounds": AT_LEAST_ONE,
    "local_epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "subjects": AT_LEAST_ONE,
    "workers": AT_LEAST_ONE, "sites": AT_LEAST_ONE, "n_boot": AT_LEAST_ONE, "frames": AT_LEAST_ONE,
    "sites_per_round": AT_LEAST_ONE, "min_sites": AT_LEAST_ONE, "epochs": AT_LEAST_ONE,
    # rates and scales
    "lr": POSITIVE, "alpha": POSITIVE, "local_alpha": POSITIVE, "node_timeout": POSITIVE,
    "layer_decay": POSITIVE,
    # a differential-privacy budget and clip are positive (0 would be no data at all)
    "dp_epsilon": POSITIVE, "dp_delta": POSITIVE, "dp_clip": POSITIVE,
}
"""Minimum of a numeric parameter, by parameter name; absent names must be non-negative."""

OUTPUTS = frozenset({"out", "site_dir"})
"""Path parameters a command creates (or replaces)."""

WRITTEN_INTO = frozenset({"run"})
"""Path parameters naming an existing folder the command writes into (``evaluate RUN``)."""

EXTRAS: dict[str, tuple[str, str]] = {"flower": ("flwr", "flower")}
"""Group name -> (module to import, extra to install) for every command under that group."""


def iter_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                     click.Command]]:
    """(path of names, command) of every leaf command under ``group``, depth first."""
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from iter_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def option_name(param: click.Parameter) -> str:
    """How the user writes ``param``: its longest flag, or its metavar for an argument."""
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return (param.name or "").upper()


def is_number(param: click.Parameter) -> bool:
    return isinstance(param.type, click.types.IntParamType | click.types.FloatParamType)


def is_path(param: click.Parameter) -> bool:
    return isinstance(param.type, click.Path)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, tuple | list) else [value]


def _check_number(param: click.Parameter, value: float) -> str | None:
    name = option_name(param)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} {value}: must be a finite number"
    minimum = MINIMA.get(param.name or "", NON_NEGATIVE)
    if not minimum.allows(value):
        return f"{name} {value}: must be {minimum.text()}"
    return None


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _check_path(param: click.Parameter, value: str) -> str | None:
    if value in ("", None):
        return None
    name, path = option_name(param), Path(value).expanduser()
    if param.name in OUTPUTS:
        if path.exists() and not path.is_dir():
            return f"{name} {value}: is a file, not a folder"
        where = _nearest_existing(path)
        if not where.is_dir():
            return f"{name} {value}: {where} is a file, not a folder"
        parent = _nearest_existing(path.absolute().parent)
        for folder in {where, parent}:
            if not _writable(folder):
                return f"{name} {value}: {folder} is read-only; choose a folder you can write"
        return None
    if not path.exists():
        helptext = f" ({param.help})" if isinstance(param, click.Option) and param.help else ""
        return f"{name} {value}: no such file or folder{helptext}"
    if param.name in WRITTEN_INTO and not _writable(path):
        return f"{name} {value}: is read-only; this command writes into it"
    return None


def _check_backbone(value: str) -> str | None:
    from cmrfed.model.cinema import HUB_SCHEME, SIZES

    if value in SIZES or value.startswith(HUB_SCHEME) or Path(value).expanduser().is_file():
        return None
    return (f"--backbone {value!r}: not a size ({', '.join(SIZES)}), a CineMA .safetensors file "
            "or hf://owner/repo/file")


def _check_method(value: str) -> str | None:
    from cmrfed.fed.methods import METHODS

    if value in METHODS:
        return None
    return f"--reference {value!r}: not a method; choose among {', '.join(METHODS)}"


def _check_site(value: str) -> str | None:
    from cmrfed.data.tables import CLIENT_NAME, CLIENT_NAME_RULE

    return None if CLIENT_NAME.fullmatch(value) else f"--site {value!r}: not {CLIENT_NAME_RULE}"


NAMED = {"backbone": _check_backbone, "reference": _check_method, "site": _check_site}
"""Text parameters checked by name: parameter name -> check of its value (message or None)."""


def _check_device(param: click.Parameter, value: str) -> str | None:
    if param.name != "device" or not str(value).startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"{option_name(param)} {value}: no CUDA device is available here; use --device cpu or auto"
    return None


def _check_extras(path: tuple[str, ...]) -> None:
    for group in path[:-1]:
        if group not in EXTRAS:
            continue
        module, extra = EXTRAS[group]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"`cmrfed {' '.join(path)}` needs the optional extra: "
                             f"pip install 'cmrfed[{extra}]' ({exc})") from None


def command_path(ctx: click.Context) -> tuple[str, ...]:
    """Names of the subcommands leading to ``ctx``'s command (without the program name)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return tuple(reversed(names))


def validate(ctx: click.Context) -> None:
    """Check every parameter of ``ctx``'s command; raise one UsageError naming every bad one."""
    _check_extras(command_path(ctx))
    problems = []
    for param in ctx.command.params:
        for value in _values(ctx.params.get(param.name or "")):
            problem = None
            if is_number(param):
                problem = _check_number(param, value)
            elif is_path(param):
                problem = _check_path(param, str(value))
            elif isinstance(param.type, click.Choice):
                problem = _check_device(param, value)
            elif param.name in NAMED:
                problem = NAMED[param.name](str(value))
            if problem:
                problems.append(problem)
    if problems:
        raise UsageError("; ".join(problems))


class ValidatedCommand(click.Command):
    """A command whose parameters are all checked (:func:`validate`) before it runs."""

    def invoke(self, ctx: click.Context) -> Any:
        validate(ctx)
        return super().invoke(ctx)
