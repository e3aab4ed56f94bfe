"""`cmrfed study` end to end at a toy size: the grid runs through federate / evaluate / compare,
the report's tables equal numbers recomputed from the runs' own files, report.html is one
self-contained page, complete cells are recognised by what they record (not by folder names),
and a study killed with SIGKILL at any of several points ends, after `--resume`, exactly where an
uninterrupted study ends.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import signal
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_process import Finished, run_cmrfed
from conftest import assert_same_tensors, quiet_console, study_text, tensor_files
from safetensors.torch import load_file
from scipy import stats as sps

from cmrfed import paths
from cmrfed.errors import UsageError
from cmrfed.fed.methods import METHODS
from cmrfed.study.config import load_study
from cmrfed.study.runner import run_study

METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc", "f1", "mcc")


# --- the report against the runs' own files ------------------------------------------------------


def _metrics(run: Path) -> dict:
    return json.loads(paths.metrics_path(run).read_text())


def _t_summary(values: list[float], metric: str) -> tuple[float, float, float, float]:
    x = np.array(values, dtype=float)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(sps.t.ppf(0.975, x.size - 1)) * sd / math.sqrt(x.size)
    return mean, sd, max(-1.0 if metric == "mcc" else 0.0, mean - half), min(1.0, mean + half)


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _holm(p: list[float]) -> list[float]:
    order = np.argsort(p)
    adjusted, running = [0.0] * len(p), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def test_main_table_equals_numbers_recomputed_from_the_runs(toy_study):
    _, result = toy_study
    doc = result.report.document
    runs = {p.name: p for p in paths.study_runs_dir(result.out).iterdir()}
    main = doc["main"]
    assert (main["blocks"], main["rank"]) == (1, 2)
    raw_p = {}
    for method in main["methods"]:
        name = method["method"]
        mine = [runs[f"{name}-blocks1-rank2-seed{s}"] for s in (0, 1)]
        assert method["cells"] == [r.name for r in mine]
        for metric in METRICS:  # macro over sites, then mean / sd / t-CI over seeds
            values = [_metrics(r)["macro"][metric] for r in mine]
            if any(v is None for v in values):
                continue
            mean, sd, low, high = _t_summary(values, metric)
            got = method["macro"][metric]
            assert _close(got["mean"], mean) and _close(got["sd"], sd), (name, metric)
            if sd > 0:
                assert _close(got["ci95"][0], low) and _close(got["ci95"][1], high), (name, metric)
            for site, per_site in method["per_site"].items():  # and per site
                site_values = [_metrics(r)["per_client"][site][metric] for r in mine]
                if None not in site_values:
                    assert _close(per_site[metric]["mean"], float(np.mean(site_values)))
        # costs from the runs' own rounds.jsonl, run.json and tensor files
        rounds = [json.loads(line) for r in mine
                  for line in paths.rounds_log_path(r).read_text().splitlines()]
        per_client_round = [c["bytes_up"] for rec in rounds for c in rec["clients"].values()]
        assert _close(method["bytes_up_per_client_per_round"], float(np.mean(per_client_round)))
        results = [json.loads(paths.run_config_path(r).read_text())["result"] for r in mine]
        total = np.mean([x["bytes_up_total"] + x["bytes_down_total"] for x in results])
        assert _close(method["bytes_total"], float(total))
        first = next(iter(json.loads(paths.run_config_path(mine[0]).read_text())["clients"]))
        files = (paths.shared_tensors_path(mine[0]), paths.private_tensors_path(mine[0], first))
        trainable = sum(t.numel() for f in files for t in load_file(str(f)).values())
        assert method["trainable_parameters"] == trainable
        assert _close(method["seconds_per_round"], float(np.mean([
            np.mean([rec["wall_s"] for rec in rounds[i * 2:(i + 1) * 2]]) for i in range(2)])))
        test = method["test_vs_reference"]
        if name == "duallora":
            assert test is None
            continue
        # Wilcoxon over (seed, site) pairs of the runs' own per-site balanced accuracy
        ref = [runs[f"duallora-blocks1-rank2-seed{s}"] for s in (0, 1)]
        a, b = [], []
        for r_ref, r_base in zip(ref, mine, strict=True):
            for site in _metrics(r_ref)["per_client"]:
                a.append(_metrics(r_ref)["per_client"][site]["balanced_accuracy"])
                b.append(_metrics(r_base)["per_client"][site]["balanced_accuracy"])
        diffs = np.array(a) - np.array(b)
        p = 1.0 if not np.any(diffs) else float(
            sps.wilcoxon(diffs, zero_method="wilcox", method="auto").pvalue)
        assert test["n_pairs"] == len(a) == 8
        assert _close(test["p_value"], p), (name, test["p_value"], p)
        raw_p[name] = test
    adjusted = _holm([t["p_value"] for t in raw_p.values()])
    for test, expected in zip(raw_p.values(), adjusted, strict=True):
        assert _close(test["p_holm"], expected)


def test_ablation_table_and_csv_match_the_runs(toy_study):
    _, result = toy_study
    doc = result.report.document
    runs = {p.name: p for p in paths.study_runs_dir(result.out).iterdir()}
    assert [(s["blocks"], s["rank"]) for s in doc["settings"]] == [(1, 2), (2, 2)]
    with (result.report.out / "ablation.csv").open() as handle:
        rows = {(r["blocks"], r["method"]): r for r in csv.DictReader(handle)}
    assert len(rows) == 6
    for setting in doc["settings"]:
        for method in setting["methods"]:
            mine = [runs[f"{method['method']}-blocks{setting['blocks']}-rank2-seed{s}"] for s in (0, 1)]
            values = [_metrics(r)["macro"]["balanced_accuracy"] for r in mine]
            mean = float(np.mean(values))
            assert _close(method["tested_metric"]["mean"], mean)
            row = rows[(str(setting["blocks"]), method["method"])]
            assert math.isclose(float(row["mean"]), mean, rel_tol=1e-9, abs_tol=1e-12)
            assert int(row["trainable_parameters"]) == method["trainable_parameters"]
    # adapting two blocks trains and sends more than adapting one, for every method
    by = {(s["blocks"], m["method"]): m for s in doc["settings"] for m in s["methods"]}
    for method in ("duallora", "fedlora", "ffalora"):
        assert by[(2, method)]["trainable_parameters"] > by[(1, method)]["trainable_parameters"]
        assert by[(2, method)]["bytes_total"] > by[(1, method)]["bytes_total"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.tables = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src", ""))
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            link = values.get(key)
            if link and not link.startswith("data:") and not link.startswith("#"):
                self.external.append(link)

    def handle_data(self, data):
        self.text.append(data)


def test_report_html_is_self_contained_and_embeds_every_figure(toy_study):
    _, result = toy_study
    report = result.report.out
    page = _Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    page.close()
    figures = result.report.document["figures"]
    # the consortium (cmrfed inspect) first, then the ablation and the main setting's four
    assert len(page.images) == len(figures) == len(list(report.glob("*.png"))) == 6
    assert figures[0] == "consortium.png"
    for src, name in zip(page.images, figures, strict=True):
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data == (report / name).read_bytes()
    assert page.external == []  # nothing to fetch: the page works offline and when mailed
    assert page.tables == 5  # consortium sites and probe transfer, main, per site, ablation
    text = " ".join(page.text)
    for method in ("duallora", "fedlora", "ffalora"):
        assert method in text
    for md_or_csv in ("report.md", "main.csv", "summaries.csv", "ablation.csv", "report.json"):
        assert (report / md_or_csv).stat().st_size > 0


def test_report_states_the_privacy_of_the_main_setting_runs(toy_study):
    _, result = toy_study
    doc = result.report.document
    main = doc["privacy"]["runs"]
    assert {method for method, _, _ in main} == {"duallora", "fedlora", "ffalora"}
    assert all(summary is None for summary in doc["privacy"]["summaries"].values())  # no --dp-epsilon
    markdown = (result.report.out / "report.md").read_text(encoding="utf-8")
    assert "## Differential privacy (per site, whole run)" in markdown
    assert "None of these runs used differential privacy" in markdown
    assert "None of these runs used differential privacy" in (result.report.out / "report.html").read_text()


# --- skipping by identity ------------------------------------------------------------------------


def test_resume_skips_complete_cells_found_by_what_they_record(toy_study, tmp_path):
    file, first = toy_study
    out = tmp_path / "copy"
    shutil.copytree(first.out, out)
    # a folder name means nothing: the cell is recognised by its run.json
    runs = paths.study_runs_dir(out)
    (runs / "fedlora-blocks1-rank2-seed0").rename(runs / "renamed-by-hand")
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")}
    with pytest.raises(UsageError, match=r"already exists.*--resume"):
        run_study(load_study(file), out, console=quiet_console())
    again = run_study(load_study(file), out, resume=True, console=quiet_console())
    assert (again.trained, again.skipped) == (0, 12)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")} == before
    record = json.loads(paths.study_record_path(out).read_text())
    assert record["state"] == "complete"
    assert {c["run"] for c in record["cells"]} >= {"runs/renamed-by-hand"}
    assert _numbers(again.report.document) == _numbers(first.report.document)
    # a changed option is another cell: it is not mistaken for the recorded one
    file.with_name("changed.toml").write_text(file.read_text().replace("rounds = 2", "rounds = 3"))
    with pytest.raises(UsageError, match="holds a run with other options"):
        run_study(load_study(file.with_name("changed.toml")), out, resume=True, console=quiet_console())


def _numbers(doc: dict) -> dict:
    """The report without what legitimately differs between two executions: wall times and
    package versions."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("seconds_per_round", "versions")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(doc)


