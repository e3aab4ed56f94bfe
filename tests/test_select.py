"""Model selection on a chosen validation metric, and run.json files from before the recipe."""

from __future__ import annotations

import json

import pytest

from cmrfed import paths
from cmrfed.errors import UsageError
from cmrfed.fed.config import RECIPE_BEFORE_OPTIONS, FederateConfig
from cmrfed.fed.runlog import has_score, round_record, selection_score, write_result


def entry(balanced: float, mcc: float) -> dict:
    return {"train_loss": 0.5, "val": {"balanced_accuracy": balanced, "mcc": mcc}, "bytes_up": 0,
            "bytes_down": 0, "params_up": 0, "params_down": 0}


def test_records_keep_balanced_accuracy_and_add_the_selected_metric():
    clients = {"a": entry(0.8, 0.6), "b": entry(0.6, float("nan"))}
    record = round_record(3, clients, 1.0, select="mcc")
    assert record["mean_val_balanced_accuracy"] == pytest.approx(0.7)
    # a site predicting one class for everyone has an undefined MCC: chance level, 0 (sklearn's)
    assert record["mean_val_mcc"] == pytest.approx(0.3)
    assert record["select"] == "mcc" and selection_score(record) == pytest.approx(0.3)
    legacy = round_record(3, clients, 1.0)
    assert legacy["select"] == "balanced_accuracy" and selection_score(legacy) == pytest.approx(0.7)
    old_line = {"round": 1, "clients": clients, "mean_val_balanced_accuracy": 0.55, "wall_s": 1.0}
    assert selection_score(old_line) == 0.55 and has_score(old_line)
    assert not has_score(round_record(1, {"a": {**entry(0, 0), "val": {}}}, 1.0, select="mcc"))


def test_the_result_names_the_selected_metric_and_keeps_the_best_rounds_balanced_accuracy(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    paths.run_config_path(run).write_text(json.dumps({"config": {}}))
    lines = [round_record(r, {"a": entry(b, m)}, 1.0, select="mcc") for r, b, m in
             ((1, 0.9, 0.1), (2, 0.7, 0.5))]
    paths.rounds_log_path(run).write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_result(run, 2, 2, 0.5, 10, 20, select="mcc")
    result = json.loads(paths.run_config_path(run).read_text())["result"]
    assert result["selected_by"] == "mcc" and result["best_mean_val_mcc"] == 0.5
    assert result["best_mean_val_balanced_accuracy"] == 0.7  # of the round MCC chose


def test_run_json_without_the_recipe_reads_back_as_the_old_behaviour():
    old = FederateConfig.from_dict({"data": "d", "method": "fedlora", "lr": 1e-3})
    for key, value in RECIPE_BEFORE_OPTIONS.items():
        assert getattr(old, key) == value
    new = FederateConfig.from_dict(FederateConfig(data="d").to_dict())
    assert (new.augment, new.schedule, new.select, new.label_smoothing) == ("cinema", "cosine", "mcc", 0.1)
    with pytest.raises(UsageError, match="--select"):
        FederateConfig(data="d", select="auc")
    with pytest.raises(UsageError, match="--augment-views"):
        FederateConfig(data="d", augment_views=-1)
    with pytest.raises(UsageError, match="--label-smoothing"):
        FederateConfig(data="d", label_smoothing=1.0)
    # a constant schedule ignores --min-lr
    assert FederateConfig(data="d", lr=1e-6, schedule="constant").lr_schedule.lr_at(1, 0, 1) == 1e-6
