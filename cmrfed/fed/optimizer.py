"""AdamW for a site's local training: torch.optim.AdamW's update, bit for bit, at a fraction of its
start-up cost.

Every call into ``torch.optim`` (building an optimiser, ``zero_grad``, ``step``) imports
``torch._dynamo`` the first time, about 1 s of CPU in a fresh process. A Flower ClientApp is a
fresh process for every message (Flower's default isolation), so with ``torch.optim.AdamW`` each
training message on each site paid that second again; so did every ``cmrfed`` command that
trains. :class:`AdamW` overrides each of those entry points with the same arithmetic as PyTorch's
single-tensor AdamW (``foreach=False``: the path PyTorch takes for CPU tensors), in the same
order, so a run's numbers do not change (tests/test_optimizer.py compares the two bitwise). It is
a ``torch.optim.Optimizer``, so Opacus's DP-SGD wraps it as it wraps PyTorch's.

What it leaves out, because local training never uses it: amsgrad, ``maximize``, capturable and
differentiable steps, complex parameters, and closures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

ParamGroups = Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter]


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, decoupled weight decay) with PyTorch's defaults and update.

    Per parameter with a gradient, at step t (moments and t kept per parameter, as PyTorch does):
    ``p *= 1 - lr wd``; ``m = lerp(m, g, 1 - b1)``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    """

    def __init__(self, params: ParamGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"AdamW needs lr, eps and weight_decay >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"AdamW needs betas in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group with the defaults filled in (torch.optim's own is the one that imports Dynamo)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if any(not p.is_leaf for p in params):
            raise ValueError("AdamW can only optimise leaf tensors")
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("a parameter appears in more than one AdamW parameter group")
        self.param_groups.append({**self.defaults, **param_group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        if closure is not None:
            raise ValueError("this AdamW takes no closure")
        for group in self.param_groups:
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[param]
                if not state:  # float32 step count on the CPU and zero moments, as PyTorch's
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                _update(param, param.grad, state, lr, beta1, beta2, weight_decay, eps)


def _update(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], lr: float, beta1: float,
            beta2: float, weight_decay: float, eps: float) -> None:
    """PyTorch's ``_single_tensor_adam`` with decoupled weight decay, operation for operation."""
    step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    step_t += 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
