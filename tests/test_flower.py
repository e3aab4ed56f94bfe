"""The Flower engine's pieces, and its runs surviving sites that fail.

The run config, the app, site configs, the server's refusals, message TTLs and a site that missed
an aggregate, in-process; then real SuperLinks and SuperNodes on loopback (127.0.0.1, free ports),
each test with a federation of its own: a killed SuperNode survived with --min-sites, and a
restarted one rejoining from its own state. The Flower run against the in-process one, killed and
resumed: tests/test_flower_run.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tomllib
from pathlib import Path

import psutil
import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'cmrfed[flower]'")

import torch
from conftest import quiet_console
from flower_loopback import LoopbackGrid, as_serverapp
from flower_processes import (
    RUN_TIMEOUT_S,
    Federation,
    wait_until,
)
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.data.shards import load_manifest
from cmrfed.errors import DataError, UsageError
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import (
    SiteConfig,
    config_text,
    federate_config_of,
    run_config_of,
)
from cmrfed.fed.flower_launch import COMPONENTS, write_app
from cmrfed.fed.flower_server import check_shared_keys, serve
from cmrfed.fed.methods import resolve_method
from cmrfed.fed.sampling import participants
from cmrfed.fed.task import build_run_model
from cmrfed.model.classifier import param_group

pytestmark = pytest.mark.flower

SHAPE = (32, 32, 4)


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


# --- the loopback federation ---------------------------------------------------------------------
def _toml(flat: dict) -> str:
    import tomli_w

    return tomli_w.dumps(flat)


@pytest.fixture
def federation(flower_cohort: Path, tmp_path: Path):
    """A loopback federation of its own for one test (tests on other workers run theirs)."""
    deployed = Federation(flower_cohort, tmp_path / "federation")
    try:
        yield deployed
    finally:
        deployed.processes.stop()


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
    out = tmp_path / "run"
    federation = Federation(small_prepared, tmp_path)  # site folders: tmp_path / site-<client>
    try:
        command = federation.command(out, "--method", "duallora", "--rounds", "3", "--rank", "4",
                                     "--seed", str(seed), "--sites-per-round", "3", "--min-sites", "2",
                                     "--node-timeout", "150")
        cli_log = tmp_path / "cli.log"
        with cli_log.open("wb") as handle:
            cli = subprocess.Popen(command, env=federation.processes.env, stdout=handle,
                                   stderr=subprocess.STDOUT)
        # the marker: round 1 is in rounds.jsonl, so both victims have answered it
        wait_until(lambda: _logged_rounds(out) or cli.poll() is not None, "round 1")
        assert _logged_rounds(out) == [1], cli_log.read_text()[-3000:]
        _kill_tree(federation.nodes[first])
        _kill_tree(federation.nodes[second])
        code = cli.wait(timeout=RUN_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"the drop-out run failed: {exc}\n{federation.processes.logs()}") from exc
    finally:
        federation.processes.stop()
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
def test_a_restarted_supernode_rejoins_from_its_own_state(flower_cohort, federation, tmp_path):
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
    cfg = FederateConfig(data=str(flower_cohort), method="duallora", rounds=3, rank=2, seed=seed,
                         sites_per_round=1)
    reference = tmp_path / "reference"
    grid = LoopbackGrid([{"client": c, "prepared": str(flower_cohort),
                          "site-dir": str(tmp_path / f"site-{c}"), "device": "cpu"} for c in clients])
    serve(grid, run_config_of(cfg, reference, sites=len(clients)), console=quiet_console())

    out = tmp_path / "rejoined"
    log = tmp_path / "cli.log"
    try:
        with log.open("wb") as handle:
            cli = subprocess.Popen(federation.command(out, *(f"--{k}={v}" for k, v in options.items()),
                                                      "--node-timeout", "120"),
                                   env=federation.processes.env, stdout=handle, stderr=subprocess.STDOUT)
        wait_until(lambda: _logged_rounds(out) == [1] or cli.poll() is not None, "round 1")
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
