"""Server-side aggregation: FedAvg of the shared tensors (McMahan et al., 2017).

The maths are pure functions (:func:`aggregation_weights`, :func:`weighted_average`);
:class:`FedAvg` is the small strategy both engines (in-process and Flower) call, so aggregation
is written once. ``--aggregate`` chooses the client weights: ``weighted`` by train-set size
(w_k = n_k / sum n, FedAvg's own rule and cmrfed's default) or ``uniform`` (w_k = 1 / K, what
FedDPA's reference code does: its sample-size weighting is commented out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cmrfed.errors import DataError, UsageError

TensorState = dict[str, torch.Tensor]
AGGREGATE_RULES = {  # --aggregate choice -> what it does, as reports say it
    "weighted": "weighted by each site's train-set size",
    "uniform": "uniform (every site 1/K)",
}


@dataclass(frozen=True)
class FitResult:
    """What a client returns after local training: its shared tensors and how much data made them."""

    client: str
    shared: TensorState
    num_examples: int
    train_loss: float


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> TensorState:
    """Average each tensor over ``states`` with ``weights`` (normalised to sum to one).

    Accumulates in float64 so the result does not depend on client order beyond rounding of the
    final cast, then casts back to each tensor's dtype.
    """
    if not states:
        return {}
    if len(states) != len(weights):
        raise ValueError("one weight per state is required")
    total = float(sum(weights))
    if total <= 0:
        raise DataError("FedAvg weights sum to zero: every client reported 0 training examples")
    keys = sorted(states[0])
    for state in states[1:]:
        if sorted(state) != keys:
            raise DataError("clients sent different shared tensors; they must run the same method")
    averaged: TensorState = {}
    for key in keys:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].detach().to("cpu", torch.float64) * (weight / total)
        averaged[key] = acc.to(states[0][key].dtype)
    return averaged


def aggregation_weights(num_examples: Sequence[int], rule: str) -> list[float]:
    """Each client's (unnormalised) weight under ``rule``: its train-set size, or 1."""
    if rule not in AGGREGATE_RULES:
        raise UsageError(f"unknown --aggregate {rule!r}; choose one of {', '.join(AGGREGATE_RULES)}")
    return [float(n) for n in num_examples] if rule == "weighted" else [1.0] * len(num_examples)


class FedAvg:
    """FedAvg over the clients that answered, weighted as ``weighting`` says (default: by each
    client's number of training examples, w_k = n_k / sum n; ``uniform``: w_k = 1 / K)."""

    def __init__(self, weighting: str = "weighted") -> None:
        aggregation_weights([], weighting)  # refuse an unknown rule here, not at the first round
        self.weighting = weighting

    def aggregate(self, results: Sequence[FitResult]) -> TensorState:
        """The new global shared state from one round's client results."""
        weights = aggregation_weights([r.num_examples for r in results], self.weighting)
        return weighted_average([r.shared for r in results], weights)
