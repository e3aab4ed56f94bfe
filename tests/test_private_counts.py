"""Class balancing under DP: the label-count release (a Gaussian mechanism), its composition with
DP-SGD against closed forms, its sensitivity to one subject, and weights that keep the clip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmrfed.fed.client import derive_seed
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.privacy import (
    RDP_ORDERS,
    composed_epsilon,
    count_share_of,
    epsilon_spent,
    plan_run,
    plan_site,
    weighted_clipped,
)
from cmrfed.fed.private_counts import (
    COUNT_FLOOR,
    COUNT_STREAM,
    DEFAULT_COUNT_SHARE,
    balanced_weights,
    label_counts,
    release_counts,
)

EPS, N, BATCH, ROUNDS = 3.0, 40, 8, 4


def closed_form_epsilon(rdp_of_order, delta: float) -> float:
    """(epsilon, delta) of an RDP curve by the conversion of Balle et al. 2020 (Prop. 12), the one
    Opacus uses, minimised over cmrfed's orders; independent of Opacus."""
    return min(rdp_of_order(a) + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in RDP_ORDERS)


@pytest.fixture(scope="module")
def plan():
    return plan_site("site", N, epsilon=EPS, delta=None, clip=None, batch_size=BATCH, local_epochs=1,
                     rounds=ROUNDS, count_share=DEFAULT_COUNT_SHARE)


def test_the_count_noise_takes_its_share_of_a_whole_budget_gaussian_release(plan):
    sigma_c = plan.count_noise_multiplier
    delta = plan.delta
    # sigma_1 = sigma_c sqrt(share) spends the whole budget alone (within Opacus's 0.01 tolerance)
    sigma_1 = sigma_c * math.sqrt(plan.count_share)
    whole = closed_form_epsilon(lambda a: a / (2 * sigma_1**2), delta)
    assert EPS - 0.01 <= whole <= EPS
    # the count release alone: the closed form alpha / (2 sigma_c^2) equals Opacus's q = 1 step
    alone = closed_form_epsilon(lambda a: a / (2 * sigma_c**2), delta)
    assert plan.count_epsilon() == pytest.approx(alone, rel=1e-9)
    assert plan.count_epsilon() == pytest.approx(epsilon_spent(sigma_c, 1.0, 1, delta), rel=1e-12)


def test_the_composed_epsilon_is_the_sum_of_the_two_rdp_curves_converted_once(plan):
    from opacus.accountants.analysis.rdp import compute_rdp

    steps = plan.planned_steps
    sgd = compute_rdp(q=plan.sample_rate, noise_multiplier=plan.noise_multiplier, steps=steps,
                      orders=list(RDP_ORDERS))
    composed = closed_form_epsilon(
        lambda a: a / (2 * plan.count_noise_multiplier**2) + sgd[RDP_ORDERS.index(a)], plan.delta)
    assert plan.epsilon(steps) == pytest.approx(composed, rel=1e-9)
    assert EPS - 0.011 <= plan.epsilon(steps) <= EPS  # the whole budget, counts included
    # composition is sublinear: less than the two epsilons added, more than either alone
    sgd_alone = epsilon_spent(plan.noise_multiplier, plan.sample_rate, steps, plan.delta)
    assert max(sgd_alone, plan.count_epsilon()) < plan.epsilon(steps) < sgd_alone + plan.count_epsilon()
    # what the counts cost DP-SGD: more noise than the same site without them
    without = plan_site("site", N, epsilon=EPS, delta=None, clip=None, batch_size=BATCH,
                        local_epochs=1, rounds=ROUNDS)
    assert without.count_noise_multiplier is None and without.count_epsilon() == 0
    assert without.noise_multiplier < plan.noise_multiplier < 1.1 * without.noise_multiplier
    assert plan.epsilon(0) == pytest.approx(plan.count_epsilon())  # spent before the first step


def test_released_counts_are_the_true_counts_plus_seeded_gaussian_noise(plan):
    labels = torch.tensor([0] * 29 + [1] * 11)
    released = plan.with_counts(labels, seed=5, site_index=2)
    z = torch.randn(2, generator=torch.Generator().manual_seed(derive_seed(5, 2, COUNT_STREAM)),
                    dtype=torch.float64).numpy()
    expected = np.maximum(np.array([29.0, 11.0]) + plan.count_noise_multiplier * z, COUNT_FLOOR)
    np.testing.assert_allclose(released.released_counts, expected, rtol=0, atol=1e-12)
    assert released.with_counts(labels, seed=6, site_index=2) is released  # released once
    assert plan.with_counts(labels, seed=5, site_index=2) == released  # a resume draws the same
    assert plan.with_counts(labels, seed=5, site_index=3) != released  # each site its own noise
    weights = released.class_weights()
    torch.testing.assert_close(weights, torch.tensor(expected.min() / expected, dtype=torch.float32))


