"""The package's layering, read from its source with ``ast``: no import cycle between modules or
between packages, and every import points down the floors listed in ``FLOORS``: the ground
floor imports nothing above it, and the entry points (``cli``, ``demo``) are imported by
nothing in the library.

Every import counts, including one made inside a function (a cycle hidden that way is still a
cycle: it only moves the failure from import time to run time) and a module named in a string
for ``importlib`` (``"cmrfed.fed.methods:METHODS"``); imports under ``if TYPE_CHECKING:`` do not
run, so they do not count.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import cmrfed

ROOT = Path(cmrfed.__file__).resolve().parent

# Floors, lowest first. A module may import its own floor's modules (one way: the cycle checks
# forbid the other) and any floor below, never a floor above. Packages are one unit each.
FLOORS: tuple[tuple[str, ...], ...] = (
    # ground floor: plain helpers every stage uses; they import nothing above
    ("cmrfed", "cmrfed.errors", "cmrfed.paths", "cmrfed.atomic", "cmrfed.outputs", "cmrfed.lock",
     "cmrfed.seeding", "cmrfed.faults", "cmrfed.provenance", "cmrfed.formatting", "cmrfed.templates",
     "cmrfed.precision",  # the forward pass's precision: imports torch only
     "cmrfed.manifests"),  # the installed copy of data_manifests/ (setup.cfg package_dir)
    ("cmrfed.data", "cmrfed.model", "cmrfed.metrics"),  # readers, shards, synth; the network; metrics
    ("cmrfed.fed",),                                   # methods, client, strategy, the round loop
    ("cmrfed.eval", "cmrfed.pretrain"),                # evaluation library and commands; pretraining
    ("cmrfed.options", "cmrfed.validate"),             # every command's options, declared once
    ("cmrfed.study",),                                 # grid, runner, report: calls the stages
    ("cmrfed.cli", "cmrfed.demo"),                     # entry points: nothing imports them
)
ENTRY_POINTS = {"cmrfed.cli", "cmrfed.demo"}
PACKAGES = ("cmrfed.data", "cmrfed.model", "cmrfed.fed", "cmrfed.eval", "cmrfed.study")
STRING_REFERENCE = re.compile(r"^(\w+(?:\.\w+)+):\w+$")  # "module:attribute", for importlib


# --- reading the imports ----------------------------------------------------------------------


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom | ast.Constant]:
    """Every import statement and string reference, at any depth, except the body of
    ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from a import b`` is module ``a.b`` when that
    is a module, else ``a``). A string reference to a module that does not exist is kept as it
    is, so :func:`unresolved` can name it."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant):
                match = STRING_REFERENCE.match(node.value)
                if match and match[1].split(".")[0] == root.name:
                    targets.add(f"?{match[1]}")
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in files else base)
        graph[name] = {t.lstrip("?") if t.lstrip("?") in files else t for t in targets
                       if (t in files or t.startswith("?")) and t != name}
    return graph


def unresolved(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Module -> the modules it names in strings that do not exist (e.g. left behind by a move)."""
    return {m: sorted(t[1:] for t in ts if t.startswith("?")) for m, ts in graph.items()
            if any(t.startswith("?") for t in ts)}


def unit_of(module: str) -> str:
    """The package a module belongs to, or the module itself at the top level."""
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), module)


def collapse(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets)
    return {unit: targets - {unit} for unit, targets in units.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def floor_of(unit: str) -> int | None:
    return next((i for i, floor in enumerate(FLOORS) if unit in floor), None)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a floor above its own, as 'importer -> imported'."""
    wrong = []
    for module, targets in sorted(graph.items()):
        here = floor_of(unit_of(module))
        for target in sorted(targets):
            there = floor_of(unit_of(target))
            if here is not None and there is not None and there > here:
                wrong.append(f"{module} -> {target} (floor {here} imports floor {there})")
    return wrong


# --- the package ------------------------------------------------------------------------------

GRAPH = {m: {t for t in ts if not t.startswith("?")} for m, ts in import_graph(ROOT).items()}


def test_every_module_named_in_a_string_exists():
    assert unresolved(import_graph(ROOT)) == {}


def test_no_cycle_between_modules():
    assert cycles(GRAPH) == []


def test_no_cycle_between_packages():
    assert cycles(collapse(GRAPH)) == []


def test_every_module_has_a_floor():
    """A new top-level module or package must say where it sits (add it to FLOORS)."""
    assert sorted({unit_of(m) for m in GRAPH if floor_of(unit_of(m)) is None}) == []


def test_imports_point_down():
    assert upward_imports(GRAPH) == []


def test_entry_points_are_imported_by_nothing_in_the_library():
    importers = {m: sorted(t & ENTRY_POINTS) for m, t in GRAPH.items() if m not in ENTRY_POINTS}
    assert {m: t for m, t in importers.items() if t} == {}


def test_ground_floor_imports_only_the_ground_floor():
    ground = set(FLOORS[0])
    assert {m: sorted(t - ground) for m, t in GRAPH.items() if m in ground and t - ground} == {}


# --- the checker itself, on a planted package --------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    return _write(tmp_path / "pkg", {
        "__init__.py": "",
        "low.py": "def f():\n    from pkg.high import g  # hidden in a function: still a cycle\n",
        "high.py": "from pkg import low\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import g\n",
        "sub/__init__.py": "",
        "sub/a.py": "from . import b\nfrom ..low import f\n",
        "sub/b.py": "import pkg.typed\n",
        "named.py": "LAZY = 'pkg.high:g'\nGONE = 'pkg.moved:h'\n",
    })


def test_checker_sees_imports_inside_functions_and_relative_ones(planted):
    graph = import_graph(planted)
    assert graph["pkg.low"] == {"pkg.high"}
    assert graph["pkg.sub.a"] == {"pkg.sub.b", "pkg.low"}
    assert graph["pkg.sub.b"] == {"pkg.typed"}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]


def test_checker_sees_modules_named_in_strings(planted):
    graph = import_graph(planted)
    assert graph["pkg.named"] == {"pkg.high", "?pkg.moved"}
    assert unresolved(graph) == {"pkg.named": ["pkg.moved"]}


def test_checker_ignores_type_checking_imports(planted):
    assert import_graph(planted)["pkg.typed"] == set()


def test_checker_finds_a_cycle_between_packages_without_one_between_modules(tmp_path):
    root = _write(tmp_path / "cmrfed", {
        "__init__.py": "", "fed/__init__.py": "", "eval/__init__.py": "",
        "fed/x.py": "from cmrfed.eval import y\n", "fed/z.py": "",
        "eval/y.py": "", "eval/w.py": "from cmrfed.fed import z\n",
    })
    graph = import_graph(root)
    assert cycles(graph) == []
    assert cycles(collapse(graph)) == [["cmrfed.eval", "cmrfed.fed"]]
    assert upward_imports(graph) == ["cmrfed.fed.x -> cmrfed.eval.y (floor 2 imports floor 3)"]
