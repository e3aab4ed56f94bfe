"""One duallora run over a loopback Flower federation, against the same run in-process.

The Flower run's ServerApp SIGKILLs itself after round 1 is logged (before its checkpoint), and
`cmrfed flower run --resume` (as the README documents it) finishes the run. Its final and best
shared tensors and every site's private tensors must equal the in-process engine's bit for bit, its
run.json and rounds.jsonl must record the same run, no private tensor may ever reach the server, and
``evaluate`` must read the RUN folder (once the sites' private tensors are copied in) exactly as it
reads an in-process one. Its own module: the tests share one costly fixture, so they share one
pytest-xdist worker (tests/conftest.py), while tests/test_flower.py's spread over the others.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'cmrfed[flower]'")

import torch
from conftest import quiet_console
from flower_processes import RUN_TIMEOUT_S, Federation, wait_until
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.methods import resolve_method
from cmrfed.model.classifier import param_group

pytestmark = pytest.mark.flower


# A real SIGKILL of the ServerApp process after round 1 is logged but not checkpointed: the resumed
# run redoes round 1 (every federated method is interrupted at its own point and resumed over the
# same apps in tests/test_engines.py; each ServerApp here costs a Flower run of real processes).
KILL = "federate.round-logged:1"
ROUNDS = 2


@pytest.fixture(scope="session")
def runs(flower_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same duallora run twice: in-process, and over a loopback Flower federation whose
    ServerApp SIGKILLs itself after round 1 is logged (before its checkpoint) and which
    `cmrfed flower run --resume` then finishes. One Flower run proves both that the Flower engine
    trains what the in-process one trains and that a resumed Flower run is the uninterrupted one."""
    root = tmp_path_factory.mktemp("flower-runs")
    options = {"method": "duallora", "rounds": ROUNDS, "rank": 2, "seed": 4}
    cfg = FederateConfig(data=str(flower_cohort), backbone="tiny", **options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every Flower process runs (OMP_NUM_THREADS=1): bitwise equal
    try:
        federate(cfg, root / "inprocess", device="cpu", console=quiet_console())
    finally:
        torch.set_num_threads(threads)
    federation = Federation(flower_cohort, root / "federation")
    out = root / "flower"
    args = [f"--{k}={v}" for k, v in options.items()] + ["--backbone=tiny", "--node-timeout", "120"]
    log = root / "killed.log"
    try:
        with log.open("wb") as handle:
            killed = subprocess.Popen(federation.command(out, *args), stdout=handle, stderr=subprocess.STDOUT,
                                      env=dict(federation.processes.env, CMRFED_FAULT=KILL),
                                      start_new_session=True)
        wait_until(lambda: paths.run_config_path(out).exists(), "the killed run to start")
        wait_until(lambda: not federation.serverapps(), "the ServerApp to kill itself")
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
    evaluate_run(flower, split="val", n_boot=20, device="cpu", console=quiet_console())
    evaluate_run(inprocess, split="val", n_boot=20, device="cpu", console=quiet_console())
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
