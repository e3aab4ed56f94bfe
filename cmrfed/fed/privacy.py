"""Differential privacy at every site: DP-SGD with an accountant, and the epsilon on record.

What it bounds: how much what a site sends (and the local adapter it keeps) can depend on any
one of its *training subjects*. Each site runs DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016) on every tensor it trains:

- Poisson sampling: at each step every training subject enters the batch independently with
  probability ``q = 1 / ceil(n / batch_size)`` (Opacus's rate for a loader of that batch size),
  drawn from a generator seeded by (run seed, round, site), so a resumed run draws the same;
- per-sample gradients of every trained tensor (LoRA factors and head, as the method table says),
  each sample's gradient clipped to L2 norm ``C``, summed, Gaussian noise ``N(0, (sigma C)^2)``
  added, divided by the expected batch size ``q n``: Opacus's :class:`DPOptimizer` does this clip
  + noise + scale step on the per-sample gradients set here, with a seeded noise generator;
- ``sigma`` calibrated per site with Opacus's ``get_noise_multiplier`` so that the whole run,
  ``rounds x phases x local_epochs x ceil(n / batch_size)`` steps, spends at most the target
  ``(epsilon, delta)`` under Opacus's RDP accountant (Mironov, "Renyi Differential Privacy",
  CSF 2017; Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019), for add/remove-one-subject neighbouring datasets;
- with class balancing on (the default), each site first releases its label counts through a
  Gaussian mechanism (cmrfed/fed/private_counts.py) and weights each sample's *clipped* gradient
  by the inverse frequency of its class computed from the released counts, every weight at most
  1 (so a sample still moves the sum by at most ``C``). The release is one more entry in the
  same RDP accountant (the sampled Gaussian mechanism at sample rate 1, one step, noise
  multiplier ``sigma_c``); ``sigma`` is calibrated on the composition, so counts and steps
  together spend at most ``(epsilon, delta)``.

A method whose round has several phases (FedDPA: the local LoRA, then the global one, each a pass
over the same subjects) runs DP-SGD in every phase, with sampling and noise streams of its own,
and the accountant counts the steps of all of them: ``phases`` is part of each site's plan. (With
FedDPA's head shared, the global phase never sees the local adapter, so counting the local phase
is conservative for what is sent; it is what bounds the local adapter, and with ``--head local``
the head trained in the local phase feeds the global phase.) FedDPA's inference mixing compares
test instances with representations of k training subjects that the site keeps; they never
leave it and are not DP, like the evaluation outputs.

Everything a site sends is computed from its DP-trained tensors, so it is (epsilon, delta)-DP by
post-processing. The number of training subjects of a site (its FedAvg weight, and what fixes
``q``) is treated as public, as in Opacus.

Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over the batch), the same
functorch route Opacus's GradSampleModule takes for layers it has no grad sampler for. Opacus's
hook-based GradSampleModule cannot be used as it stands: it hooks the ``LoRAAdapter`` modules,
which cmrfed's fused :class:`~cmrfed.model.lora.LoRALinear` never calls (it reads A and B inside
one ``addmm``), so the adapter factors would get no per-sample gradient at all. That the
per-sample gradients equal one-sample-at-a-time gradients, on the cache path and on the full
forward, is tested (tests/test_privacy.py).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmrfed import paths
from cmrfed.errors import UsageError
from cmrfed.fed.methods import MethodSpec
from cmrfed.fed.private_counts import (
    COUNT_STREAM,
    DEFAULT_COUNT_SHARE,
    balanced_weights,
    count_noise_multiplier,
    label_counts,
    release_counts,
)
from cmrfed.model.classifier import param_group
from cmrfed.seeding import derive_seed

ACCOUNTANT = "rdp"
# RDP orders: Opacus's default grid (1.1 ... 63) extended upwards, because a small site sampled at
# rate 1 (n <= batch size) over few steps has its optimal order above 63
RDP_ORDERS: tuple[float, ...] = (*(1 + x / 10.0 for x in range(1, 100)), *range(12, 64),
                                 64, 80, 96, 128, 192, 256, 384, 512, 768, 1024)
DEFAULT_CLIP = 1.0
DEFAULT_DELTA = 1e-5
# derive_seed tags of the two random streams of a private round (the shuffle uses none)
SAMPLING_STREAM = 0x5A3
NOISE_STREAM = 0x401
# rounding slack of a budget check (the accountant's floating point, not privacy)
BUDGET_RTOL = 1e-9
# epsilon the calibrated noise may leave unspent (Opacus's get_noise_multiplier default)
CALIBRATION_TOLERANCE = 0.01
MECHANISM = ("DP-SGD at each site: Poisson sampling, per-sample clipping of every trained tensor, "
             "Gaussian noise (Opacus DPOptimizer); sigma calibrated for the whole run")
UNIT = "one training subject of a site (add/remove-one neighbouring datasets)"
COUNT_RELEASE = ("class balancing with private label counts: each site's class counts released "
                 "once through a Gaussian mechanism (sensitivity 1), composed with DP-SGD in the "
                 "same RDP accountant; loss weights from the released counts")
NO_BALANCE = "no class balancing (--no-class-balanced): the whole budget goes to DP-SGD"

Forward = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- options -------------------------------------------------------------------------------------


def check_dp_options(epsilon: float | None, delta: float | None, clip: float | None,
                     class_balanced: bool, count_share: float | None = None) -> None:
    """Refuse DP options that cannot be stated (called by :class:`FederateConfig`).

    Class balancing (the default) is honoured under DP with privately released label counts, so
    ``--class-balanced`` is never refused; ``--dp-count-share`` needs both DP and balancing.
    """
    if epsilon is None:
        if delta is not None or clip is not None or count_share is not None:
            raise UsageError("--dp-delta, --dp-clip and --dp-count-share only apply with "
                             "--dp-epsilon; add --dp-epsilon E to train with differential privacy")
        return
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise UsageError(f"--dp-epsilon must be a positive number, got {epsilon}")
    if delta is not None and not 0 < delta < 1:
        raise UsageError(f"--dp-delta must be between 0 and 1 (well below 1 / training subjects "
                         f"of a site), got {delta}")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise UsageError(f"--dp-clip must be a positive number, got {clip}")
    if count_share is not None:
        if not class_balanced:
            raise UsageError("--dp-count-share with --no-class-balanced: no label counts are "
                             "released without class balancing; drop one of the two")
        if not (math.isfinite(count_share) and 0 < count_share < 1):
            raise UsageError(f"--dp-count-share must be between 0 and 1 (the share of each "
                             f"site's budget spent on its label counts), got {count_share}")


def count_share_of(class_balanced: bool, count_share: float | None) -> float | None:
    """The share of a DP budget spent on label counts: None when class balancing is off."""
    if not class_balanced:
        return None
    return DEFAULT_COUNT_SHARE if count_share is None else count_share


def check_dp_method(spec: MethodSpec) -> None:
    """DP-SGD here covers LoRA factors and the head: a method training anything else (backbone
    weights, e.g. full fine-tuning) is refused, whatever its name."""
    from cmrfed.fed.methods import METHODS

    beyond = sorted(spec.trained - spec.groups) or (["backbone"] if spec.trains_backbone else [])
    if beyond:
        lora = ", ".join(name for name, other in METHODS.items() if not other.trains_backbone)
        raise UsageError(f"--dp-epsilon: method {spec.name!r} trains {', '.join(beyond)} (weights "
                         "beyond the LoRA adapters and the head), which cmrfed's DP-SGD does not "
                         f"cover; use a LoRA method ({lora})")


def check_dp_model(model: nn.Module, method: str) -> None:
    """Per-sample gradients need each sample's output to depend on that sample alone: refuse a
    model with batch-coupled layers (BatchNorm and the like, as Opacus's validator finds them)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UsageError(f"--dp-epsilon: per-sample gradients are not supported for this model of "
                         f"{method!r} ({'; '.join(str(e) for e in errors[:3])})")


