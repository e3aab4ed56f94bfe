"""Every option of every command, given a bad value, is one line of error (exit 2) naming the
option, and nothing is written.

The cases are generated from the click command tree (:func:`cmrfed.validate.iter_commands`):
a command or option added later is covered the day it is added. Numbers, choices and paths get
bad values from their click type; a text option needs an entry in :data:`BAD_TEXT` (or in
:data:`FREE_TEXT` when any text is valid), which a test below enforces.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from cmrfed.cli import cli
from cmrfed.validate import OUTPUTS, WRITTEN_INTO, ValidatedCommand, is_path, iter_commands, option_name

REPO = Path(__file__).resolve().parents[1]

BAD_TEXT: dict[str, list[str]] = {
    "shape": ["1,2", "0,32,4", "a,b,c"],
    "spacing": ["nan,1,10", "0,1,10", "1,1"],
    "split": ["0.5,0.5", "0.5,0.6,-0.1", "x"],
    "blocks": ["0", "some"],
    "targets": ["", "q,nope"],
    "backbone": ["huge"],
    "reference": ["fedprox"],
    "site": ["Hospital A", "1st"],
}
"""Bad values of text options, by parameter name."""

FREE_TEXT = frozenset({"client", "holdout", "init", "superlink", "connection"})
"""Text options any value of which is well-formed (they are checked against data or a server)."""

COMMANDS = list(iter_commands(cli))


def _read_only_dir(root: Path) -> Path:
    folder = root / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    return folder


def bad_values(param: click.Parameter) -> list[str]:
    """Values of ``param`` that must be refused (``{ro}`` / ``{missing}`` are filled per test)."""
    kind = param.type
    if isinstance(kind, click.types.BoolParamType) or getattr(param, "is_flag", False):
        return []
    if isinstance(kind, click.types.FloatParamType):
        return ["nan", "inf", "-inf", "-1", "abc"]
    if isinstance(kind, click.types.IntParamType):
        return ["-1", "1.5", "abc"]
    if isinstance(kind, click.Choice):
        values = ["no-such-choice"]
        if "cuda" in kind.choices and not torch.cuda.is_available():
            values.append("cuda")
        return values
    if is_path(param):
        return ["{ro}"] if param.name in OUTPUTS | WRITTEN_INTO else ["{missing}"]
    return BAD_TEXT.get(param.name or "", [])


def _text_params() -> list[tuple[str, str]]:
    return [(" ".join(path), param.name or "") for path, command in COMMANDS for param in command.params
            if isinstance(param.type, click.types.StringParamType) and not is_path(param)]


CASES = [
    pytest.param(path, param.name, value, id=f"{' '.join(path)} {option_name(param)}={value or repr(value)}")
    for path, command in COMMANDS for param in command.params for value in bad_values(param)
]


def test_every_command_validates_its_options():
    assert COMMANDS, "no commands found"
    for path, command in COMMANDS:
        assert isinstance(command, ValidatedCommand), f"`cmrfed {' '.join(path)}` skips validation"


@pytest.mark.parametrize(("command", "name"), _text_params())
def test_every_text_option_has_bad_values_or_is_declared_free(command, name):
    assert name in BAD_TEXT or name in FREE_TEXT, (
        f"`cmrfed {command}` --{name}: add bad values to BAD_TEXT in tests/test_cli_options.py, or "
        "list it in FREE_TEXT if any text is valid")


def _filler(param: click.Parameter, root: Path) -> list[str]:
    """A valid-looking value for a required parameter (as command-line words)."""
    if is_path(param):
        value = str(root / "out") if param.name in OUTPUTS else str(root / "in")
    elif isinstance(param.type, click.Choice):
        value = str(param.type.choices[0])
    elif isinstance(param.type, click.types.IntParamType | click.types.FloatParamType):
        value = "1"
    else:
        value = "x"
    if isinstance(param, click.Argument):
        return [value]
    return [max(param.opts, key=len), value]


def _arguments(path: tuple[str, ...], bad_name: str, bad: str, root: Path) -> list[str]:
    command = dict(COMMANDS)[path]
    args = list(path)
    for param in command.params:
        if param.name == bad_name:
            args += [bad] if isinstance(param, click.Argument) else [max(param.opts, key=len), bad]
        elif param.required:
            args += _filler(param, root)
    return args


def _drop_file_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture()
def workspace():
    root = Path(tempfile.mkdtemp(prefix="cmrfed-options-"))
    (root / "in").mkdir()
    yield root
    for path in root.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(root)


@pytest.mark.parametrize(("path", "name", "value"), CASES)
def test_a_bad_value_of_any_option_is_a_one_line_usage_error(path, name, value, workspace):
    param = next(p for p in dict(COMMANDS)[path].params if p.name == name)
    read_only = value == "{ro}"
    if read_only:
        value = str(_read_only_dir(workspace) / "x") if param.name in OUTPUTS else str(
            _read_only_dir(workspace))
    elif value == "{missing}":
        value = str(workspace / "missing")
    args = _arguments(path, name, value, workspace)
    before = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    if read_only:
        # root ignores file modes: the child drops that power to meet a read-only folder
        extra = {"preexec_fn": _drop_file_capabilities} if os.geteuid() == 0 else {}
        run = subprocess.run([sys.executable, "-m", "cmrfed.cli", *args], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "COLUMNS": "300"}, timeout=120, **extra)
        code, text = run.returncode, run.stdout + run.stderr
    else:
        result = CliRunner().invoke(cli, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        code, text = result.exit_code, result.output
    assert code == 2, text
    assert "Traceback" not in text and "error" in text.lower(), text
    flag = option_name(param)
    assert flag in text or flag.strip("-") in text, (flag, text)
    assert sorted(p.relative_to(workspace) for p in workspace.rglob("*")) == before
