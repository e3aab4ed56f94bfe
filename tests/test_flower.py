"""The Flower engine drives the same Client and FedAvg as the in-process engine.

A real SuperLink and one SuperNode per client run on loopback (127.0.0.1, free ports); the run is
submitted with the wrapper the README documents. The final shared tensors must equal the
in-process engine's with the same seed, every site's private tensors must equal the in-process
ones, no private tensor may ever reach the server, and ``evaluate`` must read the resulting RUN
folder (once the sites' private tensors are copied in) exactly as it reads an in-process one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

import psutil
import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'cmrfed[flower]'")

import torch
from flower_loopback import LoopbackGrid, as_serverapp
from flower_processes import START_TIMEOUT_S, Processes, free_port, wait_for_port
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.shards import load_manifest
from cmrfed.data.synth import write_synthetic_cohort
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import (
    SiteConfig,
    config_text,
    federate_config_of,
    run_config_of,
    site_node_config,
)
from cmrfed.fed.flower_launch import COMPONENTS, write_app
from cmrfed.fed.flower_server import check_shared_keys, serve
from cmrfed.fed.inprocess import federate
from cmrfed.fed.methods import resolve_method
from cmrfed.fed.sampling import participants
from cmrfed.fed.task import build_run_model
from cmrfed.model.classifier import param_group

pytestmark = pytest.mark.flower

SHAPE = (32, 32, 4)
RUN_TIMEOUT_S = 300.0
ATOL = 1e-5


# --- fast checks of the pieces -------------------------------------------------------------------
def test_run_config_carries_the_whole_federate_config(tmp_path: Path) -> None:
    # Prepare: options that need encoding (None, 'all', a tuple)
    cfg = FederateConfig(data="ignored", method="fedsa", blocks="all", local_rank=None,
                         targets=("q", "fc1"), rounds=3, lr=3e-4, class_balanced=False, seed=7)
    # Execute: through TOML and back, as Flower carries it
    run_config = run_config_of(cfg, tmp_path / "RUN", sites=2)
    back = federate_config_of(tomllib.loads(_toml(run_config)))
    # Assert
    assert back == cfg
    assert run_config["out"] == str((tmp_path / "RUN").resolve())
    assert run_config["sites"] == 2 and run_config["run-name"] == "RUN"
    with pytest.raises(UsageError, match="--sites"):
        run_config_of(cfg, tmp_path / "RUN", sites=0)


def test_write_app_is_a_flower_app_of_our_components(tmp_path: Path) -> None:
    run_config = run_config_of(FederateConfig(data=""), tmp_path / "RUN", sites=3)
    app = write_app(tmp_path / "app", run_config)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == COMPONENTS
    assert project["tool"]["flwr"]["app"]["config"] == run_config


def test_site_config_needs_client_data_and_site_folder() -> None:
    site = SiteConfig.of({"client": "ge", "prepared": "/p", "site-dir": "/s"})
    assert site == SiteConfig("ge", Path("/p"), Path("/s"), "auto")
    assert site.node_config() == 'client="ge" prepared="/p" site-dir="/s" device="auto"'
    with pytest.raises(UsageError, match="site-dir"):
        SiteConfig.of({"client": "ge", "prepared": "/p"})


def test_server_refuses_a_private_tensor() -> None:
    # Prepare: real tensor names of a DualLoRA model
    cfg = FederateConfig(data="", method="duallora", backbone="tiny")
    names = list(build_run_model(cfg, SHAPE).initial_state)
    spec = resolve_method("duallora")
    shared = [n for n in names if param_group(n) in spec.shared]
    private = [n for n in names if param_group(n) in spec.private]
    assert shared and private
    # Execute / Assert
    check_shared_keys(shared, spec, "ge")
    with pytest.raises(DataError, match="outside the shared groups"):
        check_shared_keys([*shared, private[0]], spec, "ge")


def _instruction(cfg: FederateConfig, round_index: int = 0, **extra):
    """The server's instruction of a message, as :class:`FlowerTransport` writes it."""
    from flwr.app import ConfigRecord

    return ConfigRecord({"round": round_index, "config": config_text(cfg), "token": "t", "epoch": 1,
                         "run_name": "RUN", "best_round": 0, **extra})


