"""``federate --resume`` after a SIGKILL at every kill point, for every row of the method table.

Each case kills a real ``cmrfed federate`` subprocess at deterministic points (``CMRFED_FAULT``,
see cmrfed/faults.py), one after the other, each time resuming what the previous kill left:

1. a fresh run, killed in the middle of writing the checkpoint of round 2;
2. ``--resume``, killed at its first local training step (round 2, after a checkpoint);
3. ``--resume``, killed right after round 3's line is appended to rounds.jsonl (not checkpointed);
4. ``--resume``, killed during the final writes (after shared.safetensors, before the private files);
5. ``--resume`` to the end.

The result must equal an uninterrupted run: every tensor file (final and best), every rounds.jsonl
field except the wall time, and the evaluation's metrics and predictions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.faults import ENV
from cmrfed.fed import inprocess
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS

ROUNDS = 3
OPTIONS = {"rounds": ROUNDS, "local_epochs": 1, "batch_size": 8, "rank": 2, "lr": 5e-3, "seed": 7}

# (method, head): every method of the table, and the ``--head local`` variant of every federated one
CASES = [(name, "shared") for name in METHODS] + [
    (name, "local") for name, spec in METHODS.items() if spec.federated
]

KILL_CHAIN = (
    ("federate.checkpoint-write:2", False),
    ("federate.train-step:1", True),
    ("federate.round-logged:2", True),
    ("federate.final-write:1", True),
)


def _cli_args(prepared: Path, out: Path, method: str, head: str) -> list[str]:
    args = ["federate", "--data", str(prepared), "--method", method, "--head", head,
            "--device", "cpu", "--out", str(out)]
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _tensor_files(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted(p for p in run.rglob("*.safetensors")
                   if paths.checkpoint_dir(run) not in p.parents and ".tmp-" not in str(p))
    return {str(p.relative_to(run)): load_file(str(p)) for p in files}


def _rounds_without_time(run: Path) -> list[dict]:
    records = [json.loads(line) for line in paths.rounds_log_path(run).read_text().splitlines()]
    for record in records:
        record.pop("wall_s")
    return records


def _evaluation(run: Path) -> tuple[dict, str]:
    evaluate_run(run, n_boot=20, device="cpu", console=quiet_console())
    eval_dir = run / "eval"
    return json.loads((eval_dir / "metrics.json").read_text()), (eval_dir / "predictions.csv").read_text()


@pytest.mark.parametrize(("method", "head"), CASES, ids=[f"{m}-head_{h}" for m, h in CASES])
def test_resume_after_kills_at_every_point_equals_an_uninterrupted_run(small_prepared, tmp_path,
                                                                       method, head):
    reference = tmp_path / "reference"
    cfg = FederateConfig(data=str(small_prepared), method=method, head=head, **OPTIONS)
    inprocess.federate(cfg, reference, device="cpu", console=quiet_console())

    killed = tmp_path / "killed"
    for fault, resume in KILL_CHAIN:
        command = [sys.executable, "-m", "cmrfed.cli", *_cli_args(small_prepared, killed, method, head)]
        if resume:
            command.append("--resume")
        proc = subprocess.run(command, env={**os.environ, ENV: fault, "COLUMNS": "120"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (
            f"expected the run to be killed at {fault}; it exited {proc.returncode}:\n{proc.stderr}"
        )
    inprocess.federate(cfg, killed, device="cpu", resume=True, console=quiet_console())

    expected, got = _tensor_files(reference), _tensor_files(killed)
    assert expected.keys() == got.keys()
    for name, tensors in expected.items():
        assert tensors.keys() == got[name].keys(), name
        assert all(torch.equal(tensors[k], got[name][k]) for k in tensors), name
    assert _rounds_without_time(killed) == _rounds_without_time(reference)
    run_info = [json.loads(paths.run_config_path(r).read_text()) for r in (reference, killed)]
    assert run_info[0]["config"] == run_info[1]["config"]
    assert run_info[0]["result"] == run_info[1]["result"]
    assert _evaluation(killed) == _evaluation(reference)
