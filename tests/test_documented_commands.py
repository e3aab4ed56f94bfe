"""Every `cmrfed` command the README and the docs pages show is accepted as written.

Each command line of a shell code block (a fence with no language, or bash / sh / shell / console)
is extracted with its backslash continuation lines, and then parsed by click and checked by
cmrfed's up-front validation (:func:`cmrfed.validate.validate`), exactly as `cmrfed` would
before running it, but the stage itself is not run. The paths a command names are created first,
as empty placeholders in a temporary folder (a file where the name has a file suffix, else a
folder), so a command that needs real data passes when its paths exist. A block that is a
deliberate example of an error is marked by ``<!-- error-example -->`` on the line before its
fence, and only such blocks are left out. A command documented for a GPU (``--device cuda``) is
checked as on a machine with one.

In the fast tier: no subprocess, nothing computed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import torch

from cmrfed.cli import cli
from cmrfed.errors import CmrfedError
from cmrfed.validate import OUTPUTS, ValidatedCommand, is_path, validate

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = frozenset({"", "bash", "sh", "shell", "console"})
ERROR_EXAMPLE = "<!-- error-example -->"
FILE_SUFFIXES = frozenset({".safetensors", ".toml", ".csv", ".json", ".pem", ".crt", ".key", ".h5"})
OPERATORS = re.compile(r"^[();<>|&]+$")
SHELL_PREFIXES = frozenset({"do", "then", "else", "time", "nice", "exec", "!"})


@dataclass(frozen=True)
class Documented:
    """One `cmrfed` command as a page shows it: where, and its arguments after `cmrfed`."""

    page: str
    line: int
    args: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line} cmrfed {' '.join(self.args)}"[:120]


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every shell code block not marked as an error example."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", lines[index])
        if not fence:
            index += 1
            continue
        marker, language = fence.group(1), fence.group(2).lower()
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip().startswith(marker)),
                   len(lines))
        if language in SHELL_LANGUAGES and previous != ERROR_EXAMPLE:
            blocks.append((index + 2, "\n".join(lines[index + 1:end])))
        index = end + 1
    return blocks


def _logical_lines(body: str, first: int) -> list[tuple[int, str]]:
    """Lines with their backslash continuations joined, each with the number of its first line."""
    joined, start, current = [], first, ""
    for number, line in enumerate(body.splitlines(), first):
        if not current:
            start = number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append((start, current + line))
        current = ""
    if current:
        joined.append((start, current))
    return joined


def _bindings(body: str) -> dict[str, str]:
    """Loop variables of the block (`for site in a b c; do`), each bound to its first value."""
    return {name: values.split()[0] for name, values in re.findall(r"\bfor (\w+) in ([^;\n]+);", body)
            if values.split()}


def _substitute(line: str, bindings: dict[str, str]) -> str:
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: bindings.get(m.group(1), "x"), line)
    return line.replace("*", "x")  # a glob stands for one match, created like any other path


def _simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if OPERATORS.match(token):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _cmrfed_args(words: list[str]) -> tuple[str, ...] | None:
    """The arguments after `cmrfed` when ``words`` is a cmrfed command (after any VAR=value)."""
    while words and (re.match(r"^\w+=", words[0]) or words[0] in SHELL_PREFIXES):
        words = words[1:]
    if words and (words[0] == "cmrfed" or words[0].endswith("/cmrfed")):
        return tuple(words[1:])
    return None


def extract_commands(text: str, page: str) -> list[Documented]:
    """Every `cmrfed ...` command of the page's shell blocks, as the shell would split it."""
    found = []
    for first, body in shell_blocks(text):
        bindings = _bindings(body)
        for number, line in _logical_lines(body, first):
            inner = re.findall(r"\$\(([^()]*)\)", line)  # $(cmrfed ...) runs too
            for piece in [re.sub(r"\$\(([^()]*)\)", "x", line), *inner]:
                for words in _simple_commands(_substitute(piece, bindings)):
                    args = _cmrfed_args(words)
                    if args is not None:
                        found.append(Documented(page, number, args))
    return found


DOCUMENTED = [command for page in PAGES for command in
              extract_commands(page.read_text(encoding="utf-8"), page.relative_to(REPO).as_posix())]