# --- the accountant ------------------------------------------------------------------------------


Mechanism = tuple[float, float, int]
"""One entry of the accountant's history: (noise multiplier, sample rate, steps)."""


@functools.lru_cache(maxsize=4096)
def composed_epsilon(history: tuple[Mechanism, ...], delta: float,
                     accountant: str = ACCOUNTANT) -> float:
    """Epsilon of every mechanism of ``history`` composed, by Opacus's accountant: for RDP the
    curves are summed at every order and converted to (epsilon, delta) once (cached: a pure
    function, asked again every round and by every report)."""
    history = tuple(h for h in history if h[2] > 0)
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    # RDP may warn "optimal order is the largest alpha": a looser bound, still valid. PRV at a
    # sample rate of 1 (the label-count release) takes log(1 - q) = -inf inside a np.where that
    # then picks the other branch: numpy's divide warning, not a wrong number.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta, **_accountant_options(accountant)))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = ACCOUNTANT) -> float:
    """Epsilon of ``steps`` DP-SGD steps at (sigma, q) for ``delta``, by Opacus's accountant."""
    return composed_epsilon(((noise_multiplier, sample_rate, steps),), delta, accountant)


def _accountant_options(accountant: str) -> dict[str, Any]:
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


@dataclass(frozen=True)
class SitePlan:
    """One site's DP-SGD: its sampling rate, steps and calibrated noise (recorded in run.json)."""

    site: str
    n_train: int
    sample_rate: float
    steps_per_epoch: int
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    clip: float
    delta: float
    target_epsilon: float
    accountant: str = ACCOUNTANT
    phases: int = 1  # DP-SGD passes per round (FedDPA: 2); steps_per_round counts them all
    # the label-count release of class balancing (private_counts.py); None: balancing is off
    count_share: float | None = None
    count_noise_multiplier: float | None = None
    released_counts: tuple[float, ...] | None = None

    @property
    def planned_steps(self) -> int:
        return self.steps_per_round * self.rounds

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_train

    def history(self, steps: int) -> tuple[Mechanism, ...]:
        """What the accountant composes after ``steps`` DP-SGD steps: the count release (one
        Gaussian mechanism at sample rate 1, released before the first step) and the steps."""
        counts = () if self.count_noise_multiplier is None else ((self.count_noise_multiplier, 1.0, 1),)
        return (*counts, (self.noise_multiplier, self.sample_rate, steps))

    def epsilon(self, steps: int) -> float:
        return composed_epsilon(self.history(steps), self.delta, self.accountant)

    def count_epsilon(self) -> float:
        """What the count release alone costs (0 without class balancing)."""
        if self.count_noise_multiplier is None:
            return 0.0
        return epsilon_spent(self.count_noise_multiplier, 1.0, 1, self.delta, self.accountant)

    def with_counts(self, labels: torch.Tensor, seed: int, site_index: int) -> SitePlan:
        """This plan with the site's label counts released (the Gaussian mechanism, noise seeded
        by (run seed, site)); itself when balancing is off or the counts are already released."""
        if self.count_noise_multiplier is None or self.released_counts is not None:
            return self
        if len(labels) != self.n_train:
            raise ValueError(f"site {self.site!r}: {len(labels)} labels for a plan of {self.n_train}")
        generator = torch.Generator().manual_seed(derive_seed(seed, site_index, COUNT_STREAM))
        released = release_counts(label_counts(labels), self.count_noise_multiplier, generator)
        return replace(self, released_counts=released)

    def class_weights(self) -> torch.Tensor | None:
        """Loss weights from the released counts (each at most 1), None without balancing."""
        if self.count_noise_multiplier is None:
            return None
        if self.released_counts is None:
            raise ValueError(f"site {self.site!r}: class weights asked before the counts are released")
        return balanced_weights(self.released_counts)

    def spent(self, rounds_done: int) -> dict[str, Any]:
        """What the site has spent after ``rounds_done`` rounds (cumulative)."""
        return self.spent_steps(self.steps_per_round * rounds_done)

    def spent_steps(self, steps: int) -> dict[str, Any]:
        """What the site has spent after ``steps`` DP-SGD steps (cumulative)."""
        return {
            "epsilon": self.epsilon(steps), "delta": self.delta, "steps": steps,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "clip": self.clip, "accountant": self.accountant,
            "target_epsilon": self.target_epsilon, "count_epsilon": self.count_epsilon(),
            "count_noise_multiplier": self.count_noise_multiplier,
            "released_counts": None if self.released_counts is None else list(self.released_counts),
        }

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "planned_steps": self.planned_steps,
               "planned_epsilon": self.epsilon(self.planned_steps), "count_epsilon": self.count_epsilon()}
        if self.released_counts is not None:
            out["released_counts"] = list(self.released_counts)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SitePlan:
        """A recorded plan (one written before ``phases`` existed had one phase per round; one
        written before class balancing under DP has no count fields: their defaults apply)."""
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        if values.get("released_counts") is not None:
            values["released_counts"] = tuple(values["released_counts"])
        values["phases"] = int(values.get("phases", 1))
        return cls(**values)

    def open_round(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, seed: int,
                   round_index: int, site_index: int, device: torch.device,
                   phase: int = 0) -> PrivateRound:
        return PrivateRound(self, model, optimizer, seed=seed, round_index=round_index,
                            site_index=site_index, device=device, phase=phase)


