"""Inference mixing rules: how a method that holds several adapters weighs them per test instance.

A method names its rule in the method table (``MethodSpec.mixing``); :class:`~cmrfed.fed.client.Client`
applies it when it predicts. The one rule so far is FedDPA's *instance-wise dynamic weighting*
(Yang et al., NeurIPS 2024; ``GlobalModel_generated.py`` of github.com/Lydia-yang/FedDPA,
``get_weight``):

    w(x) = scale * mean_j cos(f(x), f(r_j)),   j = 1..k

with ``f`` the representation of the model with the local adapter alone (the reference code
switches to the local adapter to embed, as here) and ``r_1..r_k`` random training instances of
the site. The representation is the pooled feature the classification head reads,
:meth:`~cmrfed.model.classifier.CineMAClassifier.pooled` (the cls token and the mean fused view
token, side by side): the reference code uses the LLM's last hidden state at the last token,
which is what its LM head reads.

Which adapter gets w. The reference code calls ``set_local(['local'], [w, 1 - w])`` with the
global adapter active, and its LoRA layer applies the first weight to the *active* adapter: the
global adapter gets w and the local one 1 - w, although the call reads the other way round, and
in its training phase the same call gives the first weight to the local adapter. The paper
motivates the weight the other way: an instance that resembles the site's own training data
should lean on the local (personalised) adapter, one that does not on the global adapter, which
handles test-time distribution shift. With the code's assignment an instance unlike anything
the site trained on (similarity 0) would be scored by the local adapter alone. cmrfed follows
the paper: **the local adapter gets w, the global one 1 - w** (``SIMILARITY.weighted``). At the
default scale 1/2 and a similarity near 1 the two conventions agree (both weights near 1/2).

The k references are drawn once per site and round (seeded by the run seed, the round and the
site) at the end of its training, rather than afresh for each test instance as the reference
code does: a site's prediction for an instance then does not depend on which instances it scored
before, and the expected weight is the same. They are computed then with the site's final local
adapter (the global one plays no part in the representation) and kept in its private state under
``reference`` (:data:`~cmrfed.fed.methods.REFERENCE`): never sent, saved and resumed with its
local adapter. A model holding no reference (the shared-only model, a held-out site before
``adapt``) is not mixed: every adapter counts once, its untrained local adapter adding nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cmrfed.fed.methods import GLOBAL, LOCAL, REFERENCE
from cmrfed.model.classifier import tensor_group
from cmrfed.model.lora import set_active_adapters

if TYPE_CHECKING:
    from cmrfed.fed.client import SplitTensors

DEFAULT_SCALE = 0.5  # the reference code's default (``half``: the weight at most 1/2)
DEFAULT_K = 5  # the reference code's ``instance_num``
REFERENCE_STREAM = 0x4EF  # derive_seed tag of the reference draw


def state_group(key: str) -> str | None:
    """The tensor group of a key of a site's state: a model tensor's group, or the reference."""
    return REFERENCE if key == REFERENCE else tensor_group(key)


def instance_weight(features: torch.Tensor, reference: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale`` times the mean cosine similarity of each row of ``features`` (B, F) to the rows
    of ``reference`` (k, F): one weight per instance, (B,)."""
    cosine = F.cosine_similarity(features[:, None, :].float(), reference[None, :, :].float(), dim=-1)
    return scale * cosine.mean(dim=1)


@dataclass(frozen=True)
class SimilarityMixing:
    """FedDPA's instance-wise dynamic weighting (see the module docstring)."""

    weighted: str  # the adapter that gets w
    complement: str  # the adapter that gets 1 - w
    represent_with: tuple[str, ...]  # the adapters active when representations are computed

    def mix(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each adapter's per-instance weight for instance weights ``weight`` (B,)."""
        return {self.weighted: weight, self.complement: 1.0 - weight}

    @torch.no_grad()
    def representations(self, model: nn.Module, split: SplitTensors,
                        inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The pooled features of a batch of ``split``'s inputs, with only ``represent_with`` active."""
        set_active_adapters(model, self.represent_with)
        return split.features(model, inputs).float()

    def reference(self, model: nn.Module, train: SplitTensors, k: int, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
        """Representations of ``k`` input rows of ``train`` drawn without replacement (all of
        them when it has fewer), (k, F) on the CPU."""
        rows = torch.randperm(train.rows, generator=generator)[:k]
        model.eval()
        return self.representations(model, train, train.batch(rows, device)).cpu()

    @torch.no_grad()
    def logits(self, model: nn.Module, split: SplitTensors, inputs: tuple[torch.Tensor, ...],
               reference: torch.Tensor, scale: float) -> torch.Tensor:
        """Logits of a batch with the adapters mixed by each instance's weight."""
        features = self.representations(model, split, inputs)
        weight = instance_weight(features, reference.to(features.device), scale)
        mix = self.mix(weight)
        set_active_adapters(model, tuple(mix), mix)
        return split.forward(model, inputs)


SIMILARITY = SimilarityMixing(weighted=LOCAL, complement=GLOBAL, represent_with=(LOCAL,))
MIXING_RULES: dict[str, SimilarityMixing] = {"similarity": SIMILARITY}
"""Rule name (``MethodSpec.mixing``) -> rule."""
