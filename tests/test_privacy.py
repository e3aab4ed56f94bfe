"""Differential privacy: per-sample gradients, the accountant against an independent computation,
the budget never exceeded, resume exact with DP noise, the record in every report, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import SMALL_SHAPE, assert_same_tensors, quiet_console
from safetensors.torch import load_file
from scipy.special import logsumexp
from torch import nn

from cmrfed import paths
from cmrfed.cli import cli
from cmrfed.errors import UsageError
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.eval.report import compare_runs
from cmrfed.fed import inprocess, rounds
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import run_config_of
from cmrfed.fed.methods import METHODS
from cmrfed.fed.privacy import (
    NOISE_STREAM,
    RDP_ORDERS,
    SitePlan,
    check_dp_method,
    check_dp_model,
    composed_epsilon,
    epsilon_spent,
    per_sample_grads,
    plan_site,
    privacy_summary,
)
from cmrfed.fed.task import build_run_model
from cmrfed.model.classifier import param_group
from cmrfed.seeding import derive_seed

# class balancing is on (the default): under DP, with privately released label counts
DP = {"rounds": 2, "local_epochs": 1, "batch_size": 4, "rank": 2, "lr": 5e-3, "dp_epsilon": 3.0}


def federate(prepared: Path, out: Path, **options) -> Path:
    cfg = FederateConfig(data=str(prepared), **{**DP, **options})
    inprocess.federate(cfg, out, device="cpu", console=quiet_console())
    return out


def run_json(run: Path) -> dict:
    return json.loads(paths.run_config_path(run).read_text())


def rounds_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in paths.rounds_log_path(run).read_text().splitlines()]


@pytest.fixture(scope="session")
def dp_run(small_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished DP duallora run (2 rounds, epsilon 3, class balancing with private counts)."""
    return federate(small_prepared, tmp_path_factory.mktemp("dp") / "run")


# --- per-sample gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["cache", "full"])
@pytest.mark.parametrize("method", ["duallora", "fedlora", "ffalora"])
def test_per_sample_grads_equal_one_at_a_time_gradients(method, path):
    cfg = FederateConfig(data="", method=method, blocks=2, rank=2, class_balanced=False)
    run_model = build_run_model(cfg, SMALL_SHAPE)
    model = run_model.model.double()  # float64: the comparison is then exact to rounding
    model.set_trainable_groups(run_model.spec.trained)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make every A gradient zero: move off it
        for name, param in model.named_parameters():
            if param_group(name) is not None:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    images = torch.rand((3, 2, *SMALL_SHAPE), generator=generator, dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    start = run_model.start_block
    if path == "cache":
        with torch.no_grad():
            h, skips = model.backbone.embed(images)
            inputs = (model.backbone.forward_blocks(h, 0, start), skips)

        def forward(m, batch):
            return m.forward_from(batch[0], batch[1], start)
    else:
        inputs = (images,)

        def forward(m, batch):
            return m(batch[0])

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {param_group(n) for n in params} == set(run_model.spec.trained)
    grads, losses = per_sample_grads(model, params, forward, inputs, target, F.cross_entropy)

    for i in range(len(target)):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(model, tuple(t[i:i + 1] for t in inputs)), target[i:i + 1])
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-10, atol=1e-12)
        for name, param in params.items():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name][i], param.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("class_weights", [None, torch.tensor([0.25, 1.0])])
def test_a_private_step_is_the_clipped_sum_plus_seeded_noise_over_the_expected_batch(class_weights):
    cfg = FederateConfig(data="", method="duallora", blocks=1, rank=2, class_balanced=False)
    run_model = build_run_model(cfg, SMALL_SHAPE)
    model = run_model.model
    model.set_trainable_groups(run_model.spec.trained)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    plan = SitePlan(site="s", n_train=6, sample_rate=0.5, steps_per_epoch=2, steps_per_round=2,
                    rounds=1, noise_multiplier=0.7, clip=0.05, delta=1e-5, target_epsilon=8.0)
    optimizer = torch.optim.SGD(list(params.values()), lr=1.0)
    dp = plan.open_round(model, optimizer, seed=4, round_index=3, site_index=1,
                         device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((3, 2, *SMALL_SHAPE), generator=generator)
    target = torch.tensor([1, 0, 1])

    def forward(m, batch):
        return m(batch[0])

    grads, _ = per_sample_grads(model, params, forward, (images,), target, F.cross_entropy)
    dp.step(model, forward, (images,), target, F.cross_entropy, class_weights=class_weights)

    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    assert (norms > plan.clip).all()  # every sample is clipped, jointly over all tensors
    factor = (plan.clip / (norms + 1e-6)).clamp(max=1.0)
    if class_weights is not None:  # the class weight multiplies the clipped gradient
        factor = factor * class_weights[target]
    noise = torch.Generator().manual_seed(derive_seed(4, 3, 1, NOISE_STREAM))
    for name, param in params.items():  # Opacus draws one tensor of noise per parameter, in order
        drawn = torch.normal(0.0, plan.noise_multiplier * plan.clip, size=param.shape,
                             generator=noise)
        clipped = torch.einsum("i,i...->...", factor, grads[name])
        expected = before[name] - (clipped + drawn) / plan.expected_batch_size
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)