# --- SIGKILL at deterministic points, then --resume ---------------------------------------------

KILL_CHAIN = (
    "federate.train-step:3",          # mid local training of the first cell
    "federate.round-logged:2",        # rounds.jsonl appended, checkpoint not yet written
    "federate.checkpoint-write:2",    # in the middle of writing a checkpoint
    "federate.final-write:2",         # between the final shared and private tensor files
    "study.cell-trained:2",           # a cell trained, not yet evaluated
    "study.cell-evaluated:2",         # evaluated, study.json not yet updated
    "study.report-write:1",           # inside the report's atomic folder
)


def _study(args: list[str], fault: str | None) -> Finished:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CMRFED_FAULT", None)
    if fault:
        env["CMRFED_FAULT"] = fault
    return run_cmrfed(["study", *args], env=env, timeout=600)


def _rounds(out: Path) -> dict[str, list]:
    logs = {}
    for log in sorted(paths.study_runs_dir(out).glob("*/rounds.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        for record in records:
            record.pop("wall_s")
        logs[log.parent.name] = records
    return logs


def _eval(out: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted(paths.study_runs_dir(out).glob("*/eval/metrics.json")):
        doc = json.loads(path.read_text())
        doc.pop("versions")
        docs[path.parent.parent.name] = doc
    return docs


@pytest.mark.e2e
def test_study_killed_at_every_point_resumes_to_the_uninterrupted_result(small_prepared, tmp_path):
    """Every method of the table in the grid; one SIGKILL per point of KILL_CHAIN, each followed by
    `--resume` (which the next point kills again), then a last `--resume` that finishes."""
    file = tmp_path / "all-methods.toml"
    file.write_text(study_text(small_prepared, methods=tuple(METHODS), blocks="[1]", seeds="[0]"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same reductions, same bits
    try:
        run_study(load_study(file), tmp_path / "reference", console=quiet_console())
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "killed"
    for index, fault in enumerate(KILL_CHAIN):
        args = [str(file), "--out", str(out)] + (["--resume"] if index else [])
        killed = _study(args, fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.returncode, killed.stderr[-3000:])
    finished = _study([str(file), "--out", str(out), "--resume"], None)
    assert finished.returncode == 0, finished.stderr[-3000:]

    ref_out, new_out = tmp_path / "reference", out
    assert len(tensor_files(paths.study_runs_dir(ref_out))) > len(METHODS)
    assert_same_tensors(paths.study_runs_dir(ref_out), paths.study_runs_dir(new_out))
    assert _rounds(new_out) == _rounds(ref_out)
    assert _eval(new_out) == _eval(ref_out)
    ref_doc = json.loads((paths.study_report_dir(ref_out) / "report.json").read_text())
    new_doc = json.loads((paths.study_report_dir(new_out) / "report.json").read_text())
    assert _numbers(new_doc) == _numbers(ref_doc)
    record = json.loads(paths.study_record_path(new_out).read_text())
    assert record["state"] == "complete" and all(c["state"] == "complete" for c in record["cells"])


# --- --jobs: cells in worker processes ------------------------------------------------------------


def _same_study(out: Path, reference: Path) -> None:
    """Every run's tensors, rounds (wall times aside), evaluation and the report's numbers."""
    assert_same_tensors(paths.study_runs_dir(reference), paths.study_runs_dir(out))
    assert _rounds(out) == _rounds(reference)
    assert _eval(out) == _eval(reference)
    docs = [json.loads((paths.study_report_dir(o) / "report.json").read_text()) for o in (out, reference)]
    assert _numbers(docs[0]) == _numbers(docs[1])


@pytest.mark.e2e
def test_jobs_2_gives_the_report_of_jobs_1(toy_study, tmp_path):
    file, serial = toy_study
    parallel = run_study(load_study(file), tmp_path / "parallel", jobs=2, console=quiet_console())
    assert (parallel.trained, parallel.skipped) == (12, 0)
    _same_study(parallel.out, serial.out)
    record = json.loads(paths.study_record_path(parallel.out).read_text())
    assert record["jobs"] == 2 and record["state"] == "complete"
    timings = record["timings"]  # every phase that ran is on record, workers included
    assert {"cache", "federate", "evaluate", "compare", "report"} <= set(timings)
    assert timings["federate"]["count"] == 12 and timings["federate"]["cpu_s"] > 0


@pytest.mark.e2e
def test_study_killed_while_two_workers_run_resumes_to_the_same_report(toy_study, tmp_path):
    """SIGKILL the study process after its 2nd finished cell, while the other worker trains: the
    workers die with it (nothing left writing), and `--resume --jobs 2` ends where a serial,
    uninterrupted study ends."""
    file, serial = toy_study
    out = tmp_path / "killed"
    killed = _study([str(file), "--out", str(out), "--jobs", "2"], "study.cell-recorded:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    record = json.loads(paths.study_record_path(out).read_text())
    assert sum(c["state"] == "complete" for c in record["cells"]) == 2
    finished = _study([str(file), "--out", str(out), "--resume", "--jobs", "2"], None)
    assert finished.returncode == 0, finished.stderr[-3000:]
    _same_study(out, serial.out)
