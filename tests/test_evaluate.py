"""``evaluate`` on a real run: own-model, cross-site and shared-only metrics, checked against an
independent computation from the written predictions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import quiet_console
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from cmrfed import paths
from cmrfed.errors import DataError
from cmrfed.eval.evaluate_run import PREDICTION_COLUMNS, evaluate_run
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate


@pytest.fixture(scope="session")
def finished_run(small_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dual"
    cfg = FederateConfig(data=str(small_prepared), method="duallora", rounds=2, rank=4, lr=5e-3)
    federate(cfg, out, device="cpu", console=quiet_console())
    return out


def read_predictions(run):
    with paths.predictions_path(run).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predictions_and_metrics_agree_with_an_independent_computation(finished_run):
    evaluate_run(finished_run, n_boot=200, device="cpu", console=quiet_console())
    rows = read_predictions(finished_run)
    assert tuple(rows[0]) == PREDICTION_COLUMNS
    metrics = json.loads(paths.metrics_path(finished_run).read_text())
    clients = list(metrics["per_client"])
    assert clients == ["siemens", "philips", "ge", "canon"]
    n_test = sum(len(v) for v in metrics["test_subjects"].values())
    # each client's model and the shared-only model, on every client's test split
    assert len(rows) == (len(clients) + 1) * n_test
    for client in clients:
        own = [r for r in rows if r["model"] == client and r["client"] == client]
        y = np.array([int(r["label"]) for r in own])
        p = np.array([float(r["probability"]) for r in own])
        pred = np.array([int(r["prediction"]) for r in own])
        assert np.array_equal(pred, (p >= 0.5).astype(int))
        expected = balanced_accuracy_score(y, pred)
        assert metrics["per_client"][client]["balanced_accuracy"] == pytest.approx(expected)
        assert metrics["per_client"][client]["auc"] == pytest.approx(roc_auc_score(y, p))
        lo, hi = metrics["per_client"][client]["ci95"]["balanced_accuracy"]
        assert lo <= expected <= hi
        # the diagonal of the cross-site matrix is the client's own result
        assert metrics["cross_site"][client][client]["balanced_accuracy"] == pytest.approx(expected)
        assert set(metrics["cross_site"][client]) == set(clients)
    assert set(metrics["shared_only"]) == set(clients)
    macro = np.mean([metrics["per_client"][c]["balanced_accuracy"] for c in clients])
    assert metrics["macro"]["balanced_accuracy"] == pytest.approx(macro)
    assert metrics["split"] == "test" and metrics["round"] == "best"


def test_private_tensors_change_the_model_a_site_evaluates(finished_run):
    """DualLoRA sites differ only by their local LoRA: their probabilities on the same data
    must differ from each other and from the shared-only model."""
    evaluate_run(finished_run, n_boot=50, device="cpu", console=quiet_console())
    rows = read_predictions(finished_run)
    on_ge = {m: [float(r["probability"]) for r in rows if r["client"] == "ge" and r["model"] == m]
             for m in ("ge", "siemens", "shared")}
    assert on_ge["ge"] != on_ge["siemens"]
    assert on_ge["ge"] != on_ge["shared"]


def test_youden_threshold_and_val_split(finished_run):
    evaluate_run(finished_run, split="val", which="last", threshold="youden-val", n_boot=50,
                 device="cpu", console=quiet_console())
    metrics = json.loads(paths.metrics_path(finished_run).read_text())
    assert metrics["split"] == "val" and metrics["round"] == "last"
    thresholds = metrics["threshold"]["per_model"]
    assert set(thresholds) == {"siemens", "philips", "ge", "canon", "shared"}
    rows = read_predictions(finished_run)
    for row in rows:
        assert int(row["prediction"]) == int(float(row["probability"]) >= thresholds[row["model"]])


def test_unfinished_or_missing_runs_are_refused(finished_run, tmp_path):
    with pytest.raises(DataError, match=r"no run\.json"):
        evaluate_run(tmp_path / "nothing", console=quiet_console())
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    info = json.loads(paths.run_config_path(finished_run).read_text())
    info.pop("result")
    paths.run_config_path(unfinished).write_text(json.dumps(info))
    with pytest.raises(DataError, match="did not finish"):
        evaluate_run(unfinished, console=quiet_console())