# --- the accountant ------------------------------------------------------------------------------


def sampled_gaussian_rdp(q: float, sigma: float, order: float) -> float:
    """RDP of one Poisson-subsampled Gaussian step at ``order``, by numerical integration of
    A_a = E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^a] (Mironov, Talwar, Zhang
    2019), on a grid fine enough for these Gaussian-shaped integrands; independent of Opacus."""
    lo, hi = -40 * sigma - 1, order + 40 * sigma + 1
    z = np.linspace(lo, hi, int((hi - lo) / (sigma / 200)) + 1)
    log_ratio = np.logaddexp(np.log1p(-q) if q < 1 else -np.inf,
                             np.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_f = -z**2 / (2 * sigma**2) - np.log(sigma * math.sqrt(2 * math.pi)) + order * log_ratio
    log_a = logsumexp(log_f) + np.log(z[1] - z[0])
    return float(log_a / (order - 1))


def gaussian_rdp(sigma: float, order: float) -> float:
    """RDP of one Gaussian mechanism of L2 sensitivity 1 (Mironov 2017, closed form)."""
    return order / (2 * sigma**2)


def independent_epsilon(q: float, sigma: float, steps: int, delta: float,
                        count_sigma: float | None = None) -> float:
    """(epsilon, delta) from RDP by the conversion of Balle et al. 2020 (Prop. 12), min over orders;
    with ``count_sigma``, composed with one Gaussian release of the label counts (RDP summed)."""
    best = math.inf
    for order in RDP_ORDERS:
        rdp = steps * sampled_gaussian_rdp(q, sigma, order)
        if count_sigma is not None:
            rdp += gaussian_rdp(count_sigma, order)
        eps = rdp + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)
        best = min(best, eps)
    return best


def test_recorded_epsilon_equals_an_independent_computation(dp_run):
    record = run_json(dp_run)
    spent = record["result"]["privacy"]
    assert set(spent) == set(record["clients"])
    for site, s in spent.items():
        plan = record["privacy"]["sites"][site]
        assert s["steps"] == plan["steps_per_round"] * 2 == plan["planned_steps"]
        assert s["count_noise_multiplier"] == plan["count_noise_multiplier"] > 0  # the default
        expected = independent_epsilon(s["sample_rate"], s["noise_multiplier"], s["steps"],
                                       s["delta"], s["count_noise_multiplier"])
        assert s["epsilon"] == pytest.approx(expected, rel=2e-3), site
        assert s["count_epsilon"] == pytest.approx(
            independent_epsilon(1.0, s["count_noise_multiplier"], 0, s["delta"], s["count_noise_multiplier"]),
            rel=1e-9), site
        # and a different Opacus accountant (PRV, near-exact) can only find less privacy loss
        prv = composed_epsilon(((s["count_noise_multiplier"], 1.0, 1),
                                (s["noise_multiplier"], s["sample_rate"], s["steps"])), s["delta"], "prv")
        assert 0 < prv <= s["epsilon"] * 1.01, site
        assert s["delta"] < 1 / record["clients"][site]["n_train"]


def test_independent_rdp_agrees_with_opacus_at_a_small_sampling_rate():
    for q, sigma, steps in ((0.02, 1.1, 500), (0.25, 0.9, 12), (1.0, 3.0, 4)):
        assert epsilon_spent(sigma, q, steps, 1e-5) == pytest.approx(
            independent_epsilon(q, sigma, steps, 1e-5), rel=2e-3)


# --- the budget ----------------------------------------------------------------------------------