@pytest.mark.parametrize("change", ["add 0", "add 1", "remove 0", "remove 1", "replace 0->1"])
def test_one_subject_moves_the_pre_noise_counts_by_the_sensitivity(change):
    """With the same noise draw, adding or removing one subject moves the count vector by exactly
    one unit in one class (L2 sensitivity 1, the add/remove adjacency of the accountant; a
    replacement moves two, sqrt(2)), and the released counts and weights are those of the moved
    counts: nothing else about the site's labels reaches them."""
    labels = torch.tensor([0] * 17 + [1] * 6)
    kind, label = change.split(" ")
    if kind == "add":
        other = torch.cat([labels, torch.tensor([int(label)])])
    elif kind == "remove":
        other = labels[torch.arange(len(labels)) != int((labels == int(label)).nonzero()[0])]
    else:
        other = labels.clone()
        other[0] = 1
    before, after = label_counts(labels), label_counts(other)
    moved = np.linalg.norm(after - before)
    assert moved == (math.sqrt(2) if kind == "replace" else 1.0)
    sigma = 2.5
    a = release_counts(before, sigma, torch.Generator().manual_seed(11))
    b = release_counts(after, sigma, torch.Generator().manual_seed(11))
    noise = torch.randn(2, generator=torch.Generator().manual_seed(11), dtype=torch.float64).numpy()
    np.testing.assert_allclose(a, np.maximum(before + sigma * noise, COUNT_FLOOR), atol=1e-12)
    np.testing.assert_allclose(b, np.maximum(after + sigma * noise, COUNT_FLOOR), atol=1e-12)
    assert np.linalg.norm(np.subtract(b, a)) <= moved + 1e-12  # the floor only shrinks a change
    torch.testing.assert_close(balanced_weights(b), torch.tensor(min(b) / np.array(b), dtype=torch.float32))


def test_weights_at_most_one_keep_each_samples_clipped_gradient_within_the_clip():
    generator = torch.Generator().manual_seed(0)
    grads = {"a": 5 * torch.randn(6, 3, 4, generator=generator), "b": torch.randn(6, 7, generator=generator)}
    grads["a"][0] *= 1e-4  # one sample below the clip: scaled by its weight only
    grads["b"][0] *= 1e-4
    weights = balanced_weights((30.0, 7.5))
    assert weights.max() == 1 and weights.min() == pytest.approx(0.25)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    out = weighted_clipped(grads, weights[labels], clip=0.5)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in out.values()], dim=1).norm(dim=1)
    before = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    assert (norms <= 0.5 * weights[labels] + 1e-6).all()
    clipped = before > 0.5
    torch.testing.assert_close(norms[clipped], 0.5 * weights[labels][clipped], rtol=1e-5, atol=1e-7)
    assert not clipped[0]
    torch.testing.assert_close(norms[0], before[0] * weights[labels[0]])


def test_the_default_under_dp_is_class_balancing_with_private_counts():
    cfg = FederateConfig(data="", dp_epsilon=3.0)  # --dp-epsilon 3 alone: accepted
    assert cfg.class_balanced and count_share_of(cfg.class_balanced, cfg.dp_count_share) == 0.1
    assert count_share_of(False, None) is None
    # a site no larger than a batch (sample rate 1): the accountant's closed form, fast
    small = {"batch_size": 8, "rounds": 2, "dp_epsilon": 3.0}
    shared = plan_run(FederateConfig(data="", dp_count_share=0.3, **small), {"s": 8})["s"]
    default = plan_run(FederateConfig(data="", **small), {"s": 8})["s"]
    off = plan_run(FederateConfig(data="", class_balanced=False, **small), {"s": 8})["s"]
    assert (shared.count_share, default.count_share, off.count_share) == (0.3, 0.1, None)
    assert off.count_noise_multiplier is None and off.class_weights() is None
    # a larger share buys less noisy counts and leaves DP-SGD more noise
    assert shared.count_noise_multiplier < default.count_noise_multiplier
    assert off.noise_multiplier < default.noise_multiplier < shared.noise_multiplier
    for plan in (shared, default, off):
        assert composed_epsilon(plan.history(plan.planned_steps), plan.delta) <= 3.0


def test_the_dp_demo_is_the_demo_study_under_dp_scored_at_the_val_chosen_threshold(tmp_path):
    from cmrfed.demo import demo_study, dp_demo_text
    from cmrfed.templates import template_text

    plain = demo_study(tmp_path)
    private = demo_study(tmp_path, dp_demo_text(template_text("demo"), 3))
    assert plain.base.dp_epsilon is None and plain.evaluate["threshold"] == "0.5"
    assert private.base.dp_epsilon == 3.0 and private.base.class_balanced
    assert private.evaluate["threshold"] == "youden-val"
    assert private.methods == plain.methods and private.base.rounds == plain.base.rounds
