"""Never destroy what a user has, never leave a traceback (one test group per case of the issue).

1. ``--overwrite`` replaces only a cmrfed artefact of its kind, and only once the new one is done.
2. Clients with empty test / val splits (the README's Flower recipe sizes) are reported, not crashed on.
3. One command at a time per output folder: a lock naming its holder; stale locks recovered.
4. Bad options, corrupt tensors, read-only folders, a missing extra: one line, exit 2 or 1.
5. Messages that say what is wrong and what to do.
6. Leftovers of killed processes cleaned; modes from the umask; strict JSON; ``--resume`` alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import participation_text, quiet_console

from cmrfed import paths
from cmrfed.cli import cli
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth import write_synthetic_cohort
from cmrfed.errors import UsageError
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.runlog import append_round, has_score, round_line

REPO = Path(__file__).resolve().parents[1]


def lock_path(folder: Path) -> Path:
    """Where a folder's lock lives (imported late: the tests of each case run on older code too)."""
    from cmrfed.lock import lock_path as where

    return where(folder)


def folder_lock(folder: Path):
    from cmrfed.lock import folder_lock as lock

    return lock(folder)
TINY = ["--method", "fedlora", "--rounds", "1", "--rank", "2", "--batch-size", "8", "--device", "cpu"]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code: int, *needles: str) -> None:
    """Exit ``code``, no traceback, and an error naming each of ``needles``."""
    text = result.output
    assert result.exit_code == code, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text and "error" in text.lower(), text
    for needle in needles:
        assert needle in text, (needle, text)


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="session")
def finished_run(small_prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = FederateConfig(data=str(small_prepared), method="fedlora", rounds=1, rank=2, seed=0)
    federate(cfg, out, device="cpu", console=quiet_console())
    return out


def copy_run(run: Path, where: Path) -> Path:
    target = where / run.name
    shutil.copytree(run, target)
    return target


# ------------------------------------------------------------------------------------- case 1


def test_demo_overwrite_refuses_a_folder_of_unrelated_files(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "results.csv").write_text("a,b\n1,2\n")
    before = snapshot(out)
    result = invoke(["demo", "--out", out, "--overwrite"])
    assert_one_line_error(result, 2, "not a demo folder", "thesis.tex", "results.csv")
    assert snapshot(out) == before


def test_every_overwrite_refuses_a_folder_it_did_not_make(small_prepared, finished_run, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    raw = tmp_path / "raw"
    write_synthetic_cohort(raw, seed=0, subjects=5, shape=(32, 32, 4))
    result = invoke(["synth", "--out", foreign, "--subjects", "5", "--overwrite"])
    assert_one_line_error(result, 2, "not a synthetic cohort", "notes.txt")
    result = invoke(["prepare", "--acdc", raw / "acdc", "--shape", "32,32,4", "--spacing", "4,4,10",
                     "--out", foreign, "--overwrite"])
    assert_one_line_error(result, 2, "not a PREPARED folder", "notes.txt")
    result = invoke(["federate", "--data", small_prepared, *TINY, "--out", foreign, "--overwrite"])
    assert_one_line_error(result, 2, "not a RUN folder", "notes.txt")
    result = invoke(["compare", finished_run, "--test", "wilcoxon", "--out", foreign, "--overwrite"])
    assert_one_line_error(result, 2, "not a REPORT folder", "notes.txt")
    assert (foreign / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_failed_overwrite_of_a_finished_run_keeps_it(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    data = json.loads(paths.run_config_path(run).read_text())["config"]["data"]
    for bad in (["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"]):
        result = invoke(["federate", "--data", data, *TINY, *bad, "--out", run, "--overwrite"])
        assert_one_line_error(result, 2, bad[0])
        assert snapshot(run) == before
    # a failure after the staging folder exists (a backbone file that is not one) keeps it too
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"not a safetensors file")
    result = invoke(["federate", "--data", data, *TINY, "--backbone", wrong, "--out", run, "--overwrite"])
    assert result.exit_code == 1, result.output
    assert snapshot(run) == before
    assert not paths.run_staging_dir(run).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "wrong.safetensors"]


def test_flower_server_overwrite_refuses_foreign_folders_and_keeps_the_run_on_a_crash(finished_run, tmp_path):
    """The Flower ServerApp's --overwrite goes through the same RUN folder machinery as federate:
    a folder it did not make is refused before anything else, and a server that fails after
    starting (here: no SuperLink to talk to) leaves the finished RUN exactly as it was."""
    pytest.importorskip("flwr")
    from cmrfed.fed.flower_config import run_config_of
    from cmrfed.fed.flower_server import serve

    cfg = FederateConfig(data="prepared", method="duallora", rounds=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="not a RUN folder"):
        serve(None, run_config_of(cfg, foreign, sites=4, overwrite=True), console=quiet_console())
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    with pytest.raises(AttributeError):  # the server dies reaching for the grid it was not given
        serve(None, run_config_of(cfg, run, sites=4, overwrite=True), console=quiet_console())
    assert snapshot(run) == before and not paths.run_staging_dir(run).exists()
    with pytest.raises(UsageError, match="already exists"):  # and without --overwrite, never touched
        serve(None, run_config_of(cfg, run, sites=4), console=quiet_console())
    assert snapshot(run) == before


def test_overwrite_builds_beside_and_swaps_when_done(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    data = json.loads(paths.run_config_path(run).read_text())["config"]["data"]
    result = invoke(["federate", "--data", data, *TINY, "--method", "ffalora", "--out", run, "--overwrite"])
    assert result.exit_code == 0, result.output
    info = json.loads(paths.run_config_path(run).read_text())
    assert info["config"]["method"] == "ffalora" and "result" in info
    assert not paths.run_staging_dir(run).exists()
    assert not lock_path(run).exists()


# ------------------------------------------------------------------------------------- case 2


@pytest.fixture(scope="session")
def flower_recipe(tmp_path_factory) -> Path:
    """The README's Flower recipe sizes: three of four clients have no test subjects."""
    root = tmp_path_factory.mktemp("recipe")
    write_synthetic_cohort(root / "cohort", seed=0, subjects=8, shape=(32, 32, 4))
    prepare(PrepareOptions(out=root / "prepared", acdc=root / "cohort" / "acdc",
                           mnms=root / "cohort" / "mnms", mnms2=root / "cohort" / "mnms2",
                           shape=(32, 32, 4), spacing=(4.0, 4.0, 10.0)), console=quiet_console())
    return root / "prepared"


def test_clients_without_test_subjects_are_reported_not_crashed_on(flower_recipe, tmp_path):
    counts = json.loads(paths.manifest_path(flower_recipe).read_text())["counts"]
    empty = sorted(c for c, per in counts.items() if sum(per["test"].values()) == 0)
    assert empty, "the recipe should leave some client without test subjects"
    run = tmp_path / "r"
    assert invoke(["federate", "--data", flower_recipe, *TINY, "--out", run]).exit_code == 0
    result = invoke(["evaluate", run, "--n-boot", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = strict_json(paths.metrics_path(run).read_text())
    covered = sorted(set(counts) - set(empty))
    assert sorted(doc["absent"]) == empty
    assert all("no subjects in its test split" in reason for reason in doc["absent"].values())
    assert sorted(doc["per_client"]) == covered
    assert sorted(doc["pooled"]["clients"]) == covered and sorted(doc["macro"]["clients"]) == covered
    for client in empty:
        assert client in result.output


def test_a_study_holding_out_a_site_without_test_subjects_reports_it_undefined(flower_recipe, tmp_path):
    """The participation gap of a site with nothing to score is undefined ("—", null), not a crash."""
    from cmrfed.study.config import load_study
    from cmrfed.study.runner import run_study

    counts = json.loads(paths.manifest_path(flower_recipe).read_text())["counts"]
    site = next(c for c, per in sorted(counts.items())
                if sum(per["test"].values()) == 0 and sum(per["train"].values()) > 0)
    file = tmp_path / "gap.toml"
    file.write_text(participation_text(flower_recipe, holdout=site, seeds="[0]"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_study(load_study(file), tmp_path / "out", console=quiet_console())
    # the site's ROC panel says it has no curve instead of drawing an empty legend
    assert not [w for w in caught if "No artists with labels" in str(w.message)]
    report = strict_json((paths.study_report_dir(result.out) / "report.json").read_text())
    row = report["participation"]["rows"][0]
    assert row["site"] == site
    for kind in ("held_out", "adapted", "member"):
        assert row[kind]["values"] == [None] and row[kind]["mean"] is None
    assert f"| duallora | {site} | 1 | — " in (paths.study_report_dir(result.out) / "report.md").read_text()
    held_out_run = paths.study_run_dir(result.out, f"duallora-blocks1-rank2-seed0-without-{site}")
    scored = invoke(["evaluate", held_out_run, "--client", site, "--data", flower_recipe, "--n-boot", "20",
                     "--out", tmp_path / "sent", "--device", "cpu"])
    assert scored.exit_code == 0, scored.output
    assert "no metrics (no subjects in its test split)" in scored.output


# ------------------------------------------------------------------------------------- case 3


HOLD = """
import sys, time
from cmrfed.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.e2e  # starts a subprocess
def test_a_second_command_on_a_locked_run_is_refused_naming_the_holder(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    data = json.loads(paths.run_config_path(run).read_text())["config"]["data"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        resumed = invoke(["federate", "--out", run, "--resume"])
        assert_one_line_error(resumed, 2, "in use", f"pid {holder.pid}")
        replaced = invoke(["federate", "--data", data, *TINY, "--method", "ffalora", "--out", run,
                           "--overwrite"])
        assert_one_line_error(replaced, 2, f"pid {holder.pid}")
        evaluated = invoke(["evaluate", run, "--device", "cpu"])
        assert_one_line_error(evaluated, 2, f"pid {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the holder died without releasing: its lock file stays, naming a dead pid, and is taken over
    assert lock_path(run).exists()
    with folder_lock(run):
        assert lock_path(run).read_text().strip() == str(os.getpid())
    assert not lock_path(run).exists()


def test_stale_lock_file_of_a_dead_process_is_recovered(tmp_path):
    folder = tmp_path / "prepared"
    lock_path(folder).write_text(f"{dead_pid()}\n")
    with folder_lock(folder), folder_lock(folder):  # re-entrant within a process
        assert lock_path(folder).read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------------------------- case 4


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"],
                                 ["--alpha", "-inf"]])
def test_non_finite_numbers_are_refused_before_anything_is_written(small_prepared, tmp_path, bad):
    out = tmp_path / "r"
    result = invoke(["federate", "--data", small_prepared, *TINY, *bad, "--out", out])
    assert_one_line_error(result, 2, bad[0], "finite")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # nothing was left to block the rerun with good options
    assert invoke(["federate", "--data", small_prepared, *TINY, "--out", out]).exit_code == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(finished_run, small_prepared, tmp_path):
    result = invoke(["federate", "--data", small_prepared, "--device", "cuda", "--out", tmp_path / "r"])
    assert_one_line_error(result, 2, "--device cuda", "CUDA")
    result = invoke(["evaluate", finished_run, "--device", "cuda"])
    assert_one_line_error(result, 2, "--device cuda")


@pytest.mark.parametrize("which", ["final", "best"])
def test_corrupt_tensors_in_evaluate_are_a_data_error(finished_run, tmp_path, which):
    run = copy_run(finished_run, tmp_path)
    target = paths.shared_tensors_path(run, which)
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    result = invoke(["evaluate", run, "--round", "last" if which == "final" else "best", "--device", "cpu"])
    assert_one_line_error(result, 1, str(target), "corrupt")


def _drop_file_capabilities() -> None:
    """In the child before exec: drop root's power to ignore file modes (CAP_DAC_OVERRIDE = 1,
    CAP_DAC_READ_SEARCH = 2, CAP_FOWNER = 3) from the bounding set, so root meets read-only
    folders as any user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _unprivileged() -> dict:
    """Keyword arguments of subprocess.run that make read-only mean read-only, even for root."""
    return {"preexec_fn": _drop_file_capabilities} if os.geteuid() == 0 else {}


def _run_cmrfed(args: list[str], env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HOME": tempfile.gettempdir(), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cmrfed.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300, **kwargs)


@pytest.fixture()
def shared_tmp():
    """A folder an unprivileged child can enter (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="cmrfed-robust-"))
    folder.chmod(0o777)
    yield folder
    for path in folder.rglob("*"):
        if path.is_dir():
            path.chmod(0o777)
    shutil.rmtree(folder)


@pytest.mark.e2e  # starts a subprocess
def test_read_only_out_is_one_line(shared_tmp):
    locked = shared_tmp / "readonly"
    locked.mkdir()
    locked.chmod(0o555)
    result = _run_cmrfed(["synth", "--out", locked / "cohort", "--subjects", "5"], **_unprivileged())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "read-only" in result.stderr
    assert list(locked.iterdir()) == []


def test_read_only_prepared_for_federate_suggests_no_cache(small_prepared, shared_tmp):
    prepared = shared_tmp / "prepared"
    shutil.copytree(small_prepared, prepared, ignore=shutil.ignore_patterns("cache"))
    for path in [prepared, *prepared.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    args = ["federate", "--data", prepared, *TINY, "--rounds", "1"]
    result = _run_cmrfed([*args, "--out", shared_tmp / "r"], **_unprivileged())
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "--no-cache" in result.stderr
    assert not (shared_tmp / "r").exists()
    ok = _run_cmrfed([*args, "--no-cache", "--out", shared_tmp / "r"], **_unprivileged())
    assert ok.returncode == 0, ok.stderr


@pytest.mark.e2e  # starts a subprocess
def test_flower_without_the_extra_is_one_line(tmp_path):
    shim = tmp_path / "shim" / "flwr"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named flwr (blocked for this test)')\n")
    pythonpath = os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])
    for args in (["flower", "run", "--superlink", "127.0.0.1:9093", "--insecure", "--sites", "2",
                  "--out", tmp_path / "r"],
                 ["flower", "site-config", "--client", "ge", "--data", tmp_path, "--site-dir", tmp_path]):
        result = _run_cmrfed(args, env_extra={"PYTHONPATH": pythonpath})
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "pip install 'cmrfed[flower]'" in result.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------- case 5


def test_missing_shared_tensors_say_missing_not_unfinished(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    paths.shared_tensors_path(run).unlink()
    result = invoke(["evaluate", run, "--device", "cpu"])
    assert_one_line_error(result, 1, "shared.safetensors is missing")
    assert "did not finish" not in result.output and "--resume" not in result.output


def test_moved_prepared_folder_is_named_and_evaluate_data_points_at_it(small_prepared, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(small_prepared, prepared, ignore=shutil.ignore_patterns("cache"))
    run = tmp_path / "run"
    assert invoke(["federate", "--data", prepared, *TINY, "--out", run]).exit_code == 0
    moved = tmp_path / "elsewhere"
    prepared.rename(moved)
    result = invoke(["evaluate", run, "--n-boot", "10", "--device", "cpu"])
    assert_one_line_error(result, 1, str(prepared), "gone", "--data")
    assert "cmrfed prepare` first" not in result.output
    again = invoke(["evaluate", run, "--n-boot", "10", "--device", "cpu", "--data", moved])
    assert again.exit_code == 0, again.output
    other = invoke(["evaluate", run, "--n-boot", "10", "--device", "cpu", "--data", small_prepared])
    assert other.exit_code == 0 or "manifest sha256 differs" in other.output


def test_missing_data_path_and_empty_targets_messages(small_prepared, tmp_path):
    result = invoke(["federate", "--data", tmp_path / "nowhere", "--out", tmp_path / "r"])
    assert_one_line_error(result, 2, "--data", "nowhere", "no such file or folder")
    assert "manifest.json" not in result.output
    result = invoke(["federate", "--data", small_prepared, "--targets", "", "--out", tmp_path / "r"])
    assert_one_line_error(result, 2, "--targets is empty", "q, kv, proj, fc1, fc2")
    assert "unknown []" not in result.output
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------- case 6


@pytest.mark.e2e  # starts a subprocess
def test_temporaries_of_killed_processes_are_cleaned_on_the_next_run(tmp_path):
    pid = dead_pid()
    cohort = tmp_path / "cohort"
    stale = tmp_path / f".cohort.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "half.nii.gz").write_bytes(b"half")
    stale_file = tmp_path / f".cohort.tmp-{pid}-4567abcd"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".cohort.tmp-{os.getppid()}-89abcdef"  # a live process's: left alone
    live.mkdir()
    write_synthetic_cohort(cohort, seed=0, subjects=5, shape=(32, 32, 4))
    assert not stale.exists() and not stale_file.exists() and live.exists()
    from cmrfed.atomic import clean_stale_temporaries

    assert clean_stale_temporaries(cohort) == []


@pytest.mark.e2e  # starts a subprocess
def test_prepare_killed_mid_way_leaves_nothing_the_next_run_keeps(tmp_path):
    write_synthetic_cohort(tmp_path / "raw", seed=0, subjects=8, shape=(48, 48, 6))
    out = tmp_path / "prepared"
    args = ["prepare", "--acdc", tmp_path / "raw" / "acdc", "--mnms", tmp_path / "raw" / "mnms",
            "--mnms2", tmp_path / "raw" / "mnms2", "--shape", "32,32,4", "--spacing", "4,4,10",
            "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "cmrfed.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(".prepared.tmp-")
                                                  for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".prepared.")]
    assert leftovers, "the kill should have left the temporary folder behind"
    assert invoke(args).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_files_follow_the_umask_and_every_json_is_strict(small_prepared, tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "r"
        assert invoke(["federate", "--data", small_prepared, *TINY, "--out", run]).exit_code == 0
        assert invoke(["evaluate", run, "--n-boot", "10", "--device", "cpu"]).exit_code == 0
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        if path.suffix == ".json":
            strict_json(path.read_text())
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                strict_json(line)


def test_rounds_log_writes_nan_as_null_and_readers_accept_it(tmp_path):
    record = {"round": 1, "clients": {"ge": {"train_loss": 0.5, "val": {"balanced_accuracy": float("nan")},
                                             "bytes_up": 1, "bytes_down": 2}},
              "mean_val_balanced_accuracy": float("nan"), "wall_s": 0.1}
    append_round(tmp_path, record)
    line = paths.rounds_log_path(tmp_path).read_text().strip()
    read = strict_json(line)
    assert read["mean_val_balanced_accuracy"] is None
    assert read["clients"]["ge"]["val"]["balanced_accuracy"] is None
    assert not has_score(read) and "—" in round_line(read)


def test_resume_reads_options_from_run_json_and_refuses_different_ones(small_prepared, tmp_path):
    run = tmp_path / "r"
    started = invoke(["federate", "--data", small_prepared, *TINY, "--method", "duallora", "--out", run])
    assert started.exit_code == 0, started.output
    before = json.loads(paths.run_config_path(run).read_text())["config"]
    result = invoke(["federate", "--out", run, "--resume", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(paths.run_config_path(run).read_text())["config"] == before
    same = invoke(["federate", "--out", run, "--resume", "--method", "duallora", "--rank", "2"])
    assert same.exit_code == 0, same.output
    differ = invoke(["federate", "--out", run, "--resume", "--lr", "0.1", "--method", "fedlora"])
    assert_one_line_error(differ, 2, "--lr 0.1", "--method 'fedlora'", "differ")
    missing = invoke(["federate", "--out", tmp_path / "none", "--resume"])
    assert_one_line_error(missing, 2, "no run.json")


@pytest.mark.e2e  # starts a subprocess
def test_a_folder_that_turns_out_read_only_mid_way_is_one_line(finished_run, shared_tmp):
    """Past validation (a sub-folder of RUN read-only): the CLI's safety net, exit 1."""
    run = copy_run(finished_run, shared_tmp)
    best = paths.shared_tensors_path(run, "best").parent
    for path in [best, *best.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    result = _run_cmrfed(["federate", "--out", run, "--resume", "--device", "cpu"], **_unprivileged())
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "cannot write" in result.stderr


def test_replacing_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    """study / demo --overwrite: the old folder is set aside, put back on failure, deleted on success."""
    from cmrfed.errors import UsageError
    from cmrfed.outputs import REPORT, replacing

    old = tmp_path / "report"
    old.mkdir()
    (old / "comparison.json").write_text('{"old": true}')
    with pytest.raises(RuntimeError), replacing(old, REPORT, overwrite=True):
        old.mkdir()
        (old / "half-written").write_text("x")
        raise RuntimeError("the new study failed")
    assert sorted(p.name for p in old.iterdir()) == ["comparison.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # nothing set aside is left behind
    with replacing(old, REPORT, overwrite=True):
        old.mkdir()
        (old / "comparison.json").write_text('{"new": true}')
    assert (old / "comparison.json").read_text() == '{"new": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="not a REPORT folder"), replacing(thesis, REPORT, overwrite=True):
        pass
    assert (thesis / "thesis.tex").read_text() == "years of work"


def test_a_replacement_killed_half_way_is_rolled_back_by_the_next_command_on_that_folder(tmp_path):
    """A study / demo --overwrite killed mid-way leaves its half-built folder in place and the old
    one set aside; the next command on that folder puts the old one back (and says which)."""
    from cmrfed.atomic import clean_stale_temporaries
    from cmrfed.lock import folder_lock
    from cmrfed.outputs import REPORT, replacing

    report = tmp_path / "report"
    report.mkdir()
    (report / "half-written").write_text("x")
    aside = tmp_path / f".report.old-{dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "comparison.json").write_text('{"old": true}')
    live = tmp_path / f".report.old-{os.getppid()}-89abcdef"  # a live process's: left alone
    live.mkdir()
    assert clean_stale_temporaries(report) == [aside]
    assert sorted(p.name for p in report.iterdir()) == ["comparison.json"] and live.exists()
    live.rmdir()
    aside.mkdir()  # killed again; the next command on the folder (any: here a --resume) takes its lock
    (aside / "comparison.json").write_text('{"older": true}')
    with folder_lock(report):
        assert (report / "comparison.json").read_text() == '{"older": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    with pytest.raises(RuntimeError), replacing(report, REPORT, overwrite=True):
        raise RuntimeError("the new study failed")  # and a replacement that fails puts it back too
    assert (report / "comparison.json").read_text() == '{"older": true}'
