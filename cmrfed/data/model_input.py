"""What the model sees of a stored image: CineMA's load transforms (min-max rescale, zero-padding,
z windows) and the mean over a subject's windows.

Kept apart from :mod:`cmrfed.data.preprocess` (SimpleITK, scipy, the dataset layouts), which only
``cmrfed prepare`` needs: reading shards for training, evaluation or a Flower message imports
numpy alone.
"""

from __future__ import annotations

import numpy as np


def window_starts(depth: int, window: int) -> list[int]:
    """First slice of each ``window``-slice window CineMA evaluates a ``depth``-slice stack with.

    One window at 0 when the stack fits (it is zero-padded at the end); otherwise windows every
    ``window - window // 2`` slices (half overlap) from 0, plus one ending at the last slice.
    E.g. 17 slices in windows of 16: starts 0, 1; 30 slices: 0, 8, 14.
    """
    if depth <= window:
        return [0]
    starts = list(range(0, depth - window + 1, window - window // 2))
    if starts[-1] != depth - window:
        starts.append(depth - window)
    return starts


def model_input(stored: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A stored (2, x, y, z) uint8 image -> the model's (windows, 2, X, Y, Z) float32 input(s).

    One min-max rescale over ED and ES together (float32, as MONAI's ScaleIntensity; a constant
    image gives zeros), zero-padding at the end of each axis shorter than ``shape``, then the
    z windows of :func:`window_starts` (one for a stack of at most ``shape[2]`` slices).
    """
    image = stored.astype(np.float32)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    pad = [(0, 0)] + [(0, max(0, want - n)) for n, want in zip(image.shape[1:], shape, strict=True)]
    image = np.pad(image, pad)
    depth = shape[2]
    return np.stack([image[..., s : s + depth] for s in window_starts(image.shape[3], depth)])


def combine_windows(probabilities: np.ndarray, window_subject: np.ndarray, n_subjects: int) -> np.ndarray:
    """Per-subject class probabilities: the mean over each subject's windows (CineMA then takes
    the log of this mean as the subject's logits). ``probabilities`` is (windows, classes)."""
    sums = np.zeros((n_subjects, probabilities.shape[1]), dtype=np.float64)
    np.add.at(sums, window_subject, probabilities)
    counts = np.bincount(window_subject, minlength=n_subjects)
    if (counts == 0).any():
        raise ValueError("every subject needs at least one window")
    return sums / counts[:, None]