def test_a_run_never_exceeds_its_budget_and_records_it_everywhere(dp_run):
    target = DP["dp_epsilon"]
    lines = rounds_of(dp_run)
    assert [ln["round"] for ln in lines] == [1, 2]
    for site in run_json(dp_run)["clients"]:
        spent = [ln["privacy"][site]["epsilon"] for ln in lines]
        assert 0 < spent[0] < spent[1] <= target  # cumulative, within budget
        assert spent[1] > target - 0.05  # calibrated to use (nearly) all of it
        assert [ln["privacy"][site]["steps"] for ln in lines] == [
            lines[0]["privacy"][site]["steps"] * r for r in (1, 2)]

    summary = evaluate_run(dp_run, n_boot=20, device="cpu", console=quiet_console())
    metrics = json.loads((summary.out / "metrics.json").read_text())
    assert metrics["privacy"] == privacy_summary(run_json(dp_run))
    assert metrics["privacy"]["max_epsilon"] <= target


def test_a_run_stops_cleanly_rather_than_overspend(dp_run, small_prepared, tmp_path):
    run = Path(shutil.copytree(dp_run, tmp_path / "run"))
    # the recorded noise of every site replaced by one calibrated for a single round: round 2
    # would overspend, so a run resumed from the start must stop after round 1
    record = run_json(run)
    for site, raw in record["privacy"]["sites"].items():
        one = plan_site(site, raw["n_train"], epsilon=DP["dp_epsilon"], delta=None, clip=None,
                        batch_size=DP["batch_size"], local_epochs=1, rounds=1,
                        count_share=raw["count_share"])
        raw["noise_multiplier"] = one.noise_multiplier
    del record["result"]
    paths.run_config_path(run).write_text(json.dumps(record))
    shutil.rmtree(paths.checkpoint_dir(run))  # resume from the start, with the changed plan
    cfg = FederateConfig(data=str(small_prepared), **DP)
    inprocess.federate(cfg, run, device="cpu", resume=True, console=quiet_console())

    result = run_json(run)["result"]
    assert result["completed_rounds"] == 1 and "privacy budget" in result["stopped"]["reason"]
    assert all(s["epsilon"] <= DP["dp_epsilon"] for s in result["privacy"].values())
    assert [ln["round"] for ln in rounds_of(run)] == [1]
    assert paths.shared_tensors_path(run).exists()  # the state of round 1 is kept and usable
    assert paths.checkpoint_path(run).exists()
    metrics = evaluate_run(run, n_boot=10, device="cpu", console=quiet_console())
    assert json.loads((metrics.out / "metrics.json").read_text())["privacy"]["stopped"]


# --- resume --------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", sorted(m for m, spec in METHODS.items() if not spec.trains_backbone))
def test_resume_with_dp_repeats_the_same_noise(small_prepared, tmp_path, monkeypatch, method):
    reference = federate(small_prepared, tmp_path / "reference", method=method)

    real = rounds._write_checkpoint

    def checkpoint_then_die(run, progress, last, best):  # a kill right after round 1
        real(run, progress, last, best)
        raise Interrupt

    monkeypatch.setattr(rounds, "_write_checkpoint", checkpoint_then_die)
    with pytest.raises(Interrupt):
        federate(small_prepared, tmp_path / "resumed", method=method)
    monkeypatch.setattr(rounds, "_write_checkpoint", real)
    cfg = FederateConfig(data=str(small_prepared), **{**DP, "method": method})
    inprocess.federate(cfg, tmp_path / "resumed", device="cpu", resume=True,
                       console=quiet_console())

    assert_same_tensors(reference, tmp_path / "resumed")  # final, best, every site's private
    _, last_a, _ = rounds.read_checkpoint(reference)
    _, last_b, _ = rounds.read_checkpoint(tmp_path / "resumed")
    assert last_a.keys() == last_b.keys()
    for owner, state in last_a.items():  # every site's every tensor, private ones included
        assert state.keys() == last_b[owner].keys()
        assert all(torch.equal(state[k], last_b[owner][k]) for k in state), owner
    assert [ln["privacy"] for ln in rounds_of(reference)] == [
        ln["privacy"] for ln in rounds_of(tmp_path / "resumed")]
    initial = build_run_model(cfg, SMALL_SHAPE).initial_state
    trained = {(owner, k) for owner, state in last_a.items() for k, t in state.items()
               if not torch.equal(t, initial[k])}
    assert trained, "DP training must have moved the trained tensors"


def test_dp_noise_comes_from_the_seed(small_prepared, tmp_path):
    a = federate(small_prepared, tmp_path / "a", method="ffalora", rounds=1, seed=1)
    b = federate(small_prepared, tmp_path / "b", method="ffalora", rounds=1, seed=2)
    sa = load_file(str(paths.shared_tensors_path(a)))
    sb = load_file(str(paths.shared_tensors_path(b)))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


# --- reports -------------------------------------------------------------------------------------


