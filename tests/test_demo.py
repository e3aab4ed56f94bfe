"""`cmrfed demo` writes the synthetic cohort and runs the built-in demo study on it; here the
shipped demo study shrunk to a toy size (the real size runs from the README's first command)."""

from __future__ import annotations

import json

import pytest
from conftest import quiet_console
from matplotlib.image import imread

from cmrfed.demo import Cohort, demo_paths, run_demo
from cmrfed.errors import UsageError
from cmrfed.templates import template_text

pytestmark = pytest.mark.e2e  # every test builds a demo (cohort, study)


def toy_demo_study() -> str:
    """The shipped demo study with smaller sizes; every other line is the template's."""
    text = template_text("demo")
    for old, new in (("seeds = [0, 1, 2, 3, 4]", "seeds = [0, 1]"), ("rounds = 10", "rounds = 2"),
                     ("local-epochs = 3", "local-epochs = 1"), ("shape = [64, 64, 8]", "shape = [32, 32, 4]"),
                     ("spacing = [2.0, 2.0, 10.0]", "spacing = [4.0, 4.0, 10.0]"),
                     ("ranks = [8]", "ranks = [4]")):
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_demo_runs_every_stage_and_writes_a_readable_report(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, Cohort(subjects_per_dataset=21, shape=(48, 48, 6), frames=8),
                      study_text=toy_demo_study(), console=quiet_console())
    where = demo_paths(out)
    assert (where["cohort"] / "acdc").is_dir() and (where["prepared"] / "manifest.json").exists()
    runs = sorted(p.name for p in where["runs"].iterdir())
    methods = ("duallora", "fedlora", "ffalora")
    assert runs == sorted([f"{m}-blocks{b}-rank4-seed{s}" for m in methods for b in (1, 2) for s in (0, 1)]
                          + [f"{m}-blocks2-rank4-seed{s}-without-ge" for m in methods for s in (0, 1)])
    for run in where["runs"].iterdir():
        assert (run / "eval" / "metrics.json").exists()
    report = json.loads((where["report"] / "report.json").read_text())
    assert (report["test"], report["reference"]) == ("wilcoxon", "duallora")
    assert report["main"]["blocks"] == 2 and [s["blocks"] for s in report["settings"]] == [1, 2]
    assert {m["method"] for m in report["main"]["methods"]} == {"duallora", "fedlora", "ffalora"}
    assert [(r["method"], r["site"]) for r in report["participation"]["rows"]] == [(m, "ge") for m in methods]
    assert result.report.html == where["report"] / "report.html"
    summary = json.loads((where["cohort"] / "synth_summary.json").read_text())
    assert {k: summary["heterogeneity"][k] for k in ("appearance", "label_shift", "concept_shift")} == {
        "appearance": 1.0, "label_shift": 1.0, "concept_shift": 1.0}  # the realistic vendor profile
    assert set(report["consortium"]["clients"]) == set(report["clients"])
    assert "The consortium" in (where["report"] / "report.md").read_text()
    pngs = sorted(where["report"].glob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        image = imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 200
    with pytest.raises(UsageError, match="already exists"):
        run_demo(out, study_text=toy_demo_study(), console=quiet_console())
    prepared_at = (where["prepared"] / "manifest.json").stat().st_mtime_ns
    again = run_demo(out, study_text=toy_demo_study(), resume=True, console=quiet_console())
    assert (again.trained, again.skipped) == (0, 18)
    assert (where["prepared"] / "manifest.json").stat().st_mtime_ns == prepared_at  # not prepared again