@functools.lru_cache(maxsize=256)
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int,
               prior: tuple[Mechanism, ...] = ()) -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose ``steps`` at ``sample_rate``,
    composed with the mechanisms of ``prior``, spend at most ``epsilon``: the bisection of
    Opacus's ``get_noise_multiplier`` over the composed accountant (cached: sites often share n).
    Raises ValueError when no noise level fits (``prior`` alone, or the budget, too small)."""
    from opacus.accountants.utils import MAX_SIGMA

    def spent(sigma: float) -> float:
        return composed_epsilon((*prior, (sigma, sample_rate, steps)), delta)

    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > epsilon:
        high *= 2
        eps_high = spent(high)
        if high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while epsilon - eps_high > CALIBRATION_TOLERANCE:
        sigma = (low + high) / 2
        eps = spent(sigma)
        if eps < epsilon:
            high, eps_high = sigma, eps
        else:
            low = sigma
    return high


def plan_site(site: str, n_train: int, *, epsilon: float, delta: float | None, clip: float | None,
              batch_size: int, local_epochs: int, rounds: int, phases: int = 1,
              count_share: float | None = None) -> SitePlan:
    """Calibrate one site's noise so its whole run stays within (epsilon, delta): with
    ``count_share``, the label-count release's noise first (:func:`count_noise_multiplier`), then
    DP-SGD's on what the composition leaves. Nothing here depends on the site's labels (the counts
    are released by :meth:`SitePlan.with_counts`), so a server can plan for its sites."""
    if delta is None:  # 1e-5, or 1 / (10 n) for a site of more than 10,000 subjects
        delta = min(DEFAULT_DELTA, 0.1 / n_train)
    if delta >= 1.0 / n_train:
        raise UsageError(f"--dp-delta {delta:g} is not below 1 / {n_train} (the training subjects of "
                         f"site {site!r}): such a delta allows leaking a whole subject; pass a "
                         "smaller --dp-delta (or leave the default)")
    steps_per_epoch = math.ceil(n_train / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs * phases
    steps = steps_per_round * rounds
    try:
        count_sigma = None
        if count_share is not None:
            count_sigma = count_noise_multiplier(_calibrate(epsilon, delta, 1.0, 1), count_share)
        prior = () if count_sigma is None else ((count_sigma, 1.0, 1),)
        sigma = _calibrate(epsilon, delta, sample_rate, steps, prior)
    except ValueError as exc:
        raise UsageError(f"--dp-epsilon {epsilon:g} is too small a budget for site {site!r}: no "
                         f"noise level keeps even one step within it at delta {delta:g}; raise "
                         "--dp-epsilon (or --dp-delta)") from exc
    plan = SitePlan(site=site, n_train=n_train, sample_rate=sample_rate,
                    steps_per_epoch=steps_per_epoch, steps_per_round=steps_per_round,
                    rounds=rounds, noise_multiplier=float(sigma),
                    clip=DEFAULT_CLIP if clip is None else clip, delta=delta,
                    target_epsilon=epsilon, phases=phases, count_share=count_share,
                    count_noise_multiplier=count_sigma)
    if plan.epsilon(steps) > epsilon * (1 + BUDGET_RTOL):  # calibration must never overshoot
        raise AssertionError(f"calibrated sigma {sigma} spends {plan.epsilon(steps)} > {epsilon}")
    return plan


def plan_run(cfg: Any, sites: Mapping[str, int]) -> dict[str, SitePlan]:
    """A plan per training site (``sites``: name -> training subjects) of a DP run, counting every
    training phase of the method's round; the count release of class balancing is planned here and
    made by each site (:meth:`SitePlan.with_counts`)."""
    from cmrfed.fed.methods import resolve_method

    phases = len(resolve_method(cfg.method, cfg.head).training_phases)
    share = count_share_of(cfg.class_balanced, cfg.dp_count_share)
    return {
        name: plan_site(name, n, epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, clip=cfg.dp_clip,
                        batch_size=cfg.batch_size, local_epochs=cfg.local_epochs, rounds=cfg.rounds,
                        phases=phases, count_share=share)
        for name, n in sites.items()
    }


def spent_record(plans: Mapping[str, SitePlan], rounds_done: int) -> dict[str, dict[str, Any]]:
    """Per site, the cumulative spend after ``rounds_done`` rounds (rounds.jsonl, run.json)."""
    return {name: plan.spent(rounds_done) for name, plan in plans.items()}


def class_balance_record(plans: Mapping[str, SitePlan]) -> dict[str, Any]:
    """How class balancing was done under DP (run.json, every report): the private count release
    with its share, noise and each site's released counts and weights, or off."""
    first = next(iter(plans.values()))
    if first.count_noise_multiplier is None:
        return {"mode": "off", "text": NO_BALANCE}
    return {
        "mode": "private counts", "text": COUNT_RELEASE, "count_share": first.count_share,
        "sites": {name: {"count_noise_multiplier": p.count_noise_multiplier,
                         "count_epsilon": p.count_epsilon(),
                         "released_counts": None if p.released_counts is None else list(p.released_counts),
                         "class_weights": None if p.released_counts is None
                         else [float(w) for w in balanced_weights(p.released_counts)]}
                  for name, p in plans.items()},
    }


