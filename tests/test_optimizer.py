"""cmrfed's AdamW is torch.optim.AdamW, bit for bit, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cmrfed.fed.optimizer import AdamW


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 96), (96, 8), (5,))]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Two groups as a site's training builds them: a weight-decayed one and one without decay."""
    return [{"params": params[:2], "weight_decay": 0.05, "lr_scale": 1.0},
            {"params": params[2:], "weight_decay": 0.0, "lr_scale": 0.5}]


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
def test_every_step_equals_torch_adamw_bitwise(betas: tuple[float, float]) -> None:
    ours, theirs = _params(0), _params(0)
    mine = AdamW(_groups(ours), lr=3e-3, betas=betas, weight_decay=0.05)
    reference = torch.optim.AdamW(_groups(theirs), lr=3e-3, betas=betas, weight_decay=0.05, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for step in range(25):
        lr = 3e-3 * (0.5 + 0.5 * torch.rand((), generator=generator).item())  # a schedule sets lr per step
        for optimizer in (mine, reference):
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
        grads = [torch.randn(p.shape, generator=generator) for p in ours]
        for params in (ours, theirs):
            for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
                # the bias has no gradient on some steps: it is skipped, its moments wait
                param.grad = None if (index == 2 and step % 3 == 0) else grad.clone()
        mine.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}"
        mine.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(mine.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"])
        assert mine.state[a]["step"].item() == reference.state[b]["step"].item()


def test_a_parameter_in_two_groups_and_bad_settings_are_refused() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than one"):
        AdamW([{"params": [param]}, {"params": [param]}])
    with pytest.raises(ValueError, match="betas"):
        AdamW([param], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW([param], lr=-1.0)


def test_zero_grad_keeping_the_tensors_zeroes_them() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    AdamW([param]).zero_grad(set_to_none=False)
    assert torch.equal(param.grad, torch.zeros(3))


TRAIN_ONE_STEP = """
import sys, torch
from cmrfed.fed.optimizer import AdamW
model = torch.nn.Linear(4, 2)
optimizer = AdamW(model.parameters(), lr=1e-2)
loss = model(torch.ones(3, 4)).square().sum()
optimizer.zero_grad(); loss.backward(); optimizer.step()
print("torch._dynamo" in sys.modules)
"""


@pytest.mark.e2e
def test_a_training_step_does_not_import_torch_dynamo() -> None:
    """The point of this optimiser: a fresh process (a Flower ClientApp per message) does not pay
    for torch._dynamo's import (torch.optim.AdamW's first call does)."""
    out = subprocess.run([sys.executable, "-c", TRAIN_ONE_STEP], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
