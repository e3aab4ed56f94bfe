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
  ``rounds x local_epochs x ceil(n / batch_size)`` steps, spends at most the target
  ``(epsilon, delta)`` under Opacus's RDP accountant (Mironov, "Renyi Differential Privacy",
  CSF 2017; Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", 2019), for add/remove-one-subject neighbouring datasets.

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmrfed import paths
from cmrfed.errors import UsageError
from cmrfed.fed.client import derive_seed
from cmrfed.fed.methods import MethodSpec
from cmrfed.model.classifier import param_group

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
MECHANISM = ("DP-SGD at each site: Poisson sampling, per-sample clipping of every trained tensor, "
             "Gaussian noise (Opacus DPOptimizer); sigma calibrated for the whole run")
UNIT = "one training subject of a site (add/remove-one neighbouring datasets)"

Forward = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- options -------------------------------------------------------------------------------------


def check_dp_options(epsilon: float | None, delta: float | None, clip: float | None,
                     class_balanced: bool) -> None:
    """Refuse DP options that cannot be stated (called by :class:`FederateConfig`)."""
    if epsilon is None:
        if delta is not None or clip is not None:
            raise UsageError("--dp-delta and --dp-clip only apply with --dp-epsilon; add "
                             "--dp-epsilon E to train with differential privacy")
        return
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise UsageError(f"--dp-epsilon must be a positive number, got {epsilon}")
    if delta is not None and not 0 < delta < 1:
        raise UsageError(f"--dp-delta must be between 0 and 1 (well below 1 / training subjects "
                         f"of a site), got {delta}")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise UsageError(f"--dp-clip must be a positive number, got {clip}")
    if class_balanced:
        raise UsageError("--dp-epsilon with --class-balanced: the loss weights come from all of a "
                         "site's labels, so one subject would change every gradient and the DP "
                         "bound would not hold; pass --no-class-balanced")


def check_dp_method(spec: MethodSpec) -> None:
    """DP-SGD here covers LoRA factors and the head: a method training anything else (backbone
    weights, e.g. full fine-tuning) is refused, whatever its name."""
    beyond = sorted(spec.trained - spec.groups) or (["backbone"] if spec.trains_backbone else [])
    if beyond:
        raise UsageError(f"--dp-epsilon: method {spec.name!r} trains {', '.join(beyond)} (weights "
                         "beyond the LoRA adapters and the head), which cmrfed's DP-SGD does not "
                         "cover; use a LoRA method (duallora, fedlora, ffalora, fedsa, local, central)")


