"""A study's participation gap: each ``[participation] holdout`` site is left out of a run of the
main setting per method and seed, scored zero-shot, adapted with ``cmrfed adapt`` and scored
again, and set beside its score as a full member. The report's numbers equal what the commands
themselves compute on the study's runs; a killed study resumes to the same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_process import run_cmrfed
from conftest import SITE, participation_text, quiet_console
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.errors import UsageError
from cmrfed.eval.evaluate_site import evaluate_site
from cmrfed.study.config import load_study, parse_study
from cmrfed.study.runner import run_study


@pytest.fixture(scope="session")
def gap_study(small_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("participation")
    file = root / "gap.toml"
    file.write_text(participation_text(small_prepared), encoding="utf-8")
    result = run_study(load_study(file), root / "out", console=quiet_console())
    return file, result


def _record(folder: Path) -> dict:
    return json.loads(paths.site_eval_record_path(folder).read_text())


def test_participation_cells_train_without_the_site_and_pair_with_members(gap_study):
    _, result = gap_study
    study = json.loads(paths.study_record_path(result.out).read_text())
    names = [c["name"] for c in study["cells"]]
    held = [n for n in names if n.endswith(f"-without-{SITE}")]
    assert len(names) == 8 and len(held) == 4  # 2 methods x 2 seeds, each with and without the site
    for name in held:
        info = json.loads(paths.run_config_path(paths.study_run_dir(result.out, name)).read_text())
        assert SITE not in info["clients"] and info["config"]["holdout"] == SITE
        member = json.loads(paths.run_config_path(
            paths.study_run_dir(result.out, name.removesuffix(f"-without-{SITE}"))).read_text())
        assert SITE in member["clients"] and member["config"]["holdout"] is None
        assert {k: v for k, v in info["config"].items() if k != "holdout"} == \
               {k: v for k, v in member["config"].items() if k != "holdout"}


def test_report_gap_equals_what_the_commands_compute(gap_study, small_prepared, tmp_path):
    _, result = gap_study
    part = result.report.document["participation"]
    assert part["metric"] == "balanced_accuracy" and part["holdout"] == [SITE]
    assert [(r["method"], r["site"], r["seeds"]) for r in part["rows"]] == [
        ("duallora", SITE, [0, 1]), ("fedlora", SITE, [0, 1])]
    for row in part["rows"]:
        zero, adapted, member = [], [], []
        for cell, member_cell in zip(row["cells"], row["member_cells"], strict=True):
            run = paths.study_run_dir(result.out, cell)
            folder = paths.study_newcomer_dir(result.out, cell)
            # the held-out site scored again, here, by the function `evaluate --client` runs
            again = evaluate_site(run, SITE, small_prepared, out=tmp_path / cell / "zero", n_boot=50,
                                  console=quiet_console())
            assert again.metrics["balanced_accuracy"] == _record(folder / "held-out")["metrics"][
                "balanced_accuracy"]
            after = evaluate_site(run, SITE, small_prepared, private=folder / "adapted",
                                  out=tmp_path / cell / "adapted", n_boot=50, console=quiet_console())
            assert _record(folder / "held-out")["participation"] == "held-out"
            assert _record(folder / "adapted-eval")["participation"] == "adapted"
            zero.append(again.metrics["balanced_accuracy"])
            adapted.append(after.metrics["balanced_accuracy"])
            metrics = json.loads(paths.metrics_path(paths.study_run_dir(result.out, member_cell)).read_text())
            member.append(metrics["per_client"][SITE]["balanced_accuracy"])
        for kind, values in (("held_out", zero), ("adapted", adapted), ("member", member)):
            assert row[kind]["values"] == pytest.approx(values, abs=0)
            assert row[kind]["mean"] == pytest.approx(statistics.mean(values))
            assert row[kind]["sd"] == pytest.approx(statistics.stdev(values))
    report = (paths.study_report_dir(result.out) / "report.md").read_text()
    assert "## Participation gap" in report and f"| duallora | {SITE} | 2 |" in report
    assert "Participation gap" in (paths.study_report_dir(result.out) / "report.html").read_text()
    rows = (paths.study_report_dir(result.out) / "participation.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3  # header + method x seed x (zero-shot, adapted, member)


def test_adapt_in_a_study_trains_only_the_new_sites_adapter(gap_study):
    _, result = gap_study
    for cell in (c["name"] for c in json.loads(paths.study_record_path(result.out).read_text())["cells"]):
        if not cell.endswith(f"-without-{SITE}"):
            continue
        folder = paths.study_newcomer_dir(result.out, cell)
        record = json.loads(paths.adapt_record_path(folder / "adapted").read_text())
        assert record["client"] == SITE and record["epochs"] == 2
        tensors = load_file(str(paths.private_tensors_path(folder / "adapted", SITE)))
        assert tensors and record["adapted_params"] == sum(t.numel() for t in tensors.values())
        # scored on the same tensors the run wrote: nothing of the run was changed by adapting
        assert record["run"] == _record(folder / "held-out")["run"] == _record(folder / "adapted-eval")["run"]


def test_resume_recomputes_only_what_is_missing_or_stale(gap_study, tmp_path):
    file, first = gap_study
    out = tmp_path / "copy"
    shutil.copytree(first.out, out)
    newcomers = sorted((out / "newcomers").iterdir())
    shutil.rmtree(newcomers[0] / "adapted-eval")
    shutil.rmtree(newcomers[1] / "held-out")
    kept = newcomers[2] / "adapted" / "adapt.json"
    stamp = kept.stat().st_mtime_ns
    again = run_study(load_study(file), out, resume=True, console=quiet_console())
    assert (again.trained, again.skipped) == (0, 8)
    assert kept.stat().st_mtime_ns == stamp
    assert again.report.document["participation"] == first.report.document["participation"]


def test_participation_keys_are_checked(small_prepared, tmp_path):
    base = participation_text(small_prepared)
    with pytest.raises(UsageError, match=r"\[adapt\] client: not a study key"):
        parse_study(base + 'client = "x"\n', "bad.toml", tmp_path)
    with pytest.raises(UsageError, match=r"\[adapt\] epochs = 0: at least 1"):
        parse_study(base.replace("epochs = 2", "epochs = 0"), "bad.toml", tmp_path)
    with pytest.raises(UsageError, match=r"\[adapt\] configures the held-out sites"):
        parse_study(base.replace(f'[participation]\nholdout = ["{SITE}"]\n', ""), "bad.toml", tmp_path)
    with pytest.raises(UsageError, match=r"unknown key 'sites' in \[participation\]"):
        parse_study(base.replace("holdout = [", "sites = ["), "bad.toml", tmp_path)
    with pytest.raises(UsageError, match="both in \\[federate\\] and in \\[participation\\]"):
        parse_study(base.replace('device = "cpu"', 'device = "cpu"\nholdout = "ge"'), "bad.toml", tmp_path)
    file = tmp_path / "unknown-site.toml"
    file.write_text(participation_text(small_prepared, holdout="toshiba"))
    with pytest.raises(UsageError, match=r"holdout = 'toshiba' is not a site of .*choose among"):
        run_study(load_study(file), tmp_path / "out", console=quiet_console())
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.e2e
def test_study_killed_while_a_newcomer_adapts_resumes_to_the_same_numbers(small_prepared, tmp_path):
    file = tmp_path / "one-seed.toml"
    file.write_text(participation_text(small_prepared, seeds="[0]"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): same reductions, same bits
    try:
        reference = run_study(load_study(file), tmp_path / "reference", console=quiet_console())
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    for index, fault in enumerate(("study.newcomer-adapted:1", None)):
        args = ["study", str(file), "--out", str(out)]
        run = run_cmrfed(args + (["--resume"] if index else []),
                         env={**env, **({"CMRFED_FAULT": fault} if fault else {})}, timeout=600)
        assert run.returncode == (-signal.SIGKILL if fault else 0), run.stderr[-3000:]
    doc = json.loads((paths.study_report_dir(out) / "report.json").read_text())
    assert doc["participation"] == json.loads(json.dumps(reference.report.document["participation"]))
    for cell in (p.name for p in (out / "newcomers").iterdir()):
        new, ref = (load_file(str(paths.private_tensors_path(root / "newcomers" / cell / "adapted", SITE)))
                    for root in (out, tmp_path / "reference"))
        assert new.keys() == ref.keys()
        assert all(np.array_equal(new[k].numpy(), ref[k].numpy()) for k in new)
