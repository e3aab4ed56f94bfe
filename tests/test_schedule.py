"""The learning-rate schedule across rounds (CineMA's warm-up + cosine, rounds for epochs)."""

from __future__ import annotations

import math

import pytest

from cmrfed.errors import UsageError
from cmrfed.fed.schedule import LrSchedule


def cinema_reference(t: float, warmup: float, total: float, lr: float, min_lr: float) -> float:
    """CineMA's ``adjust_learning_rate`` written out independently (t in epochs)."""
    if t < warmup:
        return lr * t / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_cosine_follows_cinema_with_rounds_for_epochs():
    schedule = LrSchedule(kind="cosine", lr=1e-3, min_lr=1e-5, warmup_rounds=2, rounds=10)
    steps = 4
    for round_index in range(1, 11):
        for step in range(steps):
            t = round_index - 1 + step / steps
            assert schedule.lr_at(round_index, step, steps) == pytest.approx(
                cinema_reference(t, 2, 10, 1e-3, 1e-5), rel=1e-12, abs=1e-15)
    assert schedule.lr_at(1, 0, steps) == 0.0
    assert schedule.lr_at(3, 0, steps) == pytest.approx(1e-3)
    assert schedule.lr_at(10, steps - 1, steps) > 1e-5
    assert schedule.lr_at(11, 0, steps) == pytest.approx(1e-5)  # the end of the last round
    assert schedule.lr_at(13, 2, steps) == pytest.approx(1e-5)  # and after it


def test_warmup_rises_then_cosine_falls():
    schedule = LrSchedule(kind="cosine", lr=3e-3, min_lr=1e-5, warmup_rounds=1, rounds=5)
    rates = [schedule.lr_at(r, s, 3) for r in range(1, 6) for s in range(3)]
    assert rates[:3] == sorted(rates[:3])
    assert rates[3:] == sorted(rates[3:], reverse=True)


def test_constant_is_the_old_behaviour_and_bad_options_are_usage_errors():
    constant = LrSchedule(kind="constant", lr=3e-3, rounds=4)
    assert {constant.lr_at(r, s, 5) for r in range(1, 5) for s in range(5)} == {3e-3}
    with pytest.raises(UsageError, match="--schedule"):
        LrSchedule(kind="step")
    with pytest.raises(UsageError, match="--min-lr"):
        LrSchedule(lr=1e-3, min_lr=1e-2)
    with pytest.raises(UsageError, match="--warmup-rounds"):
        LrSchedule(warmup_rounds=-1)
    # a run no longer than its warm-up only warms up
    short = LrSchedule(kind="cosine", lr=1e-3, warmup_rounds=1, rounds=1)
    assert short.lr_at(1, 1, 2) == pytest.approx(5e-4)
