"""Where a training step gets its augmented inputs: K seeded views per training subject (per z
window, for stacks with several), cached as frozen-trunk outputs or augmented on the fly.

View k of a subject is the augmentation drawn from ``subject_view_seed(augment_seed, client,
subject, k)`` (cmrfed/data/augment.py). A training step draws one view index per sample from a
generator seeded by (run seed, round, client, step) (``Client.fit``); the cached source
returns that view's trunk output, the on-the-fly source augments the image with that view's
seed. Both draw the view indices the same way, so a cached run and a ``--no-cache`` run see the
same views (equal up to float rounding). With K = 0 (on the fly only) every step draws a fresh
augmentation from the step generator instead: unlimited views, as CineMA's own training does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cmrfed.data.augment import AugmentSpec, augment_batch, augment_image, subject_view_seed


def row_ids(subject_ids: Sequence[str], window_subject: Sequence[int] | None) -> tuple[str, ...]:
    """A name per input row: the subject id, or ``<subject>#<window>`` when subjects have several
    z windows (cmrfed/fed/windows.py), so each window gets views of its own."""
    if window_subject is None or len(window_subject) == len(subject_ids):
        return tuple(subject_ids)
    seen: dict[int, int] = {}
    names = []
    for s in (int(v) for v in window_subject):
        names.append(f"{subject_ids[s]}#{seen.get(s, 0)}")
        seen[s] = seen.get(s, 0) + 1
    return tuple(names)


def view_seeds(augment_seed: int, client: str, subject_ids: Sequence[str], n_views: int) -> torch.Tensor:
    """(n, K) int64 seeds: row i, column k seeds view k of input row i (``row_ids``)."""
    return torch.tensor([[subject_view_seed(augment_seed, client, sid, k) for k in range(n_views)]
                         for sid in subject_ids], dtype=torch.int64).reshape(len(subject_ids), n_views)


class ViewSource:
    """The augmented inputs of a batch of training subjects (indices into the train split)."""

    n_views: int

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One view index per sample, drawn identically by every source with K views."""
        return torch.randint(self.n_views, (len(index),), generator=generator)

    def inputs(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


@dataclass
class CachedViews(ViewSource):
    """K cached trunk outputs per subject, read on first use (``load`` -> (hidden, skips) of
    shapes (K, n, 1 + N, D) and (K, n, N, D)), so a site that only evaluates never builds them."""

    n_views: int
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    _tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self.load()
        return self._tensors

    def inputs(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        views = self.draw(index, generator)
        return tuple(t[views, index] for t in self.tensors)


@dataclass
class OnTheFlyViews(ViewSource):
    """Raw images augmented at every step: view k of subject i from ``seeds[i, k]``; or, with
    K = 0, a fresh augmentation per sample from the step generator."""

    n_views: int
    images: torch.Tensor  # (n, C, X, Y, Z)
    seeds: torch.Tensor  # (n, K)
    spec: AugmentSpec

    def inputs(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        if self.n_views == 0:
            return (torch.stack([augment_image(self.images[i], generator, self.spec) for i in index]),)
        views = self.draw(index, generator)
        seeds = self.seeds[index, views].tolist()
        return (augment_batch(self.images[index], seeds, self.spec),)


def concat_views(sources: Sequence[ViewSource | None]) -> ViewSource | None:
    """Pool several clients' view sources (the pooled ``central`` trainers), in client order."""
    if not sources or any(s is None for s in sources):
        return None
    first = sources[0]
    if isinstance(first, CachedViews):
        cached = [s for s in sources if isinstance(s, CachedViews)]

        def load() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.cat([s.tensors[0] for s in cached], dim=1),
                    torch.cat([s.tensors[1] for s in cached], dim=1))

        return CachedViews(first.n_views, load)
    fly = [s for s in sources if isinstance(s, OnTheFlyViews)]
    return OnTheFlyViews(first.n_views, torch.cat([s.images for s in fly]),
                         torch.cat([s.seeds for s in fly]), first.spec)
