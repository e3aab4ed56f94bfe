"""A hospital that arrives after training: ``federate --holdout SITE`` trains without it (its
shard is not even present), ``adapt`` trains only its own adapted groups over the frozen shared
tensors, and ``evaluate`` shows the participation gap (zero-shot, after adapt, full member)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.atomic import sha256_file
from cmrfed.cli import cli
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.eval.evaluate_site import evaluate_site
from cmrfed.fed.adapt import adapt, newcomer_client, open_site
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.methods import METHODS, resolve_method
from cmrfed.fed.mixing import state_group
from cmrfed.fed.runinfo import load_run, load_shared
from cmrfed.model.classifier import param_group

NEW = "siemens"
FAST = {"rounds": 2, "local_epochs": 1, "batch_size": 8, "rank": 4, "lr": 5e-3}
VARIANTS = [*((m, "shared") for m in METHODS), ("duallora", "local")]


@pytest.fixture(scope="session")
def without_new_site(small_prepared, tmp_path_factory) -> Path:
    """The prepared data as the training sites hold it: the new site's shard is not there."""
    root = tmp_path_factory.mktemp("no-ge") / "prepared"
    shutil.copytree(small_prepared, root, ignore=shutil.ignore_patterns(f"{NEW}.h5", "cache"))
    assert not paths.shard_path(root, NEW).exists()
    return root


