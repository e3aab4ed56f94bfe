"""Per-round site sampling (``--sites-per-round K``): which sites train is a pure function of the
run seed and the round; FedAvg is over those that trained; the others keep their state and
still receive the aggregate; an interrupted run resumes to exactly the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_SHAPE, quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.errors import UsageError
from cmrfed.fed import inprocess
from cmrfed.fed.client import Client
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS
from cmrfed.fed.sampling import participants
from cmrfed.fed.strategy import weighted_average
from cmrfed.fed.task import build_run_model
from cmrfed.fed.wire import decode
from cmrfed.fed.wire import encode as real_encode
from cmrfed.model.classifier import param_group

SITES = ("siemens", "philips", "ge", "canon")
FAST = {"local_epochs": 1, "batch_size": 8, "rank": 4, "lr": 5e-3, "sites_per_round": 2}
SAMPLED = [m for m, spec in METHODS.items() if not spec.pooled]


def test_participants_are_seeded_by_run_seed_and_round_only():
    draws = {r: participants(SITES, 2, seed=7, round_index=r) for r in range(1, 21)}
    assert draws == {r: participants(list(SITES), 2, seed=7, round_index=r) for r in range(1, 21)}
    for chosen in draws.values():
        assert len(chosen) == 2 and len(set(chosen)) == 2
        assert chosen == [s for s in SITES if s in chosen]  # in the run's site order
    assert len({tuple(c) for c in draws.values()}) > 1  # rounds differ
    assert draws != {r: participants(SITES, 2, seed=8, round_index=r) for r in range(1, 21)}
    # every site is asked sometimes
    assert {s for c in draws.values() for s in c} == set(SITES)
    assert participants(SITES, None, 7, 1) == list(SITES) == participants(SITES, 4, 7, 1)
    with pytest.raises(UsageError, match="--sites-per-round"):
        FederateConfig(data="", sites_per_round=0)
    with pytest.raises(UsageError, match="--sites-per-round"):
        FederateConfig(data="", method="central", sites_per_round=2)


def _rounds(run: Path) -> list[dict]:
    lines = paths.rounds_log_path(run).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), a


@pytest.mark.parametrize("method", SAMPLED)
def test_site_sampling_is_seeded_and_resumable(small_prepared, tmp_path, monkeypatch, method):
    cfg = FederateConfig(data=str(small_prepared), method=method, rounds=3, seed=4, **FAST)
    inprocess.federate(cfg, tmp_path / "reference", device="cpu", console=quiet_console())
    records = _rounds(tmp_path / "reference")
    for record in records:
        asked = participants(SITES, 2, cfg.seed, record["round"])
        assert record["participants"] == asked
        for site, entry in record["clients"].items():
            assert (entry["train_loss"] is None) == (site not in asked)  # NaN is written as null
            assert (entry["bytes_up"] > 0) == (site in asked and METHODS[method].federated)
            assert (entry["bytes_down"] > 0) == METHODS[method].federated  # every site gets it

    # a crash during round 3's local training, after round 2 was checkpointed
    real_fit = Client.fit

    def crash_in_round_3(self, model, round_index, device):
        if round_index == 3:
            raise RuntimeError("the process died")
        return real_fit(self, model, round_index, device)

    monkeypatch.setattr(Client, "fit", crash_in_round_3)
    with pytest.raises(RuntimeError, match="died"):
        inprocess.federate(cfg, tmp_path / "resumed", device="cpu", console=quiet_console())
    monkeypatch.setattr(Client, "fit", real_fit)
    inprocess.federate(cfg, tmp_path / "resumed", device="cpu", resume=True, console=quiet_console())
    assert _rounds(tmp_path / "resumed") == records
    for which in ("final", "best"):
        _same_tensors(paths.shared_tensors_path(tmp_path / "reference", which),
                      paths.shared_tensors_path(tmp_path / "resumed", which))
        for site in SITES:
            _same_tensors(paths.private_tensors_path(tmp_path / "reference", site, which),
                          paths.private_tensors_path(tmp_path / "resumed", site, which))


@pytest.mark.parametrize("method", SAMPLED)
def test_fedavg_is_over_those_that_trained_and_the_others_keep_their_state(small_prepared, tmp_path,
                                                                           monkeypatch, method):
    payloads: list[bytes] = []

    def spy(state):
        payloads.append(real_encode(state))
        return payloads[-1]

    monkeypatch.setattr(inprocess, "encode", spy)
    # a constant lr: one round of the default warm-up starts at lr 0, and a site of one batch
    # would then train nothing, which is not what this test is about
    cfg = FederateConfig(data=str(small_prepared), method=method, rounds=1, seed=4, schedule="constant",
                         **FAST)
    inprocess.federate(cfg, tmp_path / "run", device="cpu", console=quiet_console())
    asked = participants(SITES, 2, cfg.seed, 1)
    info = json.loads(paths.run_config_path(tmp_path / "run").read_text())
    spec = METHODS[method]
    if spec.federated:  # the uploads of the two that trained, then the one aggregate sent down
        assert len(payloads) == len(asked) + 1
        ups = [decode(p) for p in payloads[:len(asked)]]
        expected = weighted_average(ups, [info["clients"][s]["n_train"] for s in asked])
        got = load_file(str(paths.shared_tensors_path(tmp_path / "run")))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    # a site that was not asked still holds its seeded initial private tensors
    initial = build_run_model(cfg, SMALL_SHAPE).initial_state
    for site in SITES:
        private = load_file(str(paths.private_tensors_path(tmp_path / "run", site)))
        assert {param_group(k) for k in private} == set(spec.private) or not spec.private
        untouched = all(torch.equal(t, initial[k]) for k, t in private.items())
        if private and site not in asked:
            assert untouched
        if private and site in asked:
            assert not untouched
