"""A federated site: its data, its private state, local training and local evaluation.

The model is a *workspace* shared by every client of a process (one frozen backbone in memory);
a client owns only its adapter and head tensors (``state``) and loads them into the workspace
before it trains or predicts. What may leave a client is decided in exactly one place,
:meth:`Client.shared_state`; :meth:`Client.private_state` is what never does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmrfed.data.model_input import combine_windows
from cmrfed.errors import DataError
from cmrfed.faults import fault_point
from cmrfed.fed.methods import REFERENCE, MethodSpec, Phase
from cmrfed.fed.mixing import DEFAULT_K, DEFAULT_SCALE, MIXING_RULES, REFERENCE_STREAM, state_group
from cmrfed.fed.optimizer import AdamW
from cmrfed.fed.privacy import SitePlan
from cmrfed.fed.schedule import LrSchedule
from cmrfed.fed.strategy import FitResult, TensorState
from cmrfed.fed.views import ViewSource
from cmrfed.model.classifier import layer_lr_scale
from cmrfed.model.lora import set_active_adapters
from cmrfed.precision import autocast, in_precision, resolve_precision
from cmrfed.seeding import derive_seed


@dataclass(frozen=True)
class SplitTensors:
    """One split of one client as the model consumes it.

    ``inputs`` is ``(images,)`` for a full forward, or ``(h, skips)`` from the frozen-trunk cache,
    in which case ``start_block`` says which block the cached hidden state enters. With
    ``window_subject`` set, input rows are z windows and it gives each row's subject index
    (:mod:`cmrfed.fed.windows`); otherwise rows are subjects.
    """

    subject_ids: tuple[str, ...]
    labels: torch.Tensor
    inputs: tuple[torch.Tensor, ...]
    start_block: int | None = None
    window_subject: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def rows(self) -> int:
        return len(self.subject_ids) if self.window_subject is None else len(self.window_subject)

    def draw_windows(self, generator: torch.Generator) -> torch.Tensor:
        """One input row per subject, a uniformly drawn one of its windows (a subject's rows are
        contiguous): CineMA trains on one random window per subject and epoch."""
        assert self.window_subject is not None
        counts = torch.bincount(self.window_subject, minlength=len(self))
        first = torch.cumsum(counts, 0) - counts
        return first + (torch.rand(len(self), generator=generator) * counts).long()

    def logits(self, model: nn.Module, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Logits of the input rows at ``index`` (a 1-D index tensor; rows are subjects unless
        ``window_subject`` is set)."""
        return self.forward(model, self.batch(index, device))

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The model inputs of the input rows at ``index``."""
        return tuple(t[index].to(device=device, dtype=torch.float32) for t in self.inputs)

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logits of a batch of this split's inputs (full forward, or from the cached trunk)."""
        if self.start_block is None:
            return model(batch[0])
        return model.forward_from(batch[0], batch[1], self.start_block)

    def features(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The pooled features the head reads, of a batch (as :meth:`forward`, before the head)."""
        if self.start_block is None:
            return model.features(batch[0])
        return model.features_from(batch[0], batch[1], self.start_block)


def concat_splits(splits: Sequence[SplitTensors]) -> SplitTensors:
    """Pool several clients' splits into one (the ``central`` reference)."""
    starts = {s.start_block for s in splits}
    if len(starts) != 1:
        raise ValueError("cannot pool splits with different cache start blocks")
    n_inputs = len(splits[0].inputs)
    window_subject = None
    if any(s.window_subject is not None for s in splits):
        offsets = np.cumsum([0] + [len(s) for s in splits[:-1]])
        window_subject = torch.cat([
            (s.window_subject if s.window_subject is not None else torch.arange(len(s))) + int(offset)
            for s, offset in zip(splits, offsets, strict=True)
        ])
    return SplitTensors(
        subject_ids=tuple(i for s in splits for i in s.subject_ids),
        labels=torch.cat([s.labels for s in splits]),
        inputs=tuple(torch.cat([s.inputs[k] for s in splits]) for k in range(n_inputs)),
        start_block=starts.pop(),
        window_subject=window_subject,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Local training options (identical on every client of a run)."""

    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 5.0
    class_balanced: bool = True
    label_smoothing: float = 0.0
    schedule: LrSchedule | None = None  # None: ``lr`` at every step
    layer_decay: float = 0.75  # CineMA's layer-wise lr decay, when the backbone is trained
    # the inference mixing of a method that has one (FedDPA): w = scale x mean cosine to k references
    mixing_scale: float = DEFAULT_SCALE
    mixing_k: int = DEFAULT_K
    precision: str = "fp32"  # of the forward pass: fp32 | bf16 | auto (cmrfed/precision.py)


PHASE_STREAM = 0x9A5  # derive_seed tag of the shuffles and view draws of a round's later phases


def state_of(model: nn.Module, names: Sequence[str]) -> TensorState:
    """Detached CPU copies of the named parameters of ``model``."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().to("cpu").clone() for name in names}


def load_into(model: nn.Module, state: TensorState) -> None:
    """Copy ``state`` into the model's parameters of the same names (adapters and head only)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def class_weights(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights n / (K n_c), so each class contributes equally to the loss
    (labels are strongly imbalanced per vendor); an absent class gets weight 0."""
    counts = torch.bincount(labels, minlength=n_classes).to(torch.float32)
    weights = torch.where(counts > 0, labels.numel() / (n_classes * counts.clamp(min=1)), 0.0)
    return weights


class Client:
    """One site. ``state`` holds every adapter and head tensor of this site's model."""

    def __init__(
        self,
        name: str,
        index: int,
        spec: MethodSpec,
        state: TensorState,
        train: SplitTensors,
        val: SplitTensors | None,
        config: TrainConfig,
        seed: int,
        views: ViewSource | None = None,
    ) -> None:
        if len(train) == 0:
            raise DataError(
                f"client {name!r} has no train subjects; re-run `cmrfed prepare` with more data or "
                "other --split fractions"
            )
        self.name = name
        self.index = index
        self.spec = spec
        self.state = {k: v.clone() for k, v in state.items()}
        self.train = train
        self.val = val
        self.config = config
        self.seed = seed
        self.views = views  # augmented training views; None: the plain train split
        self._groups = {k: state_group(k) for k in self.state}
        self.privacy: SitePlan | None = None  # DP-SGD plan of this site (cmrfed/fed/privacy.py)

    # --- what leaves the site, and what never does ------------------------------------------
    def shared_state(self) -> TensorState:
        """The ONLY tensors this client ever sends: those of the method's shared groups."""
        return {k: v.clone() for k, v in self.state.items() if self._groups[k] in self.spec.shared}

    def private_state(self) -> TensorState:
        """Trained tensors that never leave the site (empty for methods with none)."""
        return {k: v.clone() for k, v in self.state.items() if self._groups[k] in self.spec.private}

    def set_shared(self, shared: TensorState) -> None:
        """Take the server's aggregate of the shared groups (exactly those, nothing else)."""
        expected = {k for k, g in self._groups.items() if g in self.spec.shared}
        if set(shared) != expected:
            raise DataError(
                f"client {self.name!r}: the server sent tensors {sorted(set(shared) ^ expected)[:5]}"
                " that do not match this method's shared groups"
            )
        for key, tensor in shared.items():
            self.state[key] = tensor.detach().to("cpu", self.state[key].dtype).clone()

    def set_private(self, private: TensorState) -> None:
        expected = {k for k, g in self._groups.items() if g in self.spec.private}
        if set(private) != expected:
            raise DataError(f"client {self.name!r}: private tensors do not match the method")
        for key, tensor in private.items():
            self.state[key] = tensor.detach().to("cpu", self.state[key].dtype).clone()

    # --- privacy ---------------------------------------------------------------------------
    def use_privacy(self, plan: SitePlan) -> SitePlan:
        """Train with DP-SGD under ``plan``; with class balancing, this site releases its label
        counts now (seeded by the run seed and its index). Returns the plan with the released
        counts: they are the only thing about its labels that leaves the site."""
        self.privacy = plan.with_counts(self.train.labels, self.seed, self.index)
        return self.privacy

    def _class_weights(self) -> torch.Tensor | None:
        """The loss weights: under DP from the released counts (or none), otherwise from the
        labels themselves when ``class_balanced``."""
        if self.privacy is not None:
            return self.privacy.class_weights()
        return class_weights(self.train.labels) if self.config.class_balanced else None

    # --- local work ------------------------------------------------------------------------
    @property
    def _model_keys(self) -> list[str]:
        """Keys of this client's state that are model tensors (all but the mixing reference)."""
        return [k for k, g in self._groups.items() if g != REFERENCE]

    def _model_state(self) -> TensorState:
        return {k: self.state[k] for k in self._model_keys}

    def _activate(self, model: nn.Module, groups: frozenset[str]) -> list[nn.Parameter]:
        """Mark exactly ``groups`` trainable; returns their parameters."""
        trainable = []
        for name, param in model.named_parameters():
            train_it = self._groups.get(name) in groups
            param.requires_grad_(train_it)
            if train_it:
                trainable.append(param)
        return trainable

    def _param_groups(self, model: nn.Module, params: list[nn.Parameter]) -> list[dict]:
        """AdamW parameter groups. LoRA methods: one group. When the backbone is trained, CineMA's
        ``param_groups_lr_decay``: an lr scale per layer (:func:`layer_lr_scale`) and no weight
        decay on 1-D tensors (biases, norms)."""
        cfg = self.config
        if not self.spec.trains_backbone:
            return [{"params": params, "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]
        depth = model.backbone.depth
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = (layer_lr_scale(name, depth, cfg.layer_decay),
                       0.0 if param.ndim == 1 else cfg.weight_decay)
                groups.setdefault(key, []).append(param)
        return [{"params": ps, "lr_scale": scale, "weight_decay": decay}
                for (scale, decay), ps in groups.items()]

    def fit(self, model: nn.Module, round_index: int, device: torch.device) -> FitResult:
        """One round of local training: each of the method's phases in turn (one for most
        methods; FedDPA's local LoRA, then its global one), then the mixing rule's reference.

        Every phase trains its groups for E local epochs with a fresh AdamW (optimiser moments are
        not part of any shared or private state); shuffling is seeded by (run seed, round,
        client, phase), each step's view draws by (run seed, round, client, step, phase), and the
        learning rate is a pure function of (round, step) (:class:`LrSchedule`), so a resumed run
        repeats an uninterrupted one exactly. With a DP plan (``self.privacy``) every phase is
        DP-SGD: Poisson batches, per-sample clipping and seeded noise (cmrfed/fed/privacy.py),
        each phase a step count of its own in the plan.

        Under ``bf16`` the forward runs in bfloat16 autocast (:mod:`cmrfed.precision`); the
        logits, the loss, the gradients of the float32 parameters, their clipping and AdamW's
        update stay float32. DP-SGD's steps run in float32 whatever the precision (see
        :func:`cmrfed.fed.privacy.per_sample_grads` for why); its evaluations follow the precision.
        """
        load_into(model, self._model_state())  # once: a phase trains on from the one before
        total_loss, seen = 0.0, 0
        for number, phase in enumerate(self.spec.phases):
            groups = self.spec.phase_groups(phase)
            if groups:
                loss, count = self._fit_phase(model, round_index, number, phase, groups, device)
                total_loss, seen = total_loss + loss, seen + count
        model.eval()
        self.state = {**state_of(model, self._model_keys), **self._reference(model, round_index, device)}
        set_active_adapters(model, None)
        return FitResult(
            client=self.name,
            shared=self.shared_state(),
            num_examples=len(self.train),
            train_loss=total_loss / max(seen, 1),
        )

    def _fit_phase(self, model: nn.Module, round_index: int, number: int, phase: Phase,
                   groups: frozenset[str], device: torch.device) -> tuple[float, int]:
        """E local epochs of one phase; returns (summed loss, samples seen)."""
        cfg = self.config
        params = self._activate(model, groups)
        set_active_adapters(model, phase.adapters, dict(phase.mix or ()))
        optimizer = AdamW(
            self._param_groups(model, params), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        schedule = cfg.schedule or LrSchedule(kind="constant", lr=cfg.lr)
        steps_per_round = cfg.local_epochs * math.ceil(len(self.train) / cfg.batch_size)
        labels = self.train.labels
        weight = self._class_weights()
        weight = None if weight is None else weight.to(device)
        # phase 0 is seeded as a one-phase round always was, so those runs are unchanged
        tag = () if number == 0 else (PHASE_STREAM, number)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, round_index, self.index, *tag))
        forward = in_precision(self.train.forward, resolve_precision(cfg.precision, device), device)
        model.train()
        dp = None if self.privacy is None else self.privacy.open_round(
            model, optimizer, seed=self.seed, round_index=round_index, site_index=self.index,
            device=device, phase=number)
        total_loss, seen, step = 0.0, 0, 0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(len(self.train), generator=generator)
            rows = None if self.train.window_subject is None else self.train.draw_windows(generator)
            for batch in order.split(cfg.batch_size) if dp is None else dp.batches():
                fault_point("federate.train-step")
                lr = schedule.lr_at(round_index, step, steps_per_round)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                index = batch if rows is None else rows[batch]  # input rows (z windows) of the batch
                if self.views is None or len(batch) == 0:
                    inputs = self.train.batch(index, device)
                else:
                    draws = torch.Generator().manual_seed(
                        derive_seed(self.seed, round_index, self.index, step, *tag))
                    inputs = tuple(t.to(device=device, dtype=torch.float32)
                                   for t in self.views.inputs(index, draws))
                step += 1
                target = labels[batch].to(device)
                if dp is not None:  # DP-SGD: Poisson batch, per-sample clip (then class weight) + noise
                    loss = dp.step(model, self.train.forward, inputs, target, lambda out, y: F.cross_entropy(
                        out, y, label_smoothing=cfg.label_smoothing), class_weights=weight)
                    total_loss += float(loss) * len(batch)
                    seen += len(batch)
                    continue
                logits = forward(model, inputs)
                loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                total_loss += float(loss.detach()) * len(batch)
                seen += len(batch)
        return total_loss, seen

    def _reference(self, model: nn.Module, round_index: int, device: torch.device) -> TensorState:
        """The mixing rule's reference representations of this round (empty without a rule)."""
        if self.spec.mixing is None:
            return {}
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, round_index, self.index, REFERENCE_STREAM))
        rule = MIXING_RULES[self.spec.mixing]
        return {REFERENCE: rule.reference(model, self.train, self.config.mixing_k, generator, device)}

    @torch.no_grad()
    def predict(self, model: nn.Module, split: SplitTensors, device: torch.device) -> np.ndarray:
        """P(abnormal) for every subject of ``split`` with this client's model (the mean over a
        subject's z windows where it has several, as CineMA evaluates)."""
        load_into(model, self._model_state())
        model.eval()
        reference = self.state.get(REFERENCE)
        mixing = MIXING_RULES[self.spec.mixing] if reference is not None and len(reference) else None
        precision = resolve_precision(self.config.precision, device)
        forward = in_precision(split.forward, precision, device)
        set_active_adapters(model, None)
        probs = []
        for batch in torch.arange(split.rows).split(max(self.config.batch_size, 16)):
            inputs = split.batch(batch, device)
            if mixing is None:
                logits = forward(model, inputs)
            else:  # the method's instance-wise mixing (cmrfed/fed/mixing.py), under the precision
                with autocast(precision, device):
                    logits = mixing.logits(model, split, inputs, reference, self.config.mixing_scale)
            probs.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu())
        set_active_adapters(model, None)
        out = torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)
        if split.window_subject is None:
            return out
        rows = split.window_subject.numpy()
        return combine_windows(out[:, None], rows, len(split))[:, 0].astype(np.float32)