@pytest.fixture(scope="session")
def holdout_runs(without_new_site, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("holdout-runs")
    out = {}
    for method, head in VARIANTS:
        cfg = FederateConfig(data=str(without_new_site), method=method, head=head, holdout=NEW, **FAST)
        federate(cfg, root / f"{method}-{head}", device="cpu", console=quiet_console())
        out[(method, head)] = root / f"{method}-{head}"
    return out


def test_holdout_trains_without_ever_opening_that_shard(without_new_site, holdout_runs, tmp_path):
    # the control: without --holdout, the missing shard is an error
    with pytest.raises(DataError, match=NEW):
        federate(FederateConfig(data=str(without_new_site), **FAST), tmp_path / "all", device="cpu",
                 console=quiet_console())
    for run in holdout_runs.values():
        info = json.loads(paths.run_config_path(run).read_text())
        assert NEW not in info["clients"] and len(info["clients"]) == 3
        assert info["config"]["holdout"] == NEW
        rounds = [json.loads(line) for line in paths.rounds_log_path(run).read_text().splitlines()]
        assert all(NEW not in r["clients"] and NEW not in r["participants"] for r in rounds)
    # the pooled evaluation of a held-out run scores its members, still without that shard
    run = holdout_runs[("duallora", "shared")]
    summary = evaluate_run(run, n_boot=20, device="cpu", console=quiet_console())
    assert NEW not in summary.per_client and len(summary.per_client) == 3
    with pytest.raises(UsageError, match="--holdout"):
        federate(FederateConfig(data=str(without_new_site), holdout="nobody", **FAST), tmp_path / "x",
                 device="cpu", console=quiet_console())


@pytest.mark.parametrize(("method", "head"), VARIANTS)
def test_adapt_trains_only_the_new_sites_own_tensors_and_lowers_its_val_loss(
        holdout_runs, small_prepared, tmp_path, method, head):
    run = holdout_runs[(method, head)]
    spec = resolve_method(method, head)
    before = {p: sha256_file(p) for p in sorted(run.rglob("*")) if p.is_file()}
    # Execute
    summary = adapt(run, NEW, small_prepared, tmp_path / "adapted", epochs=3, device="cpu",
                    console=quiet_console())
    # Assert: the run is untouched; ADAPTED holds exactly the method's adapted groups
    assert {p: sha256_file(p) for p in sorted(run.rglob("*")) if p.is_file()} == before
    adapted = load_file(str(paths.private_tensors_path(tmp_path / "adapted", NEW)))
    # (and a method's kept state, FedDPA's reference representations, drawn afresh by the site)
    assert adapted and {state_group(k) for k in adapted} == spec.adapted | spec.kept
    assert spec.private <= spec.adapted | spec.kept
    # the adapted model differs from the zero-shot one in those tensors only
    info = load_run(run)
    run_model, base, _ = open_site(info, NEW, small_prepared, torch.device("cpu"), ("train", "val"))
    shared = load_shared(info, "best")
    zero_shot = newcomer_client(run_model, shared, base).state
    after = newcomer_client(run_model, shared, base, adapted).state
    changed = {k for k in after if not torch.equal(after[k], zero_shot[k])}
    assert changed and {state_group(k) for k in changed} <= spec.adapted | spec.kept
    for key, tensor in shared.items():  # the run's shared values, unless adapted
        if param_group(key) not in spec.adapted:
            assert torch.equal(after[key], tensor)
    record = json.loads(paths.adapt_record_path(tmp_path / "adapted").read_text())
    assert record["val_loss"] == summary.val_loss and len(record["val_loss"]) == 4
    # it kept its best epoch, one that lowered the validation loss, and that loss is the adapted model's
    assert record["best_epoch"] == summary.best_epoch >= 1, record["val_loss"]
    assert record["val_loss"][summary.best_epoch] == min(record["val_loss"]) < record["val_loss"][0]


def test_adapt_refuses_a_member_and_an_occupied_out(holdout_runs, small_prepared, tmp_path):
    run = holdout_runs[("duallora", "shared")]
    with pytest.raises(UsageError, match="trained in run"):
        adapt(run, "ge", small_prepared, tmp_path / "a", device="cpu", console=quiet_console())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        adapt(run, NEW, small_prepared, tmp_path / "busy", overwrite=True, device="cpu",
              console=quiet_console())
    assert (tmp_path / "busy" / "thesis.txt").read_text() == "keep me"


def test_participation_gap_zero_shot_adapted_and_member(holdout_runs, small_prepared, tmp_path):
    """The held-out site scored zero-shot and after adapt, merged with the members' own results,
    against the same site as a full member of a run that trained with it."""
    run = holdout_runs[("duallora", "shared")]
    member_run = tmp_path / "member"
    federate(FederateConfig(data=str(small_prepared), method="duallora", **FAST), member_run, device="cpu",
             console=quiet_console())
    evaluate_run(member_run, n_boot=30, device="cpu", console=quiet_console())
    runner = CliRunner()
    result = runner.invoke(cli, ["adapt", str(run), "--client", NEW, "--data", str(small_prepared),
                                 "--out", str(tmp_path / "adapted"), "--epochs", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    sent = []
    for client in json.loads(paths.run_config_path(run).read_text())["clients"]:
        sent.append(tmp_path / "sent" / client)
        evaluate_site(run, client, small_prepared, private=run, out=sent[-1], n_boot=30, device="cpu",
                      console=quiet_console())
    for name, private in (("zero-shot", None), ("adapted", tmp_path / "adapted")):
        sent.append(tmp_path / "sent" / name)
        args = ["evaluate", str(run), "--client", NEW, "--data", str(small_prepared), "--out", str(sent[-1]),
                "--n-boot", "30", "--device", "cpu"]
        result = runner.invoke(cli, args + (["--private", str(private)] if private else []))
        assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", str(run), "--merge", *map(str, sent),
                                 "--member-run", str(member_run)])
    assert result.exit_code == 0, result.output
    assert "participation gap" in result.output
    doc = json.loads(paths.metrics_path(run).read_text())
    assert set(doc["per_client"]) == {"philips", "ge", "canon"}
    assert set(doc["newcomers"][NEW]) == {"held-out", "adapted"}
    gap = doc["participation_gap"]["sites"][NEW]
    member = json.loads(paths.metrics_path(member_run).read_text())["per_client"][NEW]
    assert gap == {"held-out": doc["newcomers"][NEW]["held-out"]["balanced_accuracy"],
                   "adapted": doc["newcomers"][NEW]["adapted"]["balanced_accuracy"],
                   "member": member["balanced_accuracy"]}
    # adapted tensors belong to one round's shared tensors: another round is refused
    if json.loads(paths.run_config_path(run).read_text())["result"]["best_round"] != FAST["rounds"]:
        with pytest.raises(DataError, match="adapted on other shared tensors"):
            evaluate_site(run, NEW, small_prepared, private=tmp_path / "adapted", which="last",
                          out=tmp_path / "x", n_boot=30, device="cpu", console=quiet_console())