def class_balance_line(plans: Mapping[str, SitePlan]) -> str:
    """One human line, printed when a DP run starts: what class balancing does under DP."""
    record = class_balance_record(plans)
    if record["mode"] == "off":
        return f"differential privacy: {NO_BALANCE}"
    sites = ", ".join(f"{name} {', '.join(f'{c:.1f}' for c in s['released_counts'] or ())} "
                      f"(sigma_c {s['count_noise_multiplier']:.3g}, alone eps {s['count_epsilon']:.3g})"
                      for name, s in record["sites"].items())
    return (f"differential privacy: class balancing with private label counts (share "
            f"{record['count_share']:g} of each site's budget; --no-class-balanced gives DP-SGD all "
            f"of it); released counts (class 0, 1): {sites}")


def run_privacy_record(plans: Mapping[str, SitePlan]) -> dict[str, Any]:
    """The ``privacy`` block of run.json, written before the first round."""
    from opacus import __version__ as opacus_version

    first = next(iter(plans.values()))
    return {
        "mechanism": MECHANISM, "unit": UNIT, "accountant": first.accountant,
        "target_epsilon": first.target_epsilon, "clip": first.clip, "opacus": opacus_version,
        "class_balance": class_balance_record(plans),
        "sites": {name: plan.to_dict() for name, plan in plans.items()},
    }


