"""``cmrfed inspect``: the consortium measures on prepared synthetic cohorts whose dial is known,
and the small classifiers it is built on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from cmrfed.cli import cli
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth import Heterogeneity, write_synthetic_cohort
from cmrfed.eval.consortium import (
    balanced_accuracy,
    cross_validated,
    fit_logistic,
    inspect_consortium,
    stratified_folds,
)


def _prepared(root: Path, dial: Heterogeneity) -> Path:
    write_synthetic_cohort(root / "raw", seed=5, subjects=24, shape=(48, 48, 6), frames=6, dial=dial)
    prepare(PrepareOptions(out=root / "prepared", acdc=root / "raw" / "acdc", mnms=root / "raw" / "mnms",
                           mnms2=root / "raw" / "mnms2", spacing=(4.0, 4.0, 10.0), shape=(32, 32, 4), seed=0),
            console=Console(quiet=True))
    return root / "prepared"


@pytest.mark.e2e
def test_identifiability_is_near_chance_at_dial_zero_and_high_at_dial_two(tmp_path: Path) -> None:
    alike = inspect_consortium(_prepared(tmp_path / "alike", Heterogeneity(0.0, 0.0, 0.0)),
                               tmp_path / "alike" / "inspect", backbone="tiny-pretrained")
    apart = inspect_consortium(_prepared(tmp_path / "apart", Heterogeneity(2.0, 2.0, 2.0)),
                               tmp_path / "apart" / "inspect", backbone="tiny-pretrained")
    chance = alike["identifiability"]["chance"]
    assert chance == 0.25 and alike["clients"] == apart["clients"]
    assert alike["identifiability"]["balanced_accuracy"] < chance + 0.2, alike["identifiability"]
    assert apart["identifiability"]["balanced_accuracy"] > 0.7, apart["identifiability"]
    # label mixes: the pooled one everywhere at 0, apart at 2; intensities likewise
    assert max(s["label_js_divergence"] for s in alike["sites"]) < 0.01
    assert max(s["label_js_divergence"] for s in apart["sites"]) > 0.02
    assert np.max(apart["intensity"]["matrix"]) > 2 * np.max(alike["intensity"]["matrix"])
    # what was written is what was returned, and the transfer matrix is sites x sites
    written = json.loads((tmp_path / "alike" / "inspect" / "inspect.json").read_text())
    assert written["identifiability"]["per_site_recall"] == alike["identifiability"]["per_site_recall"]
    assert np.asarray(written["transfer"]["matrix"]).shape == (4, 4)
    assert (tmp_path / "alike" / "inspect" / "inspect.png").stat().st_size > 0
    assert "Jensen-Shannon" in (tmp_path / "alike" / "inspect" / "inspect.md").read_text()
    # the command: same numbers, and an existing folder is kept unless --overwrite
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "alike" / "prepared"), "--out",
                                      str(tmp_path / "alike" / "inspect")])
    assert result.exit_code != 0 and "overwrite" in result.output
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "alike" / "prepared"), "--out",
                                      str(tmp_path / "alike" / "inspect"), "--overwrite"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "alike" / "inspect" / "inspect.json").read_text())
    assert again["identifiability"]["balanced_accuracy"] == alike["identifiability"]["balanced_accuracy"]
    assert again["transfer"]["matrix"] == written["transfer"]["matrix"]


def test_the_logistic_probe_separates_separable_classes_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    separable = rng.standard_normal((60, 5)) + 3.0 * np.eye(3, 5)[labels]
    score, predicted, folds = cross_validated(separable, labels, 3, np.random.default_rng(1))
    assert folds == 5 and score > 0.9 and predicted.shape == labels.shape
    noise = rng.standard_normal((60, 5))
    assert cross_validated(noise, labels, 3, np.random.default_rng(1))[0] < 0.6
    # a class with a single sample cannot be cross-validated: undefined, not a crash
    assert math.isnan(cross_validated(noise[:21], labels[:21], 3, np.random.default_rng(1))[0])
    model = fit_logistic(separable, labels, 3)
    assert balanced_accuracy(labels, model.predict(separable)) == 1.0


def test_folds_are_stratified_and_seeded() -> None:
    labels = np.array([0] * 10 + [1] * 4)
    folds = stratified_folds(labels, 4, np.random.default_rng(3))
    assert np.array_equal(folds, stratified_folds(labels, 4, np.random.default_rng(3)))
    for fold in range(4):
        assert (labels[folds == fold] == 1).sum() == 1
    assert balanced_accuracy(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx(0.75)
