"""Per-round site sampling (``--sites-per-round``): which sites train in a round, seeded and resumable.

(Not to be confused with a study's ``[participation]`` holdout, the participation gap of a site
that never trained: that is :mod:`cmrfed.study.newcomers`.)

A real consortium does not ask every hospital every round (McMahan et al., 2017, sample a
fraction C of the clients per round). ``--sites-per-round K`` asks K of the run's sites to train
in each round; which K is a pure function of (run seed, round index) and the site order, so a
resumed in-process run, a Flower run and an uninterrupted run with the same seed ask the same
sites. Sites not asked keep their state (they do not train) and, like every site, still receive
the round's aggregate. Both engines call :func:`participants`; neither draws sites itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmrfed.errors import UsageError

SAMPLING_STREAM = 0x5175  # keeps these draws apart from every other use of the run seed


def training_sites(clients: Sequence[str], holdout: str | None) -> list[str]:
    """The run's sites in manifest order, without the ``--holdout`` site (leave-one-vendor-out:
    its shard is never opened while the others train)."""
    names = list(clients)
    if holdout is None:
        return names
    if holdout not in names:
        raise UsageError(f"--holdout {holdout!r} is not a client of the prepared data; choose one of "
                         f"{', '.join(names)}")
    if len(names) < 2:
        raise UsageError(f"--holdout {holdout!r} would leave no site to train")
    return [name for name in names if name != holdout]


def participants(sites: Sequence[str], per_round: int | None, seed: int, round_index: int) -> list[str]:
    """The sites asked to train in ``round_index`` (in the order of ``sites``).

    ``sites`` is in the run's site order (manifest order); ``per_round`` None or at least
    ``len(sites)`` asks every site. The draw is without replacement, from a generator seeded by
    (``seed``, ``round_index``) alone: it does not depend on earlier rounds or on who answered.
    """
    names = list(sites)
    if per_round is None or per_round >= len(names):
        return names
    if per_round < 1:
        raise UsageError(f"--sites-per-round must be at least 1, got {per_round}")
    rng = np.random.default_rng(np.random.SeedSequence([SAMPLING_STREAM, seed, round_index]))
    chosen = set(rng.choice(len(names), size=per_round, replace=False).tolist())
    return [name for i, name in enumerate(names) if i in chosen]