def recorded_plans(run_info: Mapping[str, Any]) -> dict[str, SitePlan] | None:
    """The plans of run.json (a resumed run keeps the noise it started with), None if not DP."""
    block = run_info.get("privacy")
    if not block:
        return None
    return {name: SitePlan.from_dict(raw) for name, raw in block["sites"].items()}


def privacy_summary(run_info: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a run spent, per site, for reports (evaluate, compare, a study): None if not DP.

    Reads run.json's ``privacy`` block and its ``result``; this is the one function a report
    calls, so every report states the same numbers.
    """
    plans = recorded_plans(run_info)
    if plans is None:
        return None
    result = run_info.get("result", {})
    spent = result.get("privacy") or spent_record(plans, 0)
    block = run_info["privacy"]
    return {
        "target_epsilon": block["target_epsilon"], "clip": block["clip"],
        "accountant": block["accountant"], "unit": block["unit"],
        "class_balance": block.get("class_balance") or class_balance_record(plans),
        "max_epsilon": max(s["epsilon"] for s in spent.values()),
        "sites": spent, "stopped": result.get("stopped"),
    }


def run_privacy(run: str | Path) -> dict[str, Any] | None:
    """:func:`privacy_summary` of a RUN folder (None when it has no run.json or no DP)."""
    config_file = paths.run_config_path(Path(run))
    if not config_file.exists():
        return None
    return privacy_summary(json.loads(config_file.read_text(encoding="utf-8")))


def _balance_text(summary: Mapping[str, Any]) -> str:
    """The class-balance cell of a report: the count share and each site's released counts."""
    balance = summary.get("class_balance") or {"mode": "off"}
    if balance["mode"] == "off":
        return "off"
    sites = "; ".join(f"{name} {'/'.join(f'{c:.1f}' for c in s['released_counts'] or ())} "
                      f"(sigma_c {s['count_noise_multiplier']:.3g})"
                      for name, s in balance["sites"].items())
    return f"private counts, share {balance['count_share']:g}: {sites}"


def privacy_markdown(runs: Sequence[tuple[str, int, str]],
                     summaries: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """A report's "Differential privacy" section: one row per (method, seed, run folder)."""
    lines = ["## Differential privacy (per site, whole run)", ""]
    if not any(summaries.get(run) for _, _, run in runs):
        return [*lines, "None of these runs used differential privacy (no `--dp-epsilon`): nothing "
                "bounds what their shared tensors reveal about a training subject."]
    lines += ["| method | seed | target eps | clip | accountant | per site: eps spent (sigma, q, "
              "steps, delta) | class balance: released counts (class 0/1) |",
              "|---|---:|---:|---:|---|---|---|"]
    for method, seed, run in runs:
        summary = summaries.get(run)
        if summary is None:
            lines.append(f"| {method} | {seed} | not DP | — | — | — | — |")
            continue
        sites = "; ".join(f"{name} {s['epsilon']:.3g} ({s['noise_multiplier']:.3g}, "
                          f"{s['sample_rate']:.3g}, {s['steps']}, {s['delta']:.2g})"
                          for name, s in summary["sites"].items())
        stopped = f" (stopped: {summary['stopped']['reason']})" if summary.get("stopped") else ""
        lines.append(f"| {method} | {seed} | {summary['target_epsilon']:g} | {summary['clip']:g} | "
                     f"{summary['accountant']} | {sites}{stopped} | {_balance_text(summary)} |")
    lines += ["", f"Unit protected: {UNIT}, against anyone who sees what a site sends; the "
              "evaluation outputs in this report are not DP-protected. Epsilon spent includes the "
              "release of the label counts (class balancing), composed with DP-SGD in one RDP "
              "accountant."]
    return lines


def privacy_line(summary: Mapping[str, Any] | None) -> str:
    """One human line: the budget and what each site spent ("not DP" when there is none)."""
    if summary is None:
        return "differential privacy: none (no --dp-epsilon)"
    sites = ", ".join(f"{name} eps {s['epsilon']:.3g} (sigma {s['noise_multiplier']:.3g}, "
                      f"delta {s['delta']:.2g}, {s['steps']} steps)"
                      for name, s in summary["sites"].items())
    return (f"differential privacy ({summary['accountant']}): target eps "
            f"{summary['target_epsilon']:g}, clip {summary['clip']:g}; spent: {sites}; class "
            f"balance: {_balance_text(summary)}")


# --- one private round ---------------------------------------------------------------------------


class _Bound(nn.Module):
    """``forward(model, inputs)`` as a module, so ``functional_call`` can swap the trained tensors."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, inputs)


def per_sample_grads(model: nn.Module, params: Mapping[str, nn.Parameter], forward: Forward,
                     inputs: Sequence[torch.Tensor], target: torch.Tensor,
                     loss_fn: LossFn) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each sample's own loss w.r.t. ``params`` (name -> (B, *shape)), and the losses.

    ``vmap`` runs the forward on one sample at a time (batch of 1) in a single batched pass, so a
    sample's gradient cannot see another sample; frozen tensors stay the model's own.

    The per-sample pass runs in float32 even under ``--precision bf16`` (the client passes its
    forward without autocast), for two reasons. DP-SGD's guarantee rests on every sample's clipped
    gradient having norm at most C, and Opacus computes the norms and clip factors from these
    tensors: bfloat16 gradients (8-bit mantissa) would put each norm off by up to ~0.4 % per
    element, so a "clipped" gradient could exceed C and the calibrated noise would no longer
    cover it. And ``vmap(grad)`` of an autocast forward fails in the backward (torch 2.13:
    "expected scalar type Float but found BFloat16"). tests/test_precision.py checks that a DP run
    trains under bf16 and that its per-sample gradients are float32 and clip to C.
    """
    bound = _Bound(model, forward)
    names = tuple(params)

    def sample_loss(values: tuple[torch.Tensor, ...], *sample: torch.Tensor):
        *xs, y = sample
        swapped = {f"model.{n}": v for n, v in zip(names, values, strict=True)}
        logits = torch.func.functional_call(bound, swapped, tuple(x.unsqueeze(0) for x in xs))
        loss = loss_fn(logits, y.unsqueeze(0))
        return loss, loss.detach()

    values = tuple(p.detach() for p in params.values())
    in_dims = (None, *([0] * (len(inputs) + 1)))
    # the math attention kernel: vmap has batching rules for its ops, not for the fused CPU kernel
    with sdpa_kernel(SDPBackend.MATH):
        grads, losses = torch.func.vmap(torch.func.grad(sample_loss, has_aux=True),
                                        in_dims=in_dims)(values, *inputs, target)
    return dict(zip(names, grads, strict=True)), losses


class PrivateRound:
    """One site's DP-SGD for one phase of one round: Poisson batches, per-sample gradients,
    Opacus's clipping and noise (its :class:`DPOptimizer` around the site's optimiser), all seeded
    by (run seed, round, site, phase) so a resumed run adds the same noise and no two phases share
    a draw."""

    def __init__(self, plan: SitePlan, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 seed: int, round_index: int, site_index: int, device: torch.device,
                 phase: int = 0) -> None:
        from opacus.optimizers import DPOptimizer

        self.plan = plan
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        ungrouped = sorted(n for n in self.params if param_group(n) is None)
        if ungrouped:
            raise UsageError(f"--dp-epsilon: backbone weights are trained ({ungrouped[0]}, ...), "
                             "which cmrfed's DP-SGD does not cover; use a LoRA method")
        later = () if phase == 0 else (phase,)  # phase 0 draws as a one-phase round always did
        self.sampler = torch.Generator().manual_seed(
            derive_seed(seed, round_index, site_index, SAMPLING_STREAM, *later))
        noise = torch.Generator(device=device).manual_seed(
            derive_seed(seed, round_index, site_index, NOISE_STREAM, *later))
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.clip,
                                     expected_batch_size=plan.expected_batch_size, generator=noise)
        self.steps = 0

    def batches(self) -> Iterator[torch.Tensor]:
        """One epoch: ``steps_per_epoch`` Poisson batches (index tensors, possibly empty)."""
        for _ in range(self.plan.steps_per_epoch):
            chosen = torch.rand(self.plan.n_train, generator=self.sampler) < self.plan.sample_rate
            yield chosen.nonzero().flatten()

    def step(self, model: nn.Module, forward: Forward, inputs: Sequence[torch.Tensor],
             target: torch.Tensor, loss_fn: LossFn,
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Clip + noise + optimiser step on this batch; returns the mean loss (0 if empty).

        With ``class_weights`` (each at most 1, from released counts) every sample's gradient is
        clipped to ``C`` and multiplied by its class's weight *before* Opacus's clip: weighting a
        loss before clipping would be undone by the clip, and a weight at most 1 keeps the
        clipped norm within ``C``, so Opacus's own clip (which still runs and bounds the
        sensitivity) changes nothing but rounding.
        """
        if len(target):
            grads, losses = per_sample_grads(model, self.params, forward, inputs, target, loss_fn)
        else:  # an empty Poisson batch is still a step: noise only
            grads = {n: p.new_zeros((0, *p.shape)) for n, p in self.params.items()}
            losses = torch.zeros(0)
        if class_weights is not None and len(target):
            weights = class_weights.to(losses.device)[target]
            grads = weighted_clipped(grads, weights, self.plan.clip)
            losses = losses * weights / weights.mean()
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in self.params.items():
            param.grad_sample = grads[name]
        self.optimizer.step()
        self.steps += 1
        return losses.mean() if len(losses) else torch.zeros(())


def weighted_clipped(grads: Mapping[str, torch.Tensor], weights: torch.Tensor,
                     clip: float) -> dict[str, torch.Tensor]:
    """Each sample's gradient clipped jointly over all tensors to ``clip`` (Opacus's formula,
    ``min(1, C / (norm + 1e-6))``) and multiplied by its weight."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0) * weights.to(norms.dtype)
    return {name: torch.einsum("i,i...->i...", factor, g) for name, g in grads.items()}