def test_compare_report_states_each_runs_epsilon(dp_run, small_prepared, tmp_path):
    plain = tmp_path / "plain"
    cfg = FederateConfig(data=str(small_prepared), **{**DP, "dp_epsilon": None, "method": "fedlora"})
    inprocess.federate(cfg, plain, device="cpu", console=quiet_console())
    for run in (dp_run, plain):
        evaluate_run(run, n_boot=10, device="cpu", console=quiet_console())
    result = compare_runs([dp_run, plain], "mcnemar", reference="duallora", out=tmp_path / "report",
                          console=quiet_console())
    document = json.loads(paths.comparison_json_path(result.out).read_text())
    assert document["privacy"][str(dp_run)] == privacy_summary(run_json(dp_run))
    assert document["privacy"][str(plain)] is None
    markdown = paths.comparison_md_path(result.out).read_text()
    assert "## Differential privacy" in markdown and "| fedlora | 0 | not DP |" in markdown
    site, spent = next(iter(run_json(dp_run)["result"]["privacy"].items()))
    assert f"{site} {spent['epsilon']:.3g} (" in markdown


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"dp_epsilon": 0.0}, "--dp-epsilon must be a positive"),
    ({"dp_epsilon": -1.0}, "--dp-epsilon must be a positive"),
    ({"dp_epsilon": float("inf")}, "--dp-epsilon must be a positive"),
    ({"dp_delta": 0.0}, "--dp-delta must be between 0 and 1"),
    ({"dp_delta": 1.5}, "--dp-delta must be between 0 and 1"),
    ({"dp_clip": 0.0}, "--dp-clip must be a positive"),
    ({"dp_clip": -2.0}, "--dp-clip must be a positive"),
    ({"dp_epsilon": None, "dp_clip": 1.0}, "only apply with --dp-epsilon"),
    ({"dp_epsilon": None, "dp_count_share": 0.1}, "only apply with --dp-epsilon"),
    ({"class_balanced": False, "dp_count_share": 0.1}, "no label counts are released"),
    ({"dp_count_share": 1.0}, "--dp-count-share must be between 0 and 1"),
    ({"dp_count_share": float("nan")}, "--dp-count-share must be between 0 and 1"),
])
def test_bad_dp_options_are_usage_errors(small_prepared, options, message):
    with pytest.raises(UsageError, match=message):
        FederateConfig(data=str(small_prepared), **{**DP, **options})


def test_budgets_that_cannot_be_met_are_refused_before_anything_is_written(small_prepared, tmp_path):
    with pytest.raises(UsageError, match="too small a budget"):
        federate(small_prepared, tmp_path / "tiny", dp_epsilon=0.001)
    with pytest.raises(UsageError, match="not below 1 / "):
        federate(small_prepared, tmp_path / "delta", dp_delta=0.5)
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "delta").exists()


def test_cli_reports_a_bad_budget_without_a_traceback(small_prepared, tmp_path):
    result = CliRunner().invoke(cli, ["federate", "--data", str(small_prepared), "--out",
                                      str(tmp_path / "r"), "--dp-epsilon", "-1"])
    assert result.exit_code == 2 and "--dp-epsilon -1.0: must be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_methods_beyond_lora_and_paths_without_per_sample_grads_are_refused(small_prepared):
    with pytest.raises(UsageError, match=r"central-full.*beyond the LoRA adapters"):
        check_dp_method(METHODS["central-full"])
    with pytest.raises(UsageError, match=r"central-full.*beyond the LoRA adapters"):
        FederateConfig(data=str(small_prepared), **{**DP, "method": "central-full"})
    for spec in METHODS.values():  # every LoRA method of the table is supported
        if not spec.trains_backbone:
            check_dp_method(spec)
    with pytest.raises(UsageError, match="per-sample gradients are not supported"):
        check_dp_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "duallora")
    cfg = FederateConfig(data=str(small_prepared), **DP)  # the Flower engine runs DP-SGD too
    assert run_config_of(cfg, small_prepared, sites=4)["dp_epsilon"] == DP["dp_epsilon"]


# --- DP with the defaults: class balancing by private counts ---------------------------------------


