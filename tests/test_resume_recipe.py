"""Resume stays bit-identical with CineMA's recipe on (augmented views, warm-up + cosine lr, label
smoothing, selection on MCC), for every method of the table.

The run is interrupted in-process: the checkpoint write of round 2 raises (as a kill between the
rounds.jsonl line and the checkpoint would), then ``--resume`` continues from round 1. Real
SIGKILLs at every kill point are in tests/test_resume_matrix.py, which runs the CLI defaults (this
recipe); this test pins the recipe's options so it keeps testing them whatever the defaults.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.fed import inprocess, rounds
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS


class Crash(Exception):
    """Stands in for the process dying."""


def tensors(run, which):
    out = {"shared": load_file(str(paths.shared_tensors_path(run, which)))}
    info = json.loads(paths.run_config_path(run).read_text())
    for client in info["clients"]:
        out[client] = load_file(str(paths.private_tensors_path(run, client, which)))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_with_augmentation_and_schedule_is_bit_identical(small_prepared, tmp_path, monkeypatch,
                                                                method):
    cfg = FederateConfig(data=str(small_prepared), method=method, rounds=3, rank=4, batch_size=8,
                         lr=2e-3, augment="cinema", augment_views=2, schedule="cosine",
                         warmup_rounds=1.0, label_smoothing=0.1, select="mcc",
                         cache=method != "central-full", seed=4)
    reference = tmp_path / "reference"
    inprocess.federate(cfg, reference, device="cpu", console=quiet_console())

    real = rounds._write_checkpoint

    def crash_at_round_2(run, progress, last, best):
        if progress.round == 2:
            raise Crash
        real(run, progress, last, best)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(rounds, "_write_checkpoint", crash_at_round_2)
    with pytest.raises(Crash):
        inprocess.federate(cfg, interrupted, device="cpu", console=quiet_console())
    monkeypatch.setattr(rounds, "_write_checkpoint", real)
    assert rounds.read_checkpoint(interrupted)[0].round == 1
    inprocess.federate(cfg, interrupted, device="cpu", resume=True, console=quiet_console())

    for which in ("final", "best"):
        a, b = tensors(reference, which), tensors(interrupted, which)
        assert a.keys() == b.keys()
        for owner in a:
            assert a[owner].keys() == b[owner].keys(), (which, owner)
            assert all(torch.equal(a[owner][k], b[owner][k]) for k in a[owner]), (which, owner)
    lines = [[json.loads(ln) for ln in paths.rounds_log_path(run).read_text().splitlines()]
             for run in (reference, interrupted)]
    assert [r["round"] for r in lines[1]] == [1, 2, 3]
    for ra, rb in zip(*lines, strict=True):
        assert ra["select"] == "mcc" and "mean_val_mcc" in ra and "mean_val_balanced_accuracy" in ra
        for client in ra["clients"]:
            assert ra["clients"][client]["train_loss"] == rb["clients"][client]["train_loss"]
            assert ra["clients"][client]["val"] == rb["clients"][client]["val"]
    result = [json.loads(paths.run_config_path(run).read_text())["result"]
              for run in (reference, interrupted)]
    assert result[0]["best_round"] == result[1]["best_round"]
    assert result[0]["selected_by"] == "mcc" and "best_mean_val_balanced_accuracy" in result[0]
