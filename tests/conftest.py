"""Shared fixtures: one small synthetic cohort, prepared once per test session; and the test tiers.

Built with the real stages (synth -> prepare) in the real on-disk layouts; small shapes keep the
whole suite fast on two CPU cores.

Tiers: a test that uses a generated cohort (any fixture in :data:`GENERATED`, directly or through
another fixture) or runs over Flower is marked ``e2e`` here, so the fast tier
(``pytest -m "not e2e"``) is what is left; a test that starts a subprocess says
``@pytest.mark.e2e`` itself. Every ``e2e`` test gets the longer :data:`E2E_TIMEOUT_S` unless it
names its own ``timeout``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from cmrfed import paths
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth import write_synthetic_cohort
from cmrfed.study.cells import worker_threads
from cmrfed.study.config import load_study
from cmrfed.study.runner import StudyResult, run_study

DATA = Path(__file__).parent / "data"
SMALL_SHAPE = (32, 32, 4)
SMALL_SPACING = (4.0, 4.0, 10.0)


GENERATED = frozenset({
    "small_prepared",  # this file: the shared cohort, synthesised and prepared
    "prep_synth",  # tests/test_prepare.py: a synthetic cohort for prepare
    "cohort",  # tests/test_synth.py: the default cohort
    "flower_cohort",  # this file: the Flower tests' cohort
    "flower_recipe",  # tests/test_robustness.py: the Flower recipe's cohort, prepared
})
"""Fixtures that build a generated cohort: every test using one is end to end."""

E2E_TIMEOUT_S = 900
"""Per-test limit of an ``e2e`` test (the fast tier's is ``timeout`` in pyproject.toml): a study
killed and resumed seven times takes minutes on two busy cores; a hang still fails."""


SHARED_FIXTURE_GROUPS = {
    # Every Flower test mostly waits: on Flower's heartbeat (a SuperNode is found dead ~60 s after
    # it dies), on SuperLinks and SuperNodes starting, on a ClientApp process per message. One
    # worker waits through all of them in turn while the other two keep both cores busy; two
    # workers waiting at once left a core idle (measured: 157 % of 2 cores over the whole run).
    "test_flower.py": "flower",
    "test_flower_run.py": "flower",  # ``runs``: a Flower run, killed and resumed
    "test_flower_tls.py": "flower",
    "test_evaluate_site.py": "evaluate-site",  # ``runs``
    "test_compare.py": "compare",  # ``runs``
    "test_study.py": "toy-study",  # ``toy_study`` (this file): a study of every method
    "test_report_browser.py": "toy-study",
    "test_synth.py": "synth",  # ``cohort``
    "test_adapt.py": "adapt",  # ``without_new_site``, ``holdout_runs``
    "test_privacy.py": "privacy",  # ``dp_run``, ``pretrained_cohort``
    "test_study_participation.py": "participation",  # ``gap_study``
    "test_pretrain.py": "pretrain",  # ``reference``
    "test_robustness.py": "robustness",  # ``finished_run``, ``flower_recipe``
    "test_evaluate.py": "evaluate",  # ``finished_run``
}
"""Test modules whose session fixtures cost a run or a study, by the pytest-xdist work unit their
tests share: a unit runs on one worker, so each such fixture is built once (every other test is a
unit of its own). Session scope, not module scope: a worker that interleaves modules would tear a
module fixture down and build it again."""

OWN_UNITS = frozenset({
    # builds its own study of every method and kills it seven times: no ``toy_study``
    "test_study.py::test_study_killed_at_every_point_resumes_to_the_uninterrupted_result",
})
"""Tests of a grouped module that use none of its costly fixtures and are long enough to be a work
unit of their own (``module::test``), so the rest of their module does not wait behind them."""

LONGEST_FIRST = (
    "flower", "toy-study", *sorted(OWN_UNITS), "privacy", "participation",
    "pretrain", "test_learning.py", "robustness", "test_demo.py", "evaluate-site", "adapt",
    # modules of many single-test units, by their tests' length
    "test_resume_matrix.py", "test_inspect.py", "test_engines.py", "test_federate.py",
    "test_cli_options.py", "test_sampling.py",
)
"""The longest work units (or modules of long single tests), longest first, as measured with
``pytest --durations=0``. Workers take units in this order, then the rest, largest first: the
longest-first rule, so the suite ends on short tests rather than on one worker still running a
long unit that started late."""


def _short_id(nodeid: str) -> tuple[str, str]:
    """(module file name, ``module::test`` without parameters) of a node id."""
    path, _, test = nodeid.partition("::")
    module = Path(path).name
    return module, f"{module}::{test.split('[', 1)[0]}"


def work_unit(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: its module's group (unless it is one of
    :data:`OWN_UNITS`), else the test itself."""
    module, short = _short_id(nodeid)
    if short in OWN_UNITS:
        return nodeid
    return SHARED_FIXTURE_GROUPS.get(module, nodeid)


def _unit_rank(unit: str, nodeid: str) -> int:
    names = (unit, *_short_id(nodeid))
    for rank, name in enumerate(LONGEST_FIRST):
        if name in names:
            return rank
    return len(LONGEST_FIRST)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Schedule tests one by one, except the modules of :data:`SHARED_FIXTURE_GROUPS`: pytest-xdist's
    own ``--dist loadgroup`` no longer groups under pytest 9 (it renames ``item._nodeid``, which
    pytest 9 no longer reads), so the grouping is done here, from the node ids. Units are handed
    out in collection order, which :func:`order_longest_first` has set."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the order set at collection

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SharedFixtureScheduling(config, log)


def order_longest_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` by work unit: :data:`LONGEST_FIRST`, then the other units by their number
    of tests (xdist's own rule), each unit's tests together and in their collected order."""
    modules = {_short_id(item.nodeid)[0] for item in items}
    shorts = {_short_id(item.nodeid)[1] for item in items}
    stale = sorted(name for name in OWN_UNITS if name.split("::")[0] in modules and name not in shorts)
    if stale:
        raise pytest.UsageError(f"OWN_UNITS in tests/conftest.py names tests that do not exist: {stale}")
    unit_of = [work_unit(item.nodeid) for item in items]
    members: dict[str, list[int]] = {}
    for index, unit in enumerate(unit_of):
        members.setdefault(unit, []).append(index)

    def key(index: int) -> tuple[int, int, int, int]:
        unit = unit_of[index]
        return _unit_rank(unit, items[index].nodeid), -len(members[unit]), members[unit][0], index

    items[:] = [items[i] for i in sorted(range(len(items)), key=key)]


if os.environ.get("PYTEST_XDIST_WORKER"):  # several test workers share the cores: one thread each,
    torch.set_num_threads(1)  # and the same in the subprocesses they start (bitwise comparisons)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if GENERATED & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("flower"):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
    order_longest_first(items)


def quiet_console() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder (4 vendor clients, both labels in every split) at 32 x 32 x 4."""
    root = tmp_path_factory.mktemp("cohort")
    write_synthetic_cohort(root / "raw", seed=3, subjects=21, shape=(48, 48, 6), frames=8)
    prepare(
        PrepareOptions(
            out=root / "prepared", acdc=root / "raw" / "acdc", mnms=root / "raw" / "mnms",
            mnms2=root / "raw" / "mnms2", spacing=SMALL_SPACING, shape=SMALL_SHAPE, seed=0,
        ),
        console=quiet_console(),
    )
    return root / "prepared"


@pytest.fixture(scope="session")
def flower_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder of two vendor sites (M&Ms-2, 8 subjects) at 32 x 32 x 4 for Flower runs."""
    root = tmp_path_factory.mktemp("flower-cohort")
    write_synthetic_cohort(root / "raw", seed=0, subjects=8, shape=SMALL_SHAPE)
    prepare(PrepareOptions(out=root / "prepared", mnms2=root / "raw" / "mnms2", spacing=SMALL_SPACING,
                           shape=SMALL_SHAPE), console=quiet_console())
    return root / "prepared"


def key_table(name: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a CineMA weights file (tests/data/cinema_*_keys.json)."""
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def write_random_checkpoint(path: Path, table: dict[str, list[int]], seed: int) -> Path:
    """Random tensors under CineMA's real names and shapes, as a safetensors file."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.rand(shape, generator=generator) for name, shape in table.items()}
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def pretrained_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in the layout of CineMA's public 4-view ``pretrained/cinema.safetensors``."""
    path = tmp_path_factory.mktemp("ckpt") / "cinema.safetensors"
    return write_random_checkpoint(path, key_table("cinema_pretrained_keys.json"), seed=1)


@pytest.fixture(scope="session")
def finetuned_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in the layout of a SAX classifier fine-tuned by CineMA's own code."""
    path = tmp_path_factory.mktemp("ckpt") / "finetuned_sax.safetensors"
    return write_random_checkpoint(path, key_table("cinema_finetuned_sax_keys.json"), seed=2)


# --- one proof that two runs are the same (resume, kills) ---------------------------------------


def tensor_files(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every finished tensor file under a RUN (or a STUDY's runs), by path relative to ``root``:
    final, best and private; no checkpoint, no temporary."""
    files = sorted(p for p in root.rglob("*.safetensors")
                   if "checkpoint" not in p.relative_to(root).parts and ".tmp-" not in str(p))
    return {str(p.relative_to(root)): load_file(str(p)) for p in files}


def assert_same_tensors(reference: Path, other: Path) -> None:
    """The two folders hold the same tensor files, each with the same names and the same bits."""
    expected, got = tensor_files(reference), tensor_files(other)
    assert expected and expected.keys() == got.keys()
    for name, tensors in expected.items():
        assert tensors.keys() == got[name].keys(), name
        for key, tensor in tensors.items():
            assert torch.equal(tensor, got[name][key]), (name, key)


def rounds_without_time(run: Path) -> list[dict]:
    """The run's rounds.jsonl records without the wall time (the one field a resume may change)."""
    lines = paths.rounds_log_path(run).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]


# --- a study at toy size, shared by the study and report tests ---------------------------------


def study_text(prepared: Path, methods=("duallora", "fedlora", "ffalora"), blocks="[1, 2]",
               seeds="[0, 1]", rounds: int = 2, tail: str = '[report]\ntitle = "toy study"\n') -> str:
    """A toy study file: tiny backbone, rank 2, ``rounds`` rounds of one local epoch; ``tail`` holds
    the sections after [evaluate]."""
    return f"""
[data]
prepared = "{prepared}"
[federate]
backbone = "tiny"
rounds = {rounds}
local-epochs = 1
batch-size = 8
device = "cpu"
[grid]
methods = {json.dumps(list(methods))}
seeds = {seeds}
blocks = {blocks}
ranks = [2]
[evaluate]
n-boot = 50
{tail}"""


@pytest.fixture(scope="session")
def toy_study(small_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StudyResult]:
    """A study at toy size (3 methods x 2 seeds x 2 block settings), run once: its files and result.
    Serially, with the threads a worker of ``--jobs 2`` gets (same reductions, same bits: the
    ``--jobs 2`` tests of test_study.py compare against it)."""
    root = tmp_path_factory.mktemp("study")
    file = root / "toy.toml"
    file.write_text(study_text(small_prepared), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(2))
    try:
        result = run_study(load_study(file), root / "out", console=quiet_console())
    finally:
        torch.set_num_threads(threads)
    return file, result


SITE = "canon"
"""The site a participation study holds out."""


def participation_text(prepared: Path, holdout: str = SITE, seeds: str = "[0, 1]",
                       methods: tuple[str, ...] = ("duallora", "fedlora")) -> str:
    return study_text(prepared, methods, blocks="[1]", seeds=seeds,
                      tail=f'[participation]\nholdout = ["{holdout}"]\n[adapt]\nepochs = 2\n')
