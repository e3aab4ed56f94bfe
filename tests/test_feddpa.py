"""FedDPA (``--method feddpa``) and ``--aggregate``: the round's phases train exactly their groups,
the instance weight against an independent computation, the mixing's end points, the private
reference never sent, DP counting both phases, and uniform FedAvg against a hand-computed mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SMALL_SHAPE, quiet_console

from cmrfed import paths
from cmrfed.cli import cli
from cmrfed.errors import UsageError
from cmrfed.fed import inprocess, rounds
from cmrfed.fed.client import Client, SplitTensors, TrainConfig
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.flower_config import federate_config_of, run_config_of
from cmrfed.fed.methods import GLOBAL, HEAD, LOCAL, METHODS, PRIVATE, REFERENCE, SHARED, resolve_method
from cmrfed.fed.mixing import SIMILARITY, instance_weight
from cmrfed.fed.privacy import plan_run
from cmrfed.fed.strategy import FedAvg, FitResult
from cmrfed.fed.task import build_run_model
from cmrfed.fed.wire import decode
from cmrfed.fed.wire import encode as real_encode
from cmrfed.model.classifier import param_group
from cmrfed.model.lora import lora_layers, set_active_adapters
from cmrfed.study.config import parse_study

CPU = torch.device("cpu")
LOCAL_GROUPS = {"local.A", "local.B"}
GLOBAL_GROUPS = {"global.A", "global.B"}


def workspace(head: str = "shared", **options):
    """A feddpa model, and a 10-subject train split and a 6-subject test split from the cached trunk."""
    cfg = FederateConfig(data="", method="feddpa", blocks=2, rank=2, head=head, **options)
    run_model = build_run_model(cfg, SMALL_SHAPE)
    model = run_model.model
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((16, 2, *SMALL_SHAPE), generator=generator)
    with torch.no_grad():
        h, skips = model.backbone.embed(images)
        h = model.backbone.forward_blocks(h, 0, run_model.start_block)

    def split(rows: slice, labels: list[int]) -> SplitTensors:
        ids = tuple(f"s{i}" for i in range(rows.start, rows.stop))
        return SplitTensors(ids, torch.tensor(labels), (h[rows], skips[rows]), run_model.start_block)

    train = split(slice(0, 10), [0, 1] * 5)
    test = split(slice(10, 16), [0, 1, 1, 0, 1, 0])
    return cfg, run_model, model, train, test


def moved_off_init(run_model, model) -> dict[str, torch.Tensor]:
    """The initial state with every adapter and head tensor perturbed (B = 0 would hide a LoRA)."""
    generator = torch.Generator().manual_seed(1)
    state = dict(run_model.initial_state)
    for name in state:
        if param_group(name) is not None:
            state[name] = state[name] + 0.3 * torch.randn(state[name].shape, generator=generator)
    return state


# --- the method table --------------------------------------------------------------------------


def test_the_table_row_is_fedDPA_T():
    spec = METHODS["feddpa"]
    assert spec.shared == GLOBAL_GROUPS | {HEAD}
    assert spec.private == LOCAL_GROUPS | {REFERENCE}  # the reference is kept, never trained or sent
    assert [p.trains for p in spec.phases] == [PRIVATE, SHARED]
    local_phase, global_phase = spec.phases
    assert dict(local_phase.mix) == {GLOBAL: 0.5, LOCAL: 0.5}  # the global LoRA frozen and mixed in
    assert dict(global_phase.mix) == {GLOBAL: 1.0}  # no local adapter present
    assert spec.phase_groups(local_phase) == LOCAL_GROUPS
    assert spec.phase_groups(global_phase) == GLOBAL_GROUPS | {HEAD}
    head_local = resolve_method("feddpa", head="local")
    assert head_local.phase_groups(local_phase) == LOCAL_GROUPS | {HEAD}
    assert head_local.phase_groups(global_phase) == GLOBAL_GROUPS
    # a newcomer (`cmrfed adapt`) trains its own local LoRA, in the local phase only
    assert spec.newcomer.training_phases == (local_phase,)
    assert spec.newcomer.phase_groups(local_phase) == LOCAL_GROUPS
    assert all(s.training_phases == s.phases for s in METHODS.values())


# --- the round's schedule ----------------------------------------------------------------------


@pytest.mark.parametrize("head", ["shared", "local"])
def test_each_phase_trains_exactly_its_groups_with_its_adapters_present(head):
    cfg, run_model, model, train, _ = workspace(head)
    spec = run_model.spec
    client = Client("site", 0, spec, moved_off_init(run_model, model), train, None,
                    TrainConfig(batch_size=4, lr=1e-2), seed=3)
    layer = next(layer for _, layer in lora_layers(model))
    fired: list[tuple[tuple, str, bool]] = []  # (adapters in the forward, group, gradient nonzero)

    def hook(name):
        def record(param):
            mix = (layer.active_adapters, tuple(sorted(
                (k, float(v)) for k, v in layer.adapter_weights.items())))
            fired.append((mix, param_group(name), bool(param.grad.abs().sum() > 0)))
        return record

    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in model.named_parameters()
               if param_group(n) is not None]
    before = {k: v.clone() for k, v in client.state.items()}
    try:
        client.fit(model, 1, CPU)
    finally:
        for handle in handles:
            handle.remove()
    by_phase: dict[tuple, set[str]] = {}
    for mix, group, nonzero in fired:
        by_phase.setdefault(mix, set()).add(group)
        assert nonzero, (mix, group)
    local_phase, global_phase = spec.phases
    assert by_phase == {
        ((GLOBAL, LOCAL), ((GLOBAL, 0.5), (LOCAL, 0.5))): set(spec.phase_groups(local_phase)),
        ((GLOBAL,), ((GLOBAL, 1.0),)): set(spec.phase_groups(global_phase)),
    }
    # every trained tensor moved, the reference was drawn, and the workspace is left unmixed
    changed = {param_group(k) for k in before
               if k != REFERENCE and not torch.equal(before[k], client.state[k])}
    assert changed == set(spec.trained)
    assert client.state[REFERENCE].shape == (cfg.feddpa_k, model.feature_dim)
    assert layer.active_adapters is None and layer.adapter_weights == {}


def test_the_local_phase_sees_the_frozen_global_adapter_and_the_global_phase_no_local_one():
    _, run_model, model, train, _ = workspace()
    client = Client("site", 0, run_model.spec, moved_off_init(run_model, model), train, None,
                    TrainConfig(), seed=0)
    client.predict(model, train, CPU)  # loads the state
    inputs = train.batch(torch.arange(4), CPU)
    local_phase, global_phase = run_model.spec.phases

    def logits(phase):
        set_active_adapters(model, phase.adapters, dict(phase.mix))
        return train.forward(model, inputs)

    def double(group):
        for name, param in model.named_parameters():
            if param_group(name) == group:
                param.mul_(2.0)

    with torch.no_grad():
        first, second = logits(local_phase), logits(global_phase)
        double("local.B")
        assert torch.equal(logits(global_phase), second)  # no local adapter present
        assert not torch.allclose(logits(local_phase), first)
        changed = logits(local_phase)
        double("global.B")
        assert not torch.allclose(logits(local_phase), changed)  # the global one is mixed in
    set_active_adapters(model, None)


# --- the instance-wise mixing --------------------------------------------------------------------


def test_instance_weight_equals_an_independent_computation():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(7, 12))
    reference = rng.normal(size=(4, 12))
    expected = [0.3 * np.mean([f @ r / (np.linalg.norm(f) * np.linalg.norm(r)) for r in reference])
                for f in features]
    got = instance_weight(torch.from_numpy(features), torch.from_numpy(reference), 0.3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    # the local adapter gets w, the global one 1 - w (the paper's convention, cmrfed/fed/mixing.py)
    mix = SIMILARITY.mix(got)
    assert torch.equal(mix[LOCAL], got) and torch.allclose(mix[GLOBAL], 1 - got)


def test_predict_mixes_each_instance_by_its_own_weight():
    """A site's prediction equals, instance by instance, the model with the adapters weighted by
    that instance's w computed independently (numpy) from the local-only features."""
    _, run_model, model, train, test = workspace(feddpa_scale=0.8)
    client = Client("site", 0, run_model.spec, moved_off_init(run_model, model), train, None,
                    TrainConfig(mixing_scale=0.8, mixing_k=3), seed=0)
    generator = torch.Generator().manual_seed(2)
    client.state[REFERENCE] = SIMILARITY.reference(model, train, 3, generator, CPU)
    probs = client.predict(model, test, CPU)
    reference = client.state[REFERENCE].numpy()
    for i in range(len(test)):
        inputs = test.batch(torch.tensor([i]), CPU)
        with torch.no_grad():
            set_active_adapters(model, (LOCAL,))
            f = test.features(model, inputs)[0].numpy()
            w = 0.8 * np.mean([f @ r / (np.linalg.norm(f) * np.linalg.norm(r)) for r in reference])
            set_active_adapters(model, (LOCAL, GLOBAL), {LOCAL: float(w), GLOBAL: float(1 - w)})
            expected = torch.softmax(test.forward(model, inputs), -1)[0, 1].item()
        assert probs[i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    set_active_adapters(model, None)


@pytest.mark.parametrize(("w", "alone"), [(1.0, LOCAL), (0.0, GLOBAL)])
def test_weight_one_is_the_local_adapter_alone_and_zero_the_global_one(w, alone):
    _, run_model, model, _, test = workspace()
    client = Client("site", 0, run_model.spec, moved_off_init(run_model, model), test, None,
                    TrainConfig(), seed=0)
    client.predict(model, test, CPU)  # loads the state
    inputs = test.batch(torch.arange(len(test)), CPU)
    with torch.no_grad():
        mix = SIMILARITY.mix(torch.full((len(test),), w))
        set_active_adapters(model, tuple(mix), mix)
        mixed = test.forward(model, inputs)
        set_active_adapters(model, (alone,))
        single = test.forward(model, inputs)
        set_active_adapters(model, None)
        both = test.forward(model, inputs)
    torch.testing.assert_close(mixed, single)
    assert not torch.allclose(single, both)  # the other adapter does matter


def test_without_a_reference_the_model_is_not_mixed():
    """The shared-only model and a held-out site before `adapt` hold no reference: every adapter
    counts once (an untrained local LoRA then adds nothing)."""
    _, run_model, model, train, test = workspace()
    state = moved_off_init(run_model, model)
    assert run_model.initial_state[REFERENCE].shape == (0, model.feature_dim)
    plain = Client("site", 0, run_model.spec, state, train, None, TrainConfig(), seed=0)
    probs = plain.predict(model, test, CPU)
    with torch.no_grad():
        expected = torch.softmax(test.forward(model, test.batch(torch.arange(len(test)), CPU)), -1)[:, 1]
    np.testing.assert_array_equal(probs, expected.numpy())


def test_the_reference_is_private_and_never_in_the_shared_state():
    _, run_model, model, train, _ = workspace()
    client = Client("site", 0, run_model.spec, run_model.initial_state, train, None,
                    TrainConfig(batch_size=5), seed=0)
    result = client.fit(model, 1, CPU)
    assert REFERENCE not in result.shared and REFERENCE not in client.shared_state()
    assert not any(torch.equal(t, client.state[REFERENCE]) for t in result.shared.values()
                   if t.shape == client.state[REFERENCE].shape)
    assert client.private_state()[REFERENCE].shape == (5, model.feature_dim)


# --- DP counts both phases ---------------------------------------------------------------------


def test_dp_plans_count_every_phase_of_the_round():
    sites = {"a": 20}
    options = {"data": "", "rounds": 2, "batch_size": 4, "class_balanced": False, "dp_epsilon": 3.0}
    dual = plan_run(FederateConfig(method="duallora", **options), sites)
    dpa = plan_run(FederateConfig(method="feddpa", **options), sites)
    for site in sites:
        assert dpa[site].phases == 2 and dual[site].phases == 1
        assert dpa[site].steps_per_round == 2 * dual[site].steps_per_round
        # twice the steps within the same budget: more noise, and the same epsilon spent
        assert dpa[site].noise_multiplier > dual[site].noise_multiplier
        assert dpa[site].epsilon(dpa[site].planned_steps) <= 3.0 * (1 + 1e-9)


# --- --aggregate -------------------------------------------------------------------------------


def test_uniform_aggregate_is_the_hand_computed_mean_and_weighted_stays_the_default():
    states = [{"t": torch.tensor([1.0, 2.0])}, {"t": torch.tensor([4.0, 8.0])},
              {"t": torch.tensor([7.0, 5.0])}]
    results = [FitResult(f"c{i}", s, n, 0.0)
               for i, (s, n) in enumerate(zip(states, [10, 1, 5], strict=True))]
    uniform = FedAvg("uniform").aggregate(results)
    torch.testing.assert_close(uniform["t"], torch.tensor([(1 + 4 + 7) / 3, (2 + 8 + 5) / 3]))
    weighted = FedAvg().aggregate(results)
    torch.testing.assert_close(weighted["t"], torch.tensor([(10 + 4 + 35) / 16, (20 + 8 + 25) / 16]))
    with pytest.raises(UsageError, match="--aggregate"):
        FedAvg("median")
    with pytest.raises(UsageError, match="--aggregate"):
        FederateConfig(data="", aggregate="median")
    assert FederateConfig(data="").aggregate == "weighted"
    for bad in ({"feddpa_scale": 1.5}, {"feddpa_scale": 0.0}, {"feddpa_k": 0}):
        with pytest.raises(UsageError, match="--feddpa-"):
            FederateConfig(data="", method="feddpa", **bad)


@pytest.mark.e2e
def test_a_feddpa_run_sends_no_reference_and_averages_uniformly(small_prepared, tmp_path, monkeypatch):
    payloads: list[bytes] = []

    def spy(state):
        payloads.append(real_encode(state))
        return payloads[-1]

    monkeypatch.setattr(inprocess, "encode", spy)
    cfg = FederateConfig(data=str(small_prepared), method="feddpa", rounds=1, rank=2, batch_size=8,
                         aggregate="uniform", feddpa_k=3)
    out = tmp_path / "run"
    inprocess.federate(cfg, out, device="cpu", console=quiet_console())
    record = json.loads(paths.run_config_path(out).read_text())
    assert record["config"]["aggregate"] == "uniform" and record["config"]["feddpa_k"] == 3
    sent = [decode(p) for p in payloads]
    assert all(REFERENCE not in state for state in sent)
    sites = record["clients"]
    ups, down = sent[:len(sites)], sent[len(sites)]
    for key, tensor in down.items():  # the one download: the plain mean of the uploads
        torch.testing.assert_close(tensor, torch.stack([u[key] for u in ups]).mean(0))
    last = rounds.read_checkpoint(out)[1]
    for site in sites:
        assert last[f"client:{site}"][REFERENCE].shape[0] == 3


def test_the_options_reach_a_study_flower_and_the_command_line(tmp_path):
    text = ('[data]\nprepared = "p"\n[federate]\naggregate = "uniform"\nfeddpa-scale = 0.25\n'
            'feddpa-k = 3\n[grid]\nmethods = ["duallora", "feddpa"]\n')
    base = parse_study(text, "s.toml", tmp_path).base
    assert (base.aggregate, base.feddpa_scale, base.feddpa_k) == ("uniform", 0.25, 3)
    cfg = FederateConfig(data="x", method="feddpa", aggregate="uniform", feddpa_scale=0.25, feddpa_k=3)
    assert federate_config_of(run_config_of(cfg, tmp_path / "RUN", sites=2)) == cfg
    result = CliRunner().invoke(cli, ["federate", "--data", str(tmp_path), "--method", "feddpa",
                                      "--feddpa-k", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--feddpa-k 0: must be at least 1" in result.output
