"""``federate --resume`` after a SIGKILL at every kill point, for every row of the method table.

Each case kills a real ``cmrfed federate`` process (tests/cli_process.py) at deterministic points
(``CMRFED_FAULT``, see cmrfed/faults.py), one after the other, each time resuming what the previous
kill left:

1. a fresh run, killed in the middle of writing the checkpoint of round 2;
2. ``--resume``, killed at its first local training step (round 2, after a checkpoint);
3. ``--resume``, killed right after round 3's line is appended to rounds.jsonl (not checkpointed);
4. ``--resume``, killed during the final writes (after shared.safetensors, before the private files);
5. ``--resume`` to the end.

The result must equal an uninterrupted run: every tensor file (final and best), every rounds.jsonl
field except the wall time, and the evaluation's metrics and predictions.

The runs pin CineMA's training recipe (augmented views, warm-up + cosine lr, label smoothing,
selection on MCC) rather than take the defaults, so resume keeps being proven with the recipe on
whatever the defaults become (this absorbed the in-process test_resume_recipe.py, whose interrupt
was weaker than these kills).

The ``--head local`` variant of every federated method, and every method under ``--precision
bf16``, run a shorter chain: a fresh run killed after round 2's line is logged but before its
checkpoint, so the resumed run recomputes round 2 from the checkpoint (the private head restored;
the bf16 forward and its cache just as deterministic); then ``--resume`` to the end. The kill points
themselves are the one round loop's, proven on every method by the full chain above.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from cli_process import run_cmrfed
from conftest import assert_same_tensors, quiet_console, rounds_without_time

from cmrfed import paths
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.faults import ENV
from cmrfed.fed import inprocess
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS

ROUNDS = 3
OPTIONS = {"rounds": ROUNDS, "local_epochs": 1, "batch_size": 8, "rank": 2, "lr": 5e-3, "seed": 7,
           # CineMA's recipe, pinned
           "augment": "cinema", "augment_views": 2, "schedule": "cosine", "warmup_rounds": 1.0,
           "label_smoothing": 0.1, "select": "mcc"}

# (method, head, precision): every method of the table, the ``--head local`` variant of every
# federated one, and every method again under bf16
CASES = [(name, "shared", "fp32") for name in METHODS] + [
    (name, "local", "fp32") for name, spec in METHODS.items() if spec.federated
] + [(name, "shared", "bf16") for name in METHODS]

KILL_CHAIN = (
    ("federate.checkpoint-write:2", False),
    ("federate.train-step:1", True),
    ("federate.round-logged:2", True),
    ("federate.final-write:1", True),
)
SHORT_CHAIN = (("federate.round-logged:2", False),)


def _chain(head: str, precision: str) -> tuple[tuple[str, bool], ...]:
    return KILL_CHAIN if (head, precision) == ("shared", "fp32") else SHORT_CHAIN


def _cli_args(prepared: Path, out: Path, method: str, head: str, precision: str) -> list[str]:
    args = ["federate", "--data", str(prepared), "--method", method, "--head", head,
            "--precision", precision, "--device", "cpu", "--out", str(out)]
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _evaluation(run: Path) -> tuple[dict, str]:
    evaluate_run(run, n_boot=20, device="cpu", console=quiet_console())
    eval_dir = run / "eval"
    return json.loads((eval_dir / "metrics.json").read_text()), (eval_dir / "predictions.csv").read_text()


@pytest.mark.parametrize(("method", "head", "precision"), CASES,
                         ids=[f"{m}-head_{h}-{p}" for m, h, p in CASES])
def test_resume_after_kills_at_every_point_equals_an_uninterrupted_run(small_prepared, tmp_path,
                                                                       method, head, precision):
    reference = tmp_path / "reference"
    cfg = FederateConfig(data=str(small_prepared), method=method, head=head, precision=precision, **OPTIONS)
    inprocess.federate(cfg, reference, device="cpu", console=quiet_console())

    killed = tmp_path / "killed"
    for fault, resume in _chain(head, precision):
        args = _cli_args(small_prepared, killed, method, head, precision) + (["--resume"] if resume else [])
        proc = run_cmrfed(args, env={**os.environ, ENV: fault, "COLUMNS": "120"}, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (
            f"expected the run to be killed at {fault}; it exited {proc.returncode}:\n{proc.stderr}"
        )
    inprocess.federate(cfg, killed, device="cpu", resume=True, console=quiet_console())

    assert_same_tensors(reference, killed)
    records = rounds_without_time(reference)
    assert rounds_without_time(killed) == records
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert all(r["select"] == "mcc" and "mean_val_mcc" in r and "mean_val_balanced_accuracy" in r
               for r in records)
    run_info = [json.loads(paths.run_config_path(r).read_text()) for r in (reference, killed)]
    assert run_info[0]["config"] == run_info[1]["config"]
    assert run_info[0]["config"]["precision"] == precision
    assert run_info[0]["result"] == run_info[1]["result"]
    assert run_info[0]["result"]["selected_by"] == "mcc" and "best_mean_val_balanced_accuracy" in run_info[0][
        "result"]
    assert _evaluation(killed) == _evaluation(reference)
