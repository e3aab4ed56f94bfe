"""Stacks deeper than the model's input depth: CineMA's z windows in training and evaluation.

:func:`cmrfed.data.shards.load_split` gives one input row per 16-slice (``--shape`` z) window of
each subject (:func:`cmrfed.data.preprocess.window_starts`). CineMA evaluates a subject on all
its windows and averages their class probabilities; :meth:`cmrfed.fed.client.Client.predict`
does the same through ``SplitTensors.window_subject``. CineMA trains on one random window per
subject and epoch (MONAI RandSpatialCrop); cmrfed trains on every window as a sample of its own,
which keeps local training unchanged and deterministic. When every subject fits the depth (the
common case) rows are subjects and the splits are exactly what they were without windows.
"""

from __future__ import annotations

import numpy as np
import torch

from cmrfed.fed.client import SplitTensors


def split_tensors(
    split: str,
    subject_ids: tuple[str, ...],
    labels: np.ndarray,
    window_subject: np.ndarray,
    inputs: tuple[torch.Tensor, ...],
    start_block: int | None = None,
) -> SplitTensors:
    """One split as the model consumes it: the training split one sample per window, the others
    one prediction per subject (probabilities of its windows averaged)."""
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    if len(window_subject) == len(subject_ids):  # one window each: rows are subjects
        return SplitTensors(subject_ids, labels_t, inputs, start_block)
    rows = torch.as_tensor(window_subject, dtype=torch.int64)
    if split == "train":
        return SplitTensors(tuple(subject_ids[i] for i in window_subject), labels_t[rows], inputs,
                            start_block)
    return SplitTensors(subject_ids, labels_t, inputs, start_block, window_subject=rows)