def _context(node_config: dict, run_config: dict | None = None):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config=run_config or {})


def test_a_held_out_site_is_refused_before_it_opens_its_data(tmp_path: Path) -> None:
    from cmrfed.fed.flower_client import _open_site

    node_config = {"client": "ge", "prepared": str(tmp_path / "absent"), "site-dir": str(tmp_path / "s")}
    with pytest.raises(UsageError, match="held out"):  # not a DataError about the missing PREPARED
        _open_site(_context(node_config), _instruction(FederateConfig(data="", holdout="ge")))


def test_a_site_that_missed_an_aggregate_trains_from_it(small_prepared: Path, tmp_path: Path) -> None:
    """A site that was down when an aggregate was sent gets it with its next train message; it
    then trains exactly as the same site in-process from that aggregate. A site whose SuperNode
    restarted (a fresh Flower context) continues from the state it kept in its site folder."""
    from dataclasses import replace

    from cmrfed.fed.flower_client import _open_site, train_site
    from cmrfed.fed.task import build_client

    cfg = FederateConfig(data=str(small_prepared), method="duallora", rounds=3, rank=4, seed=3)

    def site(folder: str, round_index: int):
        node_config = {"client": "ge", "prepared": str(small_prepared), "site-dir": str(tmp_path / folder),
                       "device": "cpu"}
        return _open_site(_context(node_config), _instruction(cfg, round_index))

    # Execute: round 1; round 2's aggregate never arrived; round 3's train message carries it
    first, _, _ = train_site(site("synced", 1), 1, None, best_round=0)
    aggregate = {k: v + 0.01 for k, v in first.items()}
    got, _, _ = train_site(site("synced", 3), 3, aggregate, best_round=0)  # a new context each time
    train_site(site("fresh", 1), 1, None, best_round=0)
    (tmp_path / "fresh" / ".state").rename(tmp_path / "lost")  # a site that lost its state
    without, _, _ = train_site(site("fresh", 3), 3, aggregate, best_round=0)
    # Assert: the same as in-process from that aggregate, not as from a fresh init
    manifest = load_manifest(small_prepared)
    run_model = build_run_model(replace(cfg, data=str(small_prepared)), tuple(manifest.shape))
    client, _ = build_client(cfg, small_prepared, manifest, "ge", run_model, torch.device("cpu"),
                             splits=("train", "val"))
    client.fit(run_model.model, 1, torch.device("cpu"))
    client.set_shared(aggregate)
    want = client.fit(run_model.model, 3, torch.device("cpu")).shared
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    assert any(not torch.equal(without[k], want[k]) for k in want)
    with pytest.raises(DataError, match="without the aggregate"):  # holds round 1, asked for round 3
        train_site(site("synced2", 1), 1, None, best_round=0)
        train_site(site("synced2", 3), 3, None, best_round=0)


def test_every_message_expires_with_the_node_timeout_and_an_expired_one_is_not_executed(tmp_path):
    """The server's messages carry a TTL of --node-timeout: the SuperLink drops an undelivered one
    after it, and a site that receives one late (a SuperNode that pulled it, then stalled) refuses
    it instead of training on a round the server has given up on."""
    from flwr.app import Context, RecordDict

    from cmrfed.fed.flower_client import client_app
    from cmrfed.fed.flower_config import ROUND, TRAIN
    from cmrfed.fed.flower_server import message

    as_serverapp()
    cfg = FederateConfig(data="", method="duallora", rounds=2, rank=2)
    fresh = message(RecordDict({ROUND: _instruction(cfg, 1)}), 7, TRAIN, 1, ttl_s=42.0)
    assert fresh.metadata.ttl == 42.0 and fresh.metadata.message_type == TRAIN
    late = message(RecordDict({ROUND: _instruction(cfg, 1)}), 7, TRAIN, 1, ttl_s=5.0)
    late.metadata.created_at -= 6.0  # sent 6 s ago: its 5 s have passed
    late.metadata.__dict__["_message_id"] = "late"
    site_dir = tmp_path / "site"
    node_config = {"client": "ge", "prepared": str(tmp_path / "prepared"), "site-dir": str(site_dir),
                   "device": "cpu"}
    with pytest.raises(DataError, match="after its TTL"):
        client_app(late, Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                                 run_config={}))
    assert not site_dir.exists()  # refused before the site opened anything: nothing trained or kept


