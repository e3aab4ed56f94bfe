"""Both engines run the one round loop (cmrfed/fed/rounds.py): for every federated method of the
table, with and without DP-SGD, an in-process run and a Flower run (the real ServerApp and
ClientApp over :class:`LoopbackGrid`) with the same options and seed end with identical tensors,
the same rounds and the same DP ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import quiet_console
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'cmrfed[flower]'")

from flower_loopback import LoopbackGrid

from cmrfed import paths
from cmrfed.data.shards import load_manifest
from cmrfed.fed import rounds
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import run_config_of
from cmrfed.fed.flower_server import serve
from cmrfed.fed.inprocess import federate
from cmrfed.fed.methods import METHODS

pytestmark = pytest.mark.e2e

FEDERATED = [name for name, spec in METHODS.items() if spec.federated]
OPTIONS = {"rounds": 2, "rank": 2, "batch_size": 8, "lr": 5e-3, "seed": 5, "sites_per_round": 3,
           "augment_views": 2}
# DP-SGD alone, and with class balancing by released label counts (the default under DP)
DP = {"off": {}, "dp": {"dp_epsilon": 8.0, "class_balanced": False}, "dp-balanced": {"dp_epsilon": 8.0}}


def node_configs(prepared: Path, root: Path) -> list[dict]:
    return [{"client": c, "prepared": str(prepared), "site-dir": str(root / f"site-{c}"), "device": "cpu"}
            for c in load_manifest(prepared).clients]


def flower_run(cfg: FederateConfig, out: Path, grid: LoopbackGrid, **options) -> None:
    serve(grid, run_config_of(cfg, out, sites=len(grid.nodes), **options), console=quiet_console())


def rounds_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in paths.rounds_log_path(run).read_text().splitlines()]


def assert_same_tensors(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key in want:
        assert torch.equal(got[key], want[key]), f"{where}: {key}"


@pytest.mark.parametrize("dp", list(DP))
@pytest.mark.parametrize("method", FEDERATED)
def test_both_engines_give_identical_tensors(small_prepared, tmp_path, method, dp):
    cfg = FederateConfig(data=str(small_prepared), method=method, **OPTIONS, **DP[dp])
    federate(cfg, tmp_path / "inprocess", device="cpu", console=quiet_console())
    grid = LoopbackGrid(node_configs(small_prepared, tmp_path))
    flower_run(cfg, tmp_path / "flower", grid, node_timeout_s=300.0)
    assert grid.ttls and set(grid.ttls) == {300.0}  # every message expires with --node-timeout

    inprocess, flower = tmp_path / "inprocess", tmp_path / "flower"
    for which in ("final", "best"):
        assert_same_tensors(load_file(str(paths.shared_tensors_path(flower, which))),
                            load_file(str(paths.shared_tensors_path(inprocess, which))), which)
        for client in load_manifest(small_prepared).clients:
            site_run = paths.site_run_dir(tmp_path / f"site-{client}", flower.name)
            assert_same_tensors(load_file(str(paths.private_tensors_path(site_run, client, which))),
                                load_file(str(paths.private_tensors_path(inprocess, client, which))),
                                f"{client} {which}")
    for got, want in zip(rounds_of(flower), rounds_of(inprocess), strict=True):
        assert got["participants"] == want["participants"] and got["failed"] == want["failed"] == {}
        assert got.get("privacy") == want.get("privacy")
        for client, entry in want["clients"].items():
            for key in ("train_loss", "val", "n_train", "params_up"):
                assert got["clients"][client][key] == entry[key], (client, key)
    infos = [json.loads(paths.run_config_path(r).read_text()) for r in (flower, inprocess)]
    assert infos[0].get("privacy") == infos[1].get("privacy")
    for key in ("completed_rounds", "best_round", "privacy", f"best_mean_val_{cfg.select}"):
        assert infos[0]["result"].get(key) == infos[1]["result"].get(key), key
    assert ("privacy" in infos[0]) == (dp != "off")
    if dp == "dp-balanced":  # every site released its counts once, recorded alike by both engines
        balance = infos[0]["privacy"]["class_balance"]
        assert balance["mode"] == "private counts"
        assert all(len(s["released_counts"]) == 2 for s in balance["sites"].values())


# Where the ServerApp is interrupted, per method: after a round is logged but not checkpointed,
# while writing a checkpoint, after the sites trained, during the final writes.
# (An exception before round 1 is checkpointed removes the new RUN, so every point is after it.)
INTERRUPTS = {"duallora": ("federate.round-logged", 2), "fedlora": ("federate.checkpoint-write", 2),
              "ffalora": ("federate.trained", 2), "fedsa": ("federate.final-write", 1),
              "feddpa": ("federate.round-logged", 2)}


class Interrupt(Exception):
    """The server dies at a fault point (as the SIGKILL of tests/test_flower.py, in-process)."""


@pytest.mark.parametrize("method", FEDERATED)
def test_an_interrupted_flower_server_resumes_to_the_uninterrupted_run(small_prepared, tmp_path, monkeypatch,
                                                                      method):
    """For every federated method: a Flower server interrupted at a fault point, then resumed
    (`--resume`, the sites continuing from their own state files), ends where an uninterrupted
    Flower run ends: shared and private tensors, rounds.jsonl and run.json's result. (Real killed
    ServerApp processes: tests/test_flower.py.)"""
    assert set(INTERRUPTS) == set(FEDERATED)
    cfg = FederateConfig(data=str(small_prepared), method=method, **OPTIONS)
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    flower_run(cfg, reference, LoopbackGrid(node_configs(small_prepared, tmp_path / "ref")),
               node_timeout_s=300.0)

    point, nth = INTERRUPTS[method]
    seen = []

    def fault_point(name: str) -> None:
        seen.append(name)
        if seen.count(point) == nth and name == point:
            raise Interrupt(name)

    with monkeypatch.context() as patch:
        patch.setattr(rounds, "fault_point", fault_point)
        with pytest.raises(Interrupt):
            flower_run(cfg, out, LoopbackGrid(node_configs(small_prepared, tmp_path)), node_timeout_s=300.0)
    assert "result" not in json.loads(paths.run_config_path(out).read_text())
    flower_run(cfg, out, LoopbackGrid(node_configs(small_prepared, tmp_path)), node_timeout_s=300.0,
               resume=True)

    for which in ("final", "best"):
        assert_same_tensors(load_file(str(paths.shared_tensors_path(out, which))),
                            load_file(str(paths.shared_tensors_path(reference, which))), which)
        for client in load_manifest(small_prepared).clients:
            got = paths.private_tensors_path(paths.site_run_dir(tmp_path / f"site-{client}", out.name),
                                             client, which)
            want = paths.private_tensors_path(paths.site_run_dir(tmp_path / "ref" / f"site-{client}",
                                                                 reference.name), client, which)
            assert_same_tensors(load_file(str(got)), load_file(str(want)), f"{client} {which}")
    timeless = [[{k: v for k, v in r.items() if k != "wall_s"} for r in rounds_of(run)]
                for run in (out, reference)]
    assert timeless[0] == timeless[1]
    infos = [json.loads(paths.run_config_path(run).read_text()) for run in (out, reference)]
    assert infos[0]["config"] == infos[1]["config"] and infos[0]["result"] == infos[1]["result"]