def _inside(value: str) -> str:
    """An absolute or home path of the docs, moved under the temporary folder."""
    return value.replace("~/", "home/", 1).lstrip("/") if value.startswith(("/", "~/")) else value


def _leaf(args: tuple[str, ...]) -> tuple[click.Command, click.Context, list[str]]:
    """The leaf command the arguments name, its parent context and its own arguments."""
    command: click.Command = cli
    ctx = click.Context(cli, info_name="cmrfed")
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"`cmrfed {' '.join(args)}` names no command"
        name = rest.pop(0)
        sub = command.get_command(ctx, name)
        assert sub is not None, f"`cmrfed {' '.join(args)}`: no command {name!r}"
        command, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    return command, ctx.parent or ctx, rest


def _placeholder(path: Path, file: bool) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if file:
        path.touch()
    else:
        path.mkdir()


def _create_inputs(ctx: click.Context) -> None:
    """Every path the command reads, as an empty file or folder (outputs are left to create)."""
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        values = list(value) if isinstance(value, tuple | list) else [value]
        for item in (str(v) for v in values if v not in (None, "")):
            looks_like_file = Path(item).suffix in FILE_SUFFIXES
            if is_path(param) and param.name not in OUTPUTS:
                _placeholder(Path(item), looks_like_file)
            elif not is_path(param) and looks_like_file and not item.startswith("hf://"):
                _placeholder(Path(item), True)  # a file named in a text option (--backbone, --init)


def check_documented(args: tuple[str, ...]) -> None:
    """Click's parsing, then cmrfed's validation, of ``cmrfed ARGS`` in the current folder."""
    args = tuple(_inside(a) for a in args)
    command, parent, rest = _leaf(args)
    assert isinstance(command, ValidatedCommand), f"{command.name} is not validated up front"
    ctx = command.make_context(command.name, list(rest), parent=parent)
    _create_inputs(ctx)
    validate(ctx)


def test_the_pages_document_commands() -> None:
    pages = {c.page for c in DOCUMENTED}
    assert "README.md" in pages
    assert len(DOCUMENTED) >= 20, [c.id for c in DOCUMENTED]
    assert {a[0] for c in DOCUMENTED for a in [c.args] if a} >= {
        "synth", "prepare", "federate", "evaluate", "adapt", "compare", "study", "pretrain", "demo", "flower"}


@pytest.mark.parametrize("command", DOCUMENTED, ids=[c.id for c in DOCUMENTED])
def test_documented_command_is_accepted(command: Documented, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if "cuda" in command.args and not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # documented for a GPU machine
    try:
        check_documented(command.args)
    except (click.ClickException, CmrfedError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        pytest.fail(f"{command.page}:{command.line}: `cmrfed {' '.join(command.args)}` is refused: {message}")


SAMPLE = """\
Some text.

```bash
# a comment
cmrfed synth --out cohort \\
    --subjects 8   # trailing comment
for site in siemens philips; do
  node="$(cmrfed flower site-config --client "$site" --data prepared --site-dir "sites/$site")"
  FLWR_HOME=x flower-supernode --node-config "$node" &
done
python3 -m venv .venv && .venv/bin/cmrfed demo --out d --overwrite
cmrfed evaluate run --merge sent/* > log.txt
docker build -t cmrfed .
```

```toml
# cmrfed study not-a-command.toml
```

<!-- error-example -->
```
cmrfed federate --backbone huge --out x
```
"""


def test_extraction_follows_the_shell() -> None:
    found = [(c.line, c.args) for c in extract_commands(SAMPLE, "sample.md")]
    assert found == [
        (5, ("synth", "--out", "cohort", "--subjects", "8")),
        (8, ("flower", "site-config", "--client", "siemens", "--data", "prepared", "--site-dir",
             "sites/siemens")),
        (11, ("demo", "--out", "d", "--overwrite")),
        (12, ("evaluate", "run", "--merge", "sent/x")),
    ]


def test_a_refused_command_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: a bad choice, a bad backbone and a missing option are refused."""
    monkeypatch.chdir(tmp_path)
    for args in (("federate", "--data", "p", "--method", "fedprox", "--out", "r"),
                 ("federate", "--data", "p", "--backbone", "huge", "--out", "r"),
                 ("compare", "r1", "--out", "rep")):
        with pytest.raises((click.ClickException, CmrfedError)):
            check_documented(args)
