"""`cmrfed demo` wires every stage together; here at a toy size (the real size runs from the
README's first command)."""

from __future__ import annotations

import json

import pytest
from conftest import quiet_console
from matplotlib.image import imread

from cmrfed.demo import DemoSettings, demo_paths, run_demo
from cmrfed.errors import UsageError


def test_demo_runs_every_stage_and_writes_a_readable_report(tmp_path):
    settings = DemoSettings(subjects_per_dataset=21, synth_shape=(48, 48, 6), frames=8,
                            shape=(32, 32, 4), spacing=(4.0, 4.0, 10.0), seeds=(0, 1), rounds=2,
                            local_epochs=1, rank=4)
    out = tmp_path / "demo"
    result = run_demo(out, settings, console=quiet_console())
    where = demo_paths(out)
    assert (where["prepared"] / "manifest.json").exists()
    runs = sorted(p.name for p in where["runs"].iterdir())
    assert runs == sorted(f"{m}-seed{s}" for m in settings.methods for s in settings.seeds)
    for run in where["runs"].iterdir():
        assert (run / "eval" / "metrics.json").exists()
    report = json.loads((where["report"] / "comparison.json").read_text())
    assert (report["test"], report["reference"]) == ("wilcoxon", "duallora")
    assert {row["baseline"] for row in report["tests"]} >= {"fedlora", "ffalora"}
    assert result.out == where["report"]
    pngs = sorted(where["report"].glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        image = imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 200
    with pytest.raises(UsageError, match="already exists"):
        run_demo(out, settings, console=quiet_console())
