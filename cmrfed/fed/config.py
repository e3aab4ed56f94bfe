"""The full configuration of a federated run, recorded in RUN/run.json and read back by later
stages (evaluate, compare, resume) as a frozen dataclass rather than a raw dict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from cmrfed.data.augment import augment_spec
from cmrfed.errors import UsageError
from cmrfed.fed.methods import resolve_method
from cmrfed.fed.schedule import LrSchedule

DEFAULT_TARGETS: tuple[str, ...] = ("q", "kv", "proj", "fc1", "fc2")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
SELECT_CHOICES = ("balanced_accuracy", "mcc")
# The training recipe's options and the values that reproduce runs made before they existed
# (no augmentation, constant lr, plain cross-entropy, best round by balanced accuracy): a
# run.json without any of them was trained that way and is read back that way.
RECIPE_BEFORE_OPTIONS: dict[str, Any] = {
    "augment": "none", "label_smoothing": 0.0, "schedule": "constant", "select": "balanced_accuracy",
}


@dataclass(frozen=True)
class FederateConfig:
    """Every option of ``cmrfed federate`` that shapes the result."""

    data: str
    method: str = "duallora"
    blocks: int | str = 2
    rank: int = 8
    local_rank: int | None = None
    alpha: float = 16.0
    local_alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    head: str = "shared"
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.05
    class_balanced: bool = True
    seed: int = 0
    backbone: str = "tiny"
    cache: bool = True
    cache_dtype: str = "float32"
    # the training recipe of CineMA's disease-classification fine-tuning (see README)
    augment: str = "cinema"
    augment_views: int = 8
    augment_seed: int = 0
    label_smoothing: float = 0.1
    schedule: str = "cosine"
    warmup_rounds: float = 1.0
    min_lr: float = 1e-5
    layer_decay: float = 0.75
    select: str = "mcc"
    sites_per_round: int | None = None  # per-round site sampling (cmrfed/fed/sampling.py)
    holdout: str | None = None  # a site left out of training entirely (leave-one-vendor-out)
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_clip: float | None = None

    def __post_init__(self) -> None:
        spec = resolve_method(self.method, self.head)
        augment_spec(self.augment)
        self.lr_schedule  # noqa: B018 (validates --schedule, --warmup-rounds, --min-lr)
        if self.augment_views < 0:
            raise UsageError(f"--augment-views must be >= 0, got {self.augment_views}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.layer_decay <= 1:
            raise UsageError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.select not in SELECT_CHOICES:
            raise UsageError(f"unknown --select {self.select!r}; choose one of {', '.join(SELECT_CHOICES)}")
        if isinstance(self.blocks, str) and self.blocks != "all":
            raise UsageError(f"--blocks takes a number of blocks or 'all', not {self.blocks!r}")
        if isinstance(self.blocks, int) and self.blocks < 1:
            raise UsageError("--blocks must be at least 1")
        for option, value in (("--rank", self.rank), ("--rounds", self.rounds),
                              ("--local-epochs", self.local_epochs),
                              ("--batch-size", self.batch_size)):
            if value < 1:
                raise UsageError(f"{option} must be at least 1, got {value}")
        if self.local_rank is not None and self.local_rank < 1:
            raise UsageError("--local-rank must be at least 1")
        if self.sites_per_round is not None and self.sites_per_round < 1:
            raise UsageError(f"--sites-per-round must be at least 1, got {self.sites_per_round}")
        if self.sites_per_round is not None and spec.pooled:
            raise UsageError(f"--sites-per-round does not apply to --method {self.method}: it trains "
                             "one model on every site's pooled data")
        if self.lr <= 0:
            raise UsageError("--lr must be positive")
        if self.cache_dtype not in CACHE_DTYPES:
            raise UsageError(f"--cache-dtype must be one of {', '.join(CACHE_DTYPES)}")
        if not self.targets:
            raise UsageError(f"--targets is empty; name some of {', '.join(DEFAULT_TARGETS)}, "
                             "comma-separated")
        for option, number in (("--lr", self.lr), ("--weight-decay", self.weight_decay),
                               ("--alpha", self.alpha), ("--local-alpha", self.local_alpha)):
            if number is not None and not math.isfinite(number):
                raise UsageError(f"{option} {number}: must be a finite number")
        if self.dp_epsilon is not None or self.dp_delta is not None or self.dp_clip is not None:
            from cmrfed.fed.privacy import check_dp_method, check_dp_options

            check_dp_options(self.dp_epsilon, self.dp_delta, self.dp_clip, self.class_balanced)
            check_dp_method(resolve_method(self.method, self.head))
        unknown = sorted(set(self.targets) - set(DEFAULT_TARGETS))
        if unknown:
            raise UsageError(
                f"--targets must name some of {', '.join(DEFAULT_TARGETS)} (got unknown {unknown})"
            )

    @property
    def lr_schedule(self) -> LrSchedule:
        return LrSchedule(kind=self.schedule, lr=self.lr, min_lr=self.min_lr,
                          warmup_rounds=self.warmup_rounds, rounds=self.rounds)

    @property
    def effective_local_rank(self) -> int:
        return self.local_rank if self.local_rank is not None else self.rank

    @property
    def effective_local_alpha(self) -> float:
        return self.local_alpha if self.local_alpha is not None else self.alpha

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FederateConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if not any(k in raw for k in RECIPE_BEFORE_OPTIONS):
            values = {**RECIPE_BEFORE_OPTIONS, **values}
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        return cls(**values)


def parse_blocks(text: str) -> int | str:
    """``--blocks`` value: a positive integer or ``all``."""
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError as exc:
        raise UsageError(f"--blocks takes a number of blocks or 'all', not {text!r}") from exc
