"""Class balancing under DP: each site's label counts released through a Gaussian mechanism.

Without DP a site weights its loss by inverse class frequency computed from all of its labels,
so one subject moves every gradient and DP-SGD's bound would not hold. Under DP the counts are
released first, once per site and run, with Gaussian noise; the class weights are computed from
the released counts only, which are then public (post-processing), so DP-SGD's per-sample
sensitivity stays ``C`` as long as no weight exceeds 1 (:func:`balanced_weights`).

- **Sensitivity.** The count vector ``(n_0, ..., n_{K-1})`` of a site: adding or removing one
  training subject changes exactly one count by 1, an L2 sensitivity of 1 under the add/remove
  adjacency that Opacus's RDP accountant (the sampled Gaussian mechanism) uses. (Replacing one
  subject would change two counts, sensitivity sqrt(2); cmrfed's unit is add/remove throughout.)
- **Mechanism.** ``n_k + sigma_c z_k`` with ``z ~ N(0, I_K)`` from a generator seeded by (run
  seed, site, :data:`COUNT_STREAM`), then clamped to at least :data:`COUNT_FLOOR` (post-processing).
  Its RDP is ``alpha / (2 sigma_c^2)`` at every order: in Opacus's accountant it is one step of
  the sampled Gaussian mechanism at sample rate 1 and noise multiplier ``sigma_c``.
- **Budget share.** :func:`count_noise_multiplier`: with ``sigma_1`` the noise multiplier a single
  Gaussian release would need to spend the whole (epsilon, delta), ``sigma_c = sigma_1 / sqrt(s)``
  takes the share ``s`` of that release's RDP (``alpha / (2 sigma^2)`` is linear in
  ``1 / sigma^2``). DP-SGD's noise is then calibrated on the composition (privacy.py), so the
  whole run, counts and every step, spends at most epsilon.

Pure functions; the only randomness is the seeded generator the caller passes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

COUNT_STREAM = 0xC0C
"""derive_seed tag of a site's count-release noise."""
DEFAULT_COUNT_SHARE = 0.1
"""Share of each site's budget (of the RDP of one Gaussian release of the whole budget) that
buys its label counts, when class balancing is on under DP (``--dp-count-share``)."""
COUNT_FLOOR = 1.0
"""Released counts are clamped to at least this (a noisy count can be zero or negative)."""
SENSITIVITY = 1.0
"""L2 sensitivity of the count vector under add/remove-one-subject adjacency."""
N_CLASSES = 2


def label_counts(labels: torch.Tensor, n_classes: int = N_CLASSES) -> np.ndarray:
    """The exact count of each class among a site's training labels (never leaves the site)."""
    return torch.bincount(labels.long().cpu(), minlength=n_classes).numpy().astype(np.float64)


def release_counts(counts: np.ndarray, sigma: float, generator: torch.Generator) -> tuple[float, ...]:
    """The Gaussian mechanism on a count vector: ``counts + sigma * N(0, I)`` (noise drawn from
    ``generator``, in class order), then clamped to at least :data:`COUNT_FLOOR`."""
    noise = torch.randn(len(counts), generator=generator, dtype=torch.float64).numpy()
    return tuple(float(v) for v in np.maximum(counts + SENSITIVITY * sigma * noise, COUNT_FLOOR))


def balanced_weights(released: tuple[float, ...] | list[float]) -> torch.Tensor:
    """Inverse-frequency class weights from released counts, scaled so the largest is 1.

    Proportional to ``n / (K n_k)`` (each class contributes equally to the objective); the scale
    keeps every weight at most 1, so a sample's weighted clipped gradient stays within the clip
    norm and DP-SGD's sensitivity is unchanged.
    """
    counts = torch.tensor(released, dtype=torch.float32)
    return counts.min() / counts


def count_noise_multiplier(sigma_whole: float, share: float) -> float:
    """``sigma_c`` of the count release that takes the share ``share`` of a Gaussian release's RDP
    whose noise multiplier ``sigma_whole`` spends the whole budget on its own."""
    if not 0 < share < 1:
        raise ValueError(f"count share must be in (0, 1), got {share}")
    return sigma_whole / math.sqrt(share)