def check_dp_model(model: nn.Module, method: str) -> None:
    """Per-sample gradients need each sample's output to depend on that sample alone: refuse a
    model with batch-coupled layers (BatchNorm and the like, as Opacus's validator finds them)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UsageError(f"--dp-epsilon: per-sample gradients are not supported for this model of "
                         f"{method!r} ({'; '.join(str(e) for e in errors[:3])})")


# --- the accountant ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = ACCOUNTANT) -> float:
    """Epsilon of ``steps`` DP-SGD steps at (sigma, q) for ``delta``, by Opacus's accountant
    (cached: a pure function, asked again every round and by every report)."""
    if steps == 0:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta, **_accountant_options(accountant)))


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

    @property
    def planned_steps(self) -> int:
        return self.steps_per_round * self.rounds

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_train

    def epsilon(self, steps: int) -> float:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.delta,
                             self.accountant)

    def spent(self, rounds_done: int) -> dict[str, Any]:
        """What the site has spent after ``rounds_done`` rounds (cumulative)."""
        return self.spent_steps(self.steps_per_round * rounds_done)

    def spent_steps(self, steps: int) -> dict[str, Any]:
        """What the site has spent after ``steps`` DP-SGD steps (cumulative)."""
        return {
            "epsilon": self.epsilon(steps), "delta": self.delta, "steps": steps,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "clip": self.clip, "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "planned_steps": self.planned_steps,
                "planned_epsilon": self.epsilon(self.planned_steps)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SitePlan:
        return cls(**{f.name: raw[f.name] for f in fields(cls)})

    def open_round(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, seed: int,
                   round_index: int, site_index: int, device: torch.device) -> PrivateRound:
        return PrivateRound(self, model, optimizer, seed=seed, round_index=round_index,
                            site_index=site_index, device=device)


@functools.lru_cache(maxsize=256)
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus's noise calibration (a bisection over sigma; cached, as sites often share n)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=ACCOUNTANT, **_accountant_options(ACCOUNTANT)))


def plan_site(site: str, n_train: int, *, epsilon: float, delta: float | None, clip: float | None,
              batch_size: int, local_epochs: int, rounds: int) -> SitePlan:
    """Calibrate one site's noise so its whole run stays within (epsilon, delta)."""
    if delta is None:  # 1e-5, or 1 / (10 n) for a site of more than 10,000 subjects
        delta = min(DEFAULT_DELTA, 0.1 / n_train)
    if delta >= 1.0 / n_train:
        raise UsageError(f"--dp-delta {delta:g} is not below 1 / {n_train} (the training subjects of "
                         f"site {site!r}): such a delta allows leaking a whole subject; pass a "
                         "smaller --dp-delta (or leave the default)")
    steps_per_epoch = math.ceil(n_train / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs
    steps = steps_per_round * rounds
    try:
        sigma = _calibrate(epsilon, delta, sample_rate, steps)
    except ValueError as exc:
        raise UsageError(f"--dp-epsilon {epsilon:g} is too small a budget for site {site!r}: no "
                         f"noise level keeps even one step within it at delta {delta:g}; raise "
                         "--dp-epsilon (or --dp-delta)") from exc
    plan = SitePlan(site=site, n_train=n_train, sample_rate=sample_rate,
                    steps_per_epoch=steps_per_epoch, steps_per_round=steps_per_round,
                    rounds=rounds, noise_multiplier=float(sigma),
                    clip=DEFAULT_CLIP if clip is None else clip, delta=delta,
                    target_epsilon=epsilon)
    if plan.epsilon(steps) > epsilon * (1 + BUDGET_RTOL):  # calibration must never overshoot
        raise AssertionError(f"calibrated sigma {sigma} spends {plan.epsilon(steps)} > {epsilon}")
    return plan


def plan_run(cfg: Any, sites: Mapping[str, int]) -> dict[str, SitePlan]:
    """A plan per training site (``sites``: name -> training subjects) of a DP run."""
    return {
        name: plan_site(name, n, epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, clip=cfg.dp_clip,
                        batch_size=cfg.batch_size, local_epochs=cfg.local_epochs, rounds=cfg.rounds)
        for name, n in sites.items()
    }


def spent_record(plans: Mapping[str, SitePlan], rounds_done: int) -> dict[str, dict[str, Any]]:
    """Per site, the cumulative spend after ``rounds_done`` rounds (rounds.jsonl, run.json)."""
    return {name: plan.spent(rounds_done) for name, plan in plans.items()}


def run_privacy_record(plans: Mapping[str, SitePlan]) -> dict[str, Any]:
    """The ``privacy`` block of run.json, written before the first round."""
    from opacus import __version__ as opacus_version

    first = next(iter(plans.values()))
    return {
        "mechanism": MECHANISM, "unit": UNIT, "accountant": first.accountant,
        "target_epsilon": first.target_epsilon, "clip": first.clip, "opacus": opacus_version,
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
        "max_epsilon": max(s["epsilon"] for s in spent.values()),
        "sites": spent, "stopped": result.get("stopped"),
    }


def run_privacy(run: str | Path) -> dict[str, Any] | None:
    """:func:`privacy_summary` of a RUN folder (None when it has no run.json or no DP)."""
    config_file = paths.run_config_path(Path(run))
    if not config_file.exists():
        return None
    return privacy_summary(json.loads(config_file.read_text(encoding="utf-8")))


def privacy_markdown(runs: Sequence[tuple[str, int, str]],
                     summaries: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """A report's "Differential privacy" section: one row per (method, seed, run folder)."""
    lines = ["## Differential privacy (per site, whole run)", ""]
    if not any(summaries.get(run) for _, _, run in runs):
        return [*lines, "None of these runs used differential privacy (no `--dp-epsilon`): nothing "
                "bounds what their shared tensors reveal about a training subject."]
    lines += ["| method | seed | target eps | clip | accountant | per site: eps spent (sigma, q, "
              "steps, delta) |", "|---|---:|---:|---:|---|---|"]
    for method, seed, run in runs:
        summary = summaries.get(run)
        if summary is None:
            lines.append(f"| {method} | {seed} | not DP | — | — | — |")
            continue
        sites = "; ".join(f"{name} {s['epsilon']:.3g} ({s['noise_multiplier']:.3g}, "
                          f"{s['sample_rate']:.3g}, {s['steps']}, {s['delta']:.2g})"
                          for name, s in summary["sites"].items())
        stopped = f" (stopped: {summary['stopped']['reason']})" if summary.get("stopped") else ""
        lines.append(f"| {method} | {seed} | {summary['target_epsilon']:g} | {summary['clip']:g} | "
                     f"{summary['accountant']} | {sites}{stopped} |")
    lines += ["", f"Unit protected: {UNIT}, against anyone who sees what a site sends; the "
              "evaluation outputs in this report are not DP-protected."]
    return lines


def privacy_line(summary: Mapping[str, Any] | None) -> str:
    """One human line: the budget and what each site spent ("not DP" when there is none)."""
    if summary is None:
        return "differential privacy: none (no --dp-epsilon)"
    sites = ", ".join(f"{name} eps {s['epsilon']:.3g} (sigma {s['noise_multiplier']:.3g}, "
                      f"delta {s['delta']:.2g}, {s['steps']} steps)"
                      for name, s in summary["sites"].items())
    return (f"differential privacy ({summary['accountant']}): target eps "
            f"{summary['target_epsilon']:g}, clip {summary['clip']:g}; spent: {sites}")


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
    """One site's DP-SGD for one round: Poisson batches, per-sample gradients, Opacus's clipping
    and noise (its :class:`DPOptimizer` around the site's optimiser), all seeded by
    (run seed, round, site) so a resumed run adds the same noise."""

    def __init__(self, plan: SitePlan, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 seed: int, round_index: int, site_index: int, device: torch.device) -> None:
        from opacus.optimizers import DPOptimizer

        self.plan = plan
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        ungrouped = sorted(n for n in self.params if param_group(n) is None)
        if ungrouped:
            raise UsageError(f"--dp-epsilon: backbone weights are trained ({ungrouped[0]}, ...), "
                             "which cmrfed's DP-SGD does not cover; use a LoRA method")
        self.sampler = torch.Generator().manual_seed(
            derive_seed(seed, round_index, site_index, SAMPLING_STREAM))
        noise = torch.Generator(device=device).manual_seed(
            derive_seed(seed, round_index, site_index, NOISE_STREAM))
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
             target: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Clip + noise + optimiser step on this batch; returns the mean loss (0 if empty)."""
        if len(target):
            grads, losses = per_sample_grads(model, self.params, forward, inputs, target, loss_fn)
        else:  # an empty Poisson batch is still a step: noise only
            grads = {n: p.new_zeros((0, *p.shape)) for n, p in self.params.items()}
            losses = torch.zeros(0)
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in self.params.items():
            param.grad_sample = grads[name]
        self.optimizer.step()
        self.steps += 1
        return losses.mean() if len(losses) else torch.zeros(())
