"""Site-by-site evaluation: each site scores its own model on its own data with only run.json,
the shared tensors, its private tensors and its own shard; the merge of those results equals the
pooled ``cmrfed evaluate RUN`` bit for bit (every prediction, every metric, every bootstrap CI)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.cli import cli
from cmrfed.errors import DataError, UsageError
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.eval.evaluate_site import evaluate_site, merge_evaluations
from cmrfed.eval.scoring import SHARED_MODEL
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.methods import METHODS

FAST = {"rounds": 2, "local_epochs": 1, "batch_size": 8, "rank": 4, "lr": 5e-3}
N_BOOT = 60
# what only the pooled evaluation can have (each site's model on other sites' data), and provenance
POOLED_ONLY = ("cross_site", "created_by")


@pytest.fixture(scope="session")
def runs(small_prepared, tmp_path_factory):
    """One finished in-process run per method (and DualLoRA with a private head)."""
    root = tmp_path_factory.mktemp("site-eval-runs")
    out = {}
    for name, options in [*((m, {"method": m}) for m in METHODS),
                          ("duallora-headlocal", {"method": "duallora", "head": "local"})]:
        cfg = FederateConfig(data=str(small_prepared), **FAST, **options)
        federate(cfg, root / name, device="cpu", console=quiet_console())
        out[name] = root / name
    return out


def clients_of(run: Path) -> list[str]:
    return list(json.loads(paths.run_config_path(run).read_text())["clients"])


def site_copy(run: Path, prepared: Path, client: str, root: Path) -> tuple[Path, Path, Path]:
    """What one site holds: a copy of run.json and the shared tensors, its own private tensors,
    and a PREPARED folder with only the manifest and its own shard."""
    run_copy, private, data = root / "run", root / "private", root / "prepared"
    for which in ("final", "best"):
        for src, dst in ((paths.shared_tensors_path(run, which), paths.shared_tensors_path(run_copy, which)),
                         (paths.private_tensors_path(run, client, which),
                          paths.private_tensors_path(private, client, which))):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.copy2(paths.run_config_path(run), paths.run_config_path(run_copy))
    paths.shard_path(data, client).parent.mkdir(parents=True)
    shutil.copy2(paths.manifest_path(prepared), paths.manifest_path(data))
    shutil.copy2(paths.shard_path(prepared, client), paths.shard_path(data, client))
    return run_copy, private, data


def pooled_and_merged(run: Path, prepared: Path, tmp_path: Path, threshold: str = "0.5",
                      metrics_only: tuple[str, ...] = ()) -> tuple[dict, list, dict, list]:
    evaluate_run(run, threshold=threshold, n_boot=N_BOOT, device="cpu", console=quiet_console())
    pooled_doc = json.loads(paths.metrics_path(run).read_text())
    pooled_rows = read_rows(paths.predictions_path(run))
    site_evals = []
    for client in clients_of(run):
        run_copy, private, data = site_copy(run, prepared, client, tmp_path / client)
        out = tmp_path / "sent" / client
        evaluate_site(run_copy, client, data, private=private, out=out, threshold=threshold,
                      n_boot=N_BOOT, metrics_only=client in metrics_only, device="cpu",
                      console=quiet_console())
        site_evals.append(out)
    merged_run = tmp_path / "merged-run"
    shutil.copytree(run, merged_run, ignore=shutil.ignore_patterns("eval"))
    merge_evaluations(merged_run, list(reversed(site_evals)), console=quiet_console())
    merged_doc = json.loads(paths.metrics_path(merged_run).read_text())
    return pooled_doc, pooled_rows, merged_doc, read_rows(paths.predictions_path(merged_run))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("method", [*METHODS, "duallora-headlocal"])
def test_merged_site_evaluations_equal_the_pooled_evaluation(runs, small_prepared, tmp_path, method):
    # Execute: pooled in one process; site by site from what each site alone holds, then merged
    # (given in reverse order: the merge follows the run's site order)
    pooled, pooled_rows, merged, merged_rows = pooled_and_merged(runs[method], small_prepared, tmp_path)
    # Assert: every field but the cross-site matrix, which needs every site's private model
    assert merged["cross_site"] is None and pooled["cross_site"]
    assert {k: v for k, v in merged.items() if k not in POOLED_ONLY} == \
        {k: v for k, v in pooled.items() if k not in POOLED_ONLY}
    assert merged["pooled"]["ci95"] == pooled["pooled"]["ci95"]
    assert merged["pooled"]["clients"] == clients_of(runs[method])
    # the rows are exactly the pooled rows of each site's own model and the shared-only model
    own_or_shared = [r for r in pooled_rows if r["model"] in (r["client"], SHARED_MODEL)]
    assert merged_rows == own_or_shared
    assert len(pooled_rows) > len(merged_rows) > 0
    has_shared = bool(METHODS[method.split("-")[0]].shared)
    assert any(r["model"] == SHARED_MODEL for r in merged_rows) == has_shared


def test_youden_thresholds_merge_exactly(runs, small_prepared, tmp_path):
    pooled, pooled_rows, merged, merged_rows = pooled_and_merged(runs["duallora"], small_prepared,
                                                                 tmp_path, threshold="youden-val")
    assert merged["threshold"] == pooled["threshold"]
    assert merged["per_client"] == pooled["per_client"] and merged["pooled"] == pooled["pooled"]
    assert merged["shared_only"] == pooled["shared_only"]
    assert merged_rows == [r for r in pooled_rows if r["model"] in (r["client"], SHARED_MODEL)]


def test_a_site_may_send_metrics_only(runs, small_prepared, tmp_path):
    pooled, _, merged, merged_rows = pooled_and_merged(runs["duallora"], small_prepared, tmp_path,
                                                       metrics_only=("ge",))
    assert not (tmp_path / "sent" / "ge" / "predictions.csv").exists()
    assert "ge" not in {r["client"] for r in merged_rows}
    assert merged["per_client"] == pooled["per_client"]
    assert merged["macro"] == pooled["macro"]
    assert merged["shared_only"] == pooled["shared_only"]
    assert merged["sources"]["ge"] == "metrics"
    others = [c for c in clients_of(runs["duallora"]) if c != "ge"]
    assert merged["pooled"]["clients"] == others
    assert "ge" in merged["pooled"]["note_sites"]
    assert merged["test_subjects"]["ge"] is None


def test_merge_refuses_mismatched_or_missing_sites(runs, small_prepared, tmp_path):
    run = runs["duallora"]
    sent = {}
    for client in clients_of(run):
        run_copy, private, data = site_copy(run, small_prepared, client, tmp_path / client)
        sent[client] = tmp_path / "sent" / client
        evaluate_site(run_copy, client, data, private=private, out=sent[client], n_boot=N_BOOT,
                      device="cpu", console=quiet_console())
    with pytest.raises(DataError, match="one member evaluation per site"):
        merge_evaluations(run, [sent["ge"], sent["canon"]], console=quiet_console())
    # a site that evaluated the last round while the others evaluated the best one
    run_copy, private, data = site_copy(run, small_prepared, "ge", tmp_path / "ge-last")
    evaluate_site(run_copy, "ge", data, private=private, out=tmp_path / "ge-last-eval", which="last",
                  n_boot=N_BOOT, device="cpu", console=quiet_console())
    if json.loads(paths.run_config_path(run).read_text())["result"]["best_round"] != 2:
        with pytest.raises(DataError, match="differ in run tensors"):
            merge_evaluations(run, [*(v for k, v in sent.items() if k != "ge"), tmp_path / "ge-last-eval"],
                              console=quiet_console())
    # a member of a method with private tensors must bring them
    with pytest.raises(UsageError, match="--private"):
        evaluate_site(run_copy, "ge", data, n_boot=N_BOOT, device="cpu", console=quiet_console())


def test_cli_modes_and_their_options(runs, small_prepared, tmp_path):
    run = runs["fedlora"]  # no private tensors: a member needs no --private
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", str(run), "--merge"])
    assert result.exit_code == 2 and "SITE_EVAL" in result.output
    result = runner.invoke(cli, ["evaluate", str(run), "--client", "ge"])
    assert result.exit_code == 2 and "--data" in result.output
    result = runner.invoke(cli, ["evaluate", str(run), "--metrics-only"])
    assert result.exit_code == 2 and "--client" in result.output
    result = runner.invoke(cli, ["evaluate", str(run), "--client", "ge", "--data", str(small_prepared),
                                 "--metrics-only", "--threshold", "youden-val"])
    assert result.exit_code == 2 and "--metrics-only needs --threshold 0.5" in result.output
    out = tmp_path / "ge-eval"
    result = runner.invoke(cli, ["evaluate", str(run), "--client", "ge", "--data", str(small_prepared),
                                 "--out", str(out), "--n-boot", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads(paths.site_eval_record_path(out).read_text())
    assert record["participation"] == "member" and record["client"] == "ge"


def test_a_site_sends_metrics_and_predictions_only(runs, small_prepared, tmp_path):
    """The wire check of site-by-site evaluation: what leaves a site names no tensor, and the
    merge refuses a folder that carries anything else."""
    run = runs["duallora"]
    run_copy, private, data = site_copy(run, small_prepared, "ge", tmp_path / "ge")
    sent = tmp_path / "sent-ge"
    evaluate_site(run_copy, "ge", data, private=private, out=sent, n_boot=N_BOOT, device="cpu",
                  console=quiet_console())
    assert sorted(p.name for p in sent.iterdir()) == ["predictions.csv", "site_eval.json"]
    text = "".join(p.read_text() for p in sent.iterdir())
    tensor_names = set(load_file(str(paths.private_tensors_path(run, "ge")))) | \
        set(load_file(str(paths.shared_tensors_path(run))))
    assert tensor_names and not [name for name in tensor_names if name in text]
    assert "adapters" not in text
    shutil.copy2(paths.private_tensors_path(run, "ge"), sent / "private.safetensors")
    with pytest.raises(DataError, match="sends only"):
        merge_evaluations(run, [sent], console=quiet_console())
