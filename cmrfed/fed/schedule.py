"""The learning rate across a run, as a pure function of (round, step within the round).

CineMA (cinema/optim.py ``adjust_learning_rate``, after MAE's ``lr_sched``) sets the rate before
every step from the fractional epoch t = epoch + i / steps_per_epoch: linear warm-up from 0 to
``lr`` over the first ``warmup`` epochs, then a half cosine from ``lr`` down to ``min_lr`` at the
last epoch. cmrfed does the same with rounds in place of epochs: t = (round - 1) + step /
steps_per_round, over ``rounds`` rounds. Nothing here depends on state carried between rounds,
so a resumed run sets exactly the rates an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmrfed.errors import UsageError

SCHEDULE_CHOICES = ("cosine", "constant")


@dataclass(frozen=True)
class LrSchedule:
    """``cosine``: warm-up + cosine to ``min_lr`` (CineMA); ``constant``: ``lr`` throughout
    (cmrfed before this schedule existed; ``warmup_rounds`` and ``min_lr`` are then unused).
    A run no longer than its warm-up only warms up (the rate reaches ``lr`` at its end); past the
    last round the rate stays at ``min_lr``."""

    kind: str = "cosine"
    lr: float = 3e-3
    min_lr: float = 1e-5
    warmup_rounds: float = 1.0
    rounds: int = 10

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_CHOICES:
            raise UsageError(f"unknown --schedule {self.kind!r}; choose one of {', '.join(SCHEDULE_CHOICES)}")
        if self.warmup_rounds < 0:
            raise UsageError(f"--warmup-rounds must be >= 0, got {self.warmup_rounds}")
        if self.kind == "cosine" and not 0 <= self.min_lr <= self.lr:
            raise UsageError(f"--min-lr must be in [0, --lr], got {self.min_lr}")

    def lr_at(self, round_index: int, step: int, steps_per_round: int) -> float:
        """The rate of step ``step`` (0-based) of round ``round_index`` (1-based)."""
        if self.kind == "constant":
            return self.lr
        t = (round_index - 1) + step / max(steps_per_round, 1)
        if t < self.warmup_rounds:
            return self.lr * t / self.warmup_rounds
        progress = min((t - self.warmup_rounds) / (self.rounds - self.warmup_rounds), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