def test_min_sites_must_be_reachable(tmp_path: Path) -> None:
    cfg = FederateConfig(data="", sites_per_round=3)
    assert run_config_of(cfg, tmp_path / "RUN", sites=4, min_sites=2)["min-sites"] == 2
    for bad in (0, 4):
        with pytest.raises(UsageError, match="--min-sites"):
            run_config_of(cfg, tmp_path / "RUN", sites=4, min_sites=bad)


def _rounds_without_time(run: Path) -> list[dict]:
    records = [json.loads(line) for line in paths.rounds_log_path(run).read_text().splitlines()]
    for record in records:
        record.pop("wall_s")
    return records


def _wait_until(condition, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# --- the loopback federation ---------------------------------------------------------------------
def _toml(flat: dict) -> str:
    import tomli_w

    return tomli_w.dumps(flat)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flower-cohort")
    write_synthetic_cohort(root / "raw", seed=0, subjects=8, shape=SHAPE)
    prepare(PrepareOptions(out=root / "prepared", mnms2=root / "raw" / "mnms2", spacing=(4.0, 4.0, 10.0),
                           shape=SHAPE), console=_quiet())
    return root / "prepared"


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


class Federation:
    """A SuperLink and one SuperNode per client of ``prepared`` on loopback, kept for several runs."""

    def __init__(self, prepared: Path, root: Path) -> None:
        self.prepared, self.root = prepared, root
        root.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(root)
        self.clients = list(load_manifest(prepared).clients)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.link, link_log = self.processes.start("superlink", [
            "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port)])
        wait_for_port(self.port, self.link, link_log)
        for client in self.clients:
            self.start_node(client)

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    def site_dir(self, client: str) -> Path:
        return self.root / f"site-{client}"

    def start_node(self, client: str) -> subprocess.Popen:
        """A SuperNode for ``client``, always with the same node config (its restart too)."""
        node_config = site_node_config(client, self.prepared, self.site_dir(client), device="cpu")
        self.nodes[client], _ = self.processes.start(f"supernode-{client}-{len(self.processes.started)}", [
            "flower-supernode", "--insecure", "--superlink", self.superlink,
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config,
            "--max-wait-time", str(START_TIMEOUT_S)])
        return self.nodes[client]

    def command(self, out: Path, *options: str) -> list[str]:
        """`cmrfed flower run` of this federation, as the README documents it."""
        return [sys.executable, "-m", "cmrfed.cli", "flower", "run", "--superlink", self.superlink,
                "--insecure", "--sites", str(len(self.clients)), "--data", str(self.prepared),
                "--out", str(out), *options]

    def serverapps(self) -> list[psutil.Process]:
        """The ServerApp processes the SuperLink has started and that are still alive."""
        family = psutil.Process(self.link.pid).children(recursive=True)
        return [p for p in family if _is_serverapp(p)]


def _is_serverapp(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("flwr-serverapp" in part for part in process.cmdline())
    return False


@pytest.fixture
def federation(cohort: Path, tmp_path: Path):
    """A loopback federation of its own for one test (tests on other workers run theirs)."""
    deployed = Federation(cohort, tmp_path / "federation")
    try:
        yield deployed
    finally:
        deployed.processes.stop()


# A real SIGKILL of the ServerApp process after round 1 is logged but not checkpointed: the resumed
# run redoes round 1 (every federated method is interrupted at its own point and resumed over the
# same apps in tests/test_engines.py; each ServerApp here costs a Flower run of real processes).
KILL = "federate.round-logged:1"
ROUNDS = 2


@pytest.fixture(scope="session")
def runs(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same duallora run twice: in-process, and over a loopback Flower federation whose
    ServerApp SIGKILLs itself after round 1 is logged (before its checkpoint) and which
    `cmrfed flower run --resume` then finishes. One Flower run proves both that the Flower engine
    trains what the in-process one trains and that a resumed Flower run is the uninterrupted one."""
    root = tmp_path_factory.mktemp("flower-runs")
    options = {"method": "duallora", "rounds": ROUNDS, "rank": 2, "seed": 4}
    cfg = FederateConfig(data=str(cohort), backbone="tiny", **options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every Flower process runs (OMP_NUM_THREADS=1): bitwise equal
    try:
        federate(cfg, root / "inprocess", device="cpu", console=_quiet())
    finally:
        torch.set_num_threads(threads)
    federation = Federation(cohort, root / "federation")
    out = root / "flower"
    args = [f"--{k}={v}" for k, v in options.items()] + ["--backbone=tiny", "--node-timeout", "120"]
    log = root / "killed.log"
    try:
        with log.open("wb") as handle:
            killed = subprocess.Popen(federation.command(out, *args), stdout=handle, stderr=subprocess.STDOUT,
                                      env=dict(federation.processes.env, CMRFED_FAULT=KILL),
                                      start_new_session=True)
        _wait_until(lambda: paths.run_config_path(out).exists(), "the killed run to start")
        _wait_until(lambda: not federation.serverapps(), "the ServerApp to kill itself")
        os.killpg(killed.pid, signal.SIGKILL)  # the submitting client: it would stream until Flower
        killed.wait(timeout=15)  # notices the dead ServerApp (its heartbeat), which we need not wait for
        killed_info = json.loads(paths.run_config_path(out).read_text())
        resumed = subprocess.run(federation.command(out, "--resume"), env=federation.processes.env,
                                 capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    except Exception as exc:
        raise AssertionError(f"the loopback Flower run failed: {exc}\n{log.read_text()[-3000:]}\n"
                             f"{federation.processes.logs()}") from exc
    finally:
        federation.processes.stop()
    for client in federation.clients:  # the sites' RUN-shaped folders, as each site keeps them
        shutil.copytree(paths.site_run_dir(federation.site_dir(client), "flower"),
                        paths.site_run_dir(root / f"site-{client}", "flower"))
    return {"root": root, "cfg": cfg, "clients": federation.clients, "killed_info": killed_info}


def test_flower_run_writes_the_same_run_folder(runs: dict) -> None:
    """The killed run had recorded no result; the resumed one records the in-process run's."""
    flower, inprocess = runs["root"] / "flower", runs["root"] / "inprocess"
    assert "result" not in runs["killed_info"]
    info = json.loads(paths.run_config_path(flower).read_text())
    reference = json.loads(paths.run_config_path(inprocess).read_text())
    assert info["config"] == reference["config"] | {"data": info["config"]["data"]}
    assert info["clients"] == reference["clients"]
    assert info["data"]["manifest_sha256"] == reference["data"]["manifest_sha256"]
    assert info["backbone"] == reference["backbone"]
    assert info["engine"]["name"] == "flower"
    assert info["result"]["completed_rounds"] == ROUNDS
    cfg = runs["cfg"]
    for key in ("completed_rounds", "best_round", "stopped", f"best_mean_val_{cfg.select}"):
        assert info["result"].get(key) == reference["result"].get(key), key
    rounds = [json.loads(line) for line in paths.rounds_log_path(flower).read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))  # round 1 once, though run twice
    for record, ref in zip(rounds, (json.loads(x) for x in paths.rounds_log_path(inprocess).read_text()
                                    .splitlines()), strict=True):
        assert record["participants"] == ref["participants"] and record["failed"] == ref["failed"] == {}
        for client, entry in record["clients"].items():
            # bytes are those of the ArrayRecords Flower carried: the tensors plus small headers
            assert entry["bytes_up"] >= 4 * entry["params_up"] > 0
            for key in ("train_loss", "val", "n_train", "params_up"):
                assert entry[key] == ref["clients"][client][key], (record["round"], client, key)


def test_flower_shared_and_private_tensors_equal_the_inprocess_ones(runs: dict) -> None:
    """Bit for bit: the Flower processes and the in-process run train alike on one thread each,
    and the resumed Flower run redid round 1 from the sites' own checkpoints."""
    flower, inprocess = runs["root"] / "flower", runs["root"] / "inprocess"
    for which in ("final", "best"):
        got = load_file(str(paths.shared_tensors_path(flower, which)))
        want = load_file(str(paths.shared_tensors_path(inprocess, which)))
        assert set(got) == set(want) and got
        assert all(torch.equal(got[k], want[k]) for k in want), which
        for client in runs["clients"]:
            site_run = paths.site_run_dir(runs["root"] / f"site-{client}", flower.name)
            got = load_file(str(paths.private_tensors_path(site_run, client, which)))
            want = load_file(str(paths.private_tensors_path(inprocess, client, which)))
            assert set(got) == set(want) and got
            assert all(torch.equal(got[k], want[k]) for k in want), (client, which)
    assert not (flower / "clients").exists()  # the server never wrote a private tensor


def test_no_private_tensor_ever_reached_the_server(runs: dict) -> None:
    spec = resolve_method("duallora")
    wire_log = paths.wire_log_path(runs["root"] / "flower")
    entries = [json.loads(line) for line in wire_log.read_text().splitlines()]
    received = {key for e in entries if e["direction"] == "up" for key in e["keys"]}
    trained = Counter(e["round"] for e in entries if e["direction"] == "up" and e["message_type"] == "train")
    sites = len(runs["clients"])  # round 1 trained by the killed ServerApp and again by the resumed one
    assert trained == {1: 2 * sites, **{r: sites for r in range(2, ROUNDS + 1)}}
    private_keys = {key for client in runs["clients"]
                    for key in load_file(str(paths.private_tensors_path(runs["root"] / "inprocess", client)))}
    assert received and private_keys
    assert not received & private_keys
    assert {param_group(key) for key in received} <= spec.shared
    assert all(param_group(key) not in spec.private for e in entries for key in e["keys"])


def test_evaluate_reads_the_flower_run_once_sites_copy_their_private_tensors(runs: dict) -> None:
    flower, inprocess = runs["root"] / "flower", runs["root"] / "inprocess"
    for client in runs["clients"]:
        shutil.copytree(paths.site_run_dir(runs["root"] / f"site-{client}", flower.name), flower,
                        dirs_exist_ok=True)
    evaluate_run(flower, split="val", n_boot=20, device="cpu", console=_quiet())
    evaluate_run(inprocess, split="val", n_boot=20, device="cpu", console=_quiet())
    got = _rows(paths.predictions_path(flower))
    want = _rows(paths.predictions_path(inprocess))
    assert len(got) == len(want) > 0
    for row, ref in zip(got, want, strict=True):
        assert (row["subject"], row["client"], row["model"], row["label"]) == \
            (ref["subject"], ref["client"], ref["model"], ref["label"])
        assert float(row["probability"]) == pytest.approx(float(ref["probability"]), abs=1e-5)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --- drop-outs: real SuperNodes killed mid-run ------------------------------------------------------
def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a SuperNode and everything it started (its SuperExec and ClientApp processes)."""
    family = [psutil.Process(process.pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        family += family[0].children(recursive=True)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    process.wait(timeout=15)


def _victims(sites: list[str], per_round: int) -> tuple[int, str, str]:
    """A seed and two sites to kill after round 1 such that round 2 asks exactly one of them (it
    fails, the other site it asks still answer: --min-sites 2 is met) and round 3 asks both (one
    site answers: the run stops). The second is not asked in round 2 but is sent the aggregate."""
    for seed in range(100):
        asked2, asked3 = (participants(sites, per_round, seed, r) for r in (2, 3))
        (skipped,) = set(sites) - set(asked2)
        for first in asked2:
            if {first, skipped} <= set(asked3):
                return seed, first, skipped
    raise AssertionError("no seed gives the wanted draws")


def test_a_killed_supernode_is_survived_with_min_sites_and_stops_the_run_below(small_prepared, tmp_path):
    sites = list(load_manifest(small_prepared).clients)
    seed, first, second = _victims(sites, 3)
    processes = Processes(tmp_path)
    out = tmp_path / "run"
    nodes = {}
    try:
        link_port = free_port()
        link, link_log = processes.start("superlink", [
            "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(link_port)])
        wait_for_port(link_port, link, link_log)
        for client in sites:
            node_config = site_node_config(client, small_prepared, tmp_path / f"site-{client}", device="cpu")
            nodes[client], _ = processes.start(f"supernode-{client}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config,
                "--max-wait-time", str(START_TIMEOUT_S)])
        command = [sys.executable, "-m", "cmrfed.cli", "flower", "run", "--superlink",
                   f"127.0.0.1:{link_port}", "--insecure", "--sites", str(len(sites)), "--data",
                   str(small_prepared), "--method", "duallora", "--rounds", "3", "--rank", "4",
                   "--seed", str(seed), "--sites-per-round", "3", "--min-sites", "2",
                   "--node-timeout", "150", "--out", str(out)]
        cli_log = tmp_path / "cli.log"
        with cli_log.open("wb") as handle:
            cli = subprocess.Popen(command, env=processes.env, stdout=handle, stderr=subprocess.STDOUT)
        # the marker: round 1 is in rounds.jsonl, so both victims have answered it
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _logged_rounds(out) and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _logged_rounds(out) == [1], cli_log.read_text()[-3000:]
        _kill_tree(nodes[first])
        _kill_tree(nodes[second])
        code = cli.wait(timeout=RUN_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"the drop-out run failed: {exc}\n{processes.logs()}") from exc
    finally:
        processes.stop()
    output = cli_log.read_text()
    # stopped cleanly, with a clear message, at round 3: only one of the three sites asked answered
    assert code == 1, output[-3000:]
    assert "stopped early" in output and "--min-sites is 2" in output and "Traceback" not in output
    result = json.loads(paths.run_config_path(out).read_text())["result"]
    assert result["completed_rounds"] == 2 and result["stopped"]["round"] == 3
    assert first in result["stopped"]["reason"] and second in result["stopped"]["reason"]
    # round 2 survived the first dead site; both drop-outs are recorded
    rounds = [json.loads(line) for line in paths.rounds_log_path(out).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["participants"] == participants(sites, 3, seed, record["round"])
    assert rounds[0]["failed"] == {}
    assert set(rounds[1]["failed"]) == {first, second}
    assert rounds[1]["failed"][first].startswith("train")
    assert rounds[1]["failed"][second].startswith("evaluate")  # not asked, but sent the aggregate
    for client, entry in rounds[1]["clients"].items():
        trained = client in rounds[1]["participants"] and client != first
        assert (entry["train_loss"] is not None) == trained  # an undefined loss is written as null
        assert (entry["bytes_up"] > 0) == trained
        assert (entry["val"] != {}) == (client not in (first, second))
    # the last good state: round 2's aggregate, and the living sites' private tensors of round 2
    assert paths.shared_tensors_path(out).exists() and paths.shared_tensors_path(out, "best").exists()
    for client in sites:
        site_run = paths.site_run_dir(tmp_path / f"site-{client}", out.name)
        assert paths.private_tensors_path(site_run, client).exists() == (client not in (first, second))
    # nothing private ever reached the server, in any message of the run
    spec = resolve_method("duallora")
    entries = [json.loads(line) for line in paths.wire_log_path(out).read_text().splitlines()]
    assert {e["message_type"] for e in entries} == {"query.identify", "train", "evaluate", "query.finalize"}
    assert all(param_group(key) in spec.shared for e in entries for key in e["keys"])
    dead = (first, second)
    assert not [e for e in entries if e["direction"] == "up" and e["round"] > 1 and e["client"] in dead]


def _logged_rounds(run: Path) -> list[int]:
    log = paths.rounds_log_path(run)
    if not log.exists():
        return []
    return [json.loads(line)["round"] for line in log.read_text().splitlines() if line.endswith("}")]


# --- a site rejoins: its SuperNode killed after round 1 and restarted -----------------------------
@pytest.mark.e2e
def test_a_restarted_supernode_rejoins_from_its_own_state(cohort, federation, tmp_path):
    """A SuperNode SIGKILLed after round 1 and restarted with the same node config comes back
    under a new node id; the server knows it by its client name, and the site continues from the
    state it kept in its site folder (not a fresh init): the run ends with the uninterrupted run's
    final tensors. It is not asked in round 2 (so the others need not wait for it) and misses that
    round's aggregate, which its round 3 train message carries."""
    clients = federation.clients
    victim = clients[0]
    seed = next(s for s in range(100) if participants(clients, 1, s, 2) != [victim]
                and participants(clients, 1, s, 3) == [victim])
    options = {"method": "duallora", "rounds": 3, "rank": 2, "seed": seed, "sites-per-round": 1}
    cfg = FederateConfig(data=str(cohort), method="duallora", rounds=3, rank=2, seed=seed, sites_per_round=1)
    reference = tmp_path / "reference"
    grid = LoopbackGrid([{"client": c, "prepared": str(cohort), "site-dir": str(tmp_path / f"site-{c}"),
                          "device": "cpu"} for c in clients])
    serve(grid, run_config_of(cfg, reference, sites=len(clients)), console=_quiet())

    out = tmp_path / "rejoined"
    log = tmp_path / "cli.log"
    try:
        with log.open("wb") as handle:
            cli = subprocess.Popen(federation.command(out, *(f"--{k}={v}" for k, v in options.items()),
                                                      "--node-timeout", "120"),
                                   env=federation.processes.env, stdout=handle, stderr=subprocess.STDOUT)
        _wait_until(lambda: _logged_rounds(out) == [1] or cli.poll() is not None, "round 1")
        _kill_tree(federation.nodes[victim])
        federation.start_node(victim)
        code = cli.wait(timeout=RUN_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}\n{federation.processes.logs()}") from exc
    assert code == 0, log.read_text()[-3000:]
    rounds = [json.loads(line) for line in paths.rounds_log_path(out).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert list(rounds[1]["failed"]) == [victim] and rounds[1]["failed"][victim].startswith("evaluate")
    assert rounds[2]["participants"] == [victim] and rounds[2]["failed"] == {}
    assert rounds[2]["clients"][victim]["train_loss"] is not None  # it trained again, in round 3
    got, want = (load_file(str(paths.shared_tensors_path(run))) for run in (out, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    got = load_file(str(paths.private_tensors_path(paths.site_run_dir(federation.site_dir(victim), out.name),
                                                   victim)))
    want = load_file(str(paths.private_tensors_path(paths.site_run_dir(tmp_path / f"site-{victim}",
                                                                       reference.name), victim)))
    assert got and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    engine = json.loads(paths.run_config_path(out).read_text())["engine"]
    assert "node_id" not in engine["sites"][victim]  # sites are known by name, not by node id
