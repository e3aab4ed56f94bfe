"""Stacks deeper than the model's input depth: CineMA's z windows in training and evaluation.

:func:`cmrfed.data.shards.load_split` gives one input row per ``--shape`` z-deep window of each
subject (:func:`cmrfed.data.model_input.window_starts`; half-overlapping, the last one ending at
the last slice), for raw images and the frozen-trunk cache alike. As CineMA does,
:meth:`cmrfed.fed.client.Client.predict` averages the class probabilities of a subject's windows,
and :meth:`cmrfed.fed.client.Client.fit` trains on one uniformly drawn window per subject and
epoch (CineMA draws any start; the grid holds every start up to ``z + 1`` slices, the deepest
CineMA's datasets reach at 10 mm: 17). When every subject fits the depth (the common case) rows
are subjects and nothing changes.
"""

from __future__ import annotations

import numpy as np
import torch

from cmrfed.fed.client import SplitTensors


def split_tensors(
    subject_ids: tuple[str, ...],
    labels: np.ndarray,
    window_subject: np.ndarray,
    inputs: tuple[torch.Tensor, ...],
    start_block: int | None = None,
) -> SplitTensors:
    """One split as the model consumes it: per-subject ids and labels, input rows per window
    (``window_subject`` left unset when rows are subjects)."""
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    if len(window_subject) == len(subject_ids):  # one window each: rows are subjects
        return SplitTensors(subject_ids, labels_t, inputs, start_block)
    rows = torch.as_tensor(window_subject, dtype=torch.int64)
    return SplitTensors(subject_ids, labels_t, inputs, start_block, window_subject=rows)