@pytest.mark.e2e
def test_dp_epsilon_alone_balances_classes_with_private_counts_and_records_it(small_prepared, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["federate", "--data", str(small_prepared), "--out", str(run),
                                      "--dp-epsilon", "3", "--rounds", "1", "--rank", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "class balancing with private label counts" in " ".join(result.output.split())
    record = run_json(run)
    assert record["config"]["class_balanced"] is True and record["config"]["dp_count_share"] is None
    balance = record["privacy"]["class_balance"]
    assert balance["mode"] == "private counts" and balance["count_share"] == 0.1
    for site, plan in record["privacy"]["sites"].items():
        counts, weights = balance["sites"][site]["released_counts"], balance["sites"][site]["class_weights"]
        assert plan["released_counts"] == counts and len(counts) == 2 and min(counts) >= 1
        assert weights == pytest.approx([min(counts) / c for c in counts]) and max(weights) == 1
        spent = record["result"]["privacy"][site]
        assert spent["count_epsilon"] > 0 and spent["epsilon"] <= 3.0
    assert privacy_summary(record)["class_balance"] == balance
    # an explicit --no-class-balanced releases nothing and gives DP-SGD the whole budget
    off = tmp_path / "off"
    result = CliRunner().invoke(cli, ["federate", "--data", str(small_prepared), "--out", str(off),
                                      "--dp-epsilon", "3", "--rounds", "1", "--rank", "2",
                                      "--no-class-balanced", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert run_json(off)["privacy"]["class_balance"]["mode"] == "off"
    for site, plan in run_json(off)["privacy"]["sites"].items():
        assert plan["count_noise_multiplier"] is None
        assert plan["noise_multiplier"] < record["privacy"]["sites"][site]["noise_multiplier"]


@pytest.fixture(scope="session")
def pretrained_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cohort at the grid the shipped tiny-pretrained backbone was trained on (64 x 64 x 8)."""
    from cmrfed.data.prepare import PrepareOptions, prepare
    from cmrfed.data.synth import write_synthetic_cohort

    root = tmp_path_factory.mktemp("cohort64")
    write_synthetic_cohort(root / "raw", seed=0, subjects=40, shape=(64, 64, 8), frames=8)
    prepare(PrepareOptions(out=root / "prepared", acdc=root / "raw" / "acdc", mnms=root / "raw" / "mnms",
                           mnms2=root / "raw" / "mnms2", spacing=(2.0, 2.0, 10.0), shape=(64, 64, 8),
                           seed=0), console=quiet_console())
    return root / "prepared"


@pytest.mark.e2e
def test_a_dp_run_at_epsilon_8_decides_above_chance_where_it_ranks_above_chance(pretrained_cohort, tmp_path):
    """The collapse DP-SGD without class balancing shows (every subject called the majority class
    at 0.5 although the AUC is high) does not happen with the private counts."""
    cfg = FederateConfig(data=str(pretrained_cohort), method="duallora", backbone="tiny-pretrained",
                         blocks=1, rounds=3, rank=4, batch_size=8, lr=1e-2, augment="none",
                         dp_epsilon=8.0)
    inprocess.federate(cfg, tmp_path / "run", device="cpu", console=quiet_console())
    summary = evaluate_run(tmp_path / "run", n_boot=10, device="cpu", console=quiet_console())
    per_site = json.loads((summary.out / "metrics.json").read_text())["per_client"]
    ranked = {site: m for site, m in per_site.items() if m["auc"] is not None and m["auc"] >= 0.75}
    assert len(ranked) >= 2, per_site
    for site, metrics in ranked.items():
        assert metrics["balanced_accuracy"] >= 0.65, (site, metrics)
    assert summary.macro["balanced_accuracy"] >= 0.65


@pytest.mark.e2e
def test_a_dp_study_reports_each_row_at_its_validation_chosen_threshold(small_prepared, tmp_path):
    from cmrfed.study.config import load_study
    from cmrfed.study.runner import run_study

    file = tmp_path / "dp.toml"
    file.write_text(f"""
[data]
prepared = "{small_prepared}"
[federate]
rounds = 1
local-epochs = 1
batch-size = 4
dp-epsilon = 8
device = "cpu"
[grid]
methods = ["duallora", "fedlora"]
seeds = [0]
blocks = [1]
ranks = [2]
[evaluate]
threshold = "youden-val"
n-boot = 10
[report]
title = "dp study"
""", encoding="utf-8")
    result = run_study(load_study(file), tmp_path / "out", console=quiet_console())
    doc = result.report.document
    assert [m["threshold"] for m in doc["main"]["methods"]] == ["youden-val", "youden-val"]
    markdown = (result.report.out / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith(("| duallora |", "| fedlora |"))]
    assert len(rows) >= 2 and all(row.split(" | ")[2] == "youden-val" for row in rows[:2])
    assert "`youden-val` (each site's model at its Youden threshold on its own val split)" in markdown
    assert "private counts, share 0.1" in markdown  # the privacy section: how classes were balanced
