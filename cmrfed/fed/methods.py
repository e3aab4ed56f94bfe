"""ONE table: for each federated method, which adapter tensor groups exist, are trained, shared, kept.

A tensor group is ``"<adapter>.A"``, ``"<adapter>.B"`` (LoRA factors of the named adapter, on
every adapted layer), ``"head"`` (the classification head) or ``"backbone"`` (every encoder weight,
held only by ``central-full``). Everything else in the code reads this table; no method name
appears in an ``if`` elsewhere.

References:
- FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
  Data", AISTATS 2017 (weighted averaging of what clients send).
- LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
- FedLoRA: LoRA factors A and B trained locally and averaged separately by FedAvg.
- FFA-LoRA: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
  (A frozen at a shared seeded init, only B trained and averaged: the average is then exact).
- FedSA-LoRA: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
  ICLR 2025 (A shared, B kept local).
- Med-DualLoRA: Perramon-Llussà et al., 2026 (a global LoRA aggregated across sites plus a local
  LoRA that never leaves its site, added together).
- FedDPA: Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024
  (code: github.com/Lydia-yang/FedDPA). FedDPA-T, its iterative variant: each round a site first
  trains its local LoRA with the global one frozen and mixed in at 1/2 each, then the global LoRA
  alone (no local adapter present); the server averages the global one. At inference the two are
  mixed per instance by similarity to the site's own training data (cmrfed/fed/mixing.py): the
  local adapter gets w, the global one 1 - w, as the paper motivates it (the reference code's
  layer applies them the other way round; mixing.py says why cmrfed follows the paper). See
  docs/feddpa.md for where this follows the reference code and where it does not.
- Full fine-tuning (``central-full``): what CineMA itself does for disease classification
  (Zhang et al., "CineMA: A Foundation Model for Cine Cardiac MRI", 2025; its
  cinema/classification/*/config.yaml: ``freeze_pretrained: False``, layer-wise lr decay 0.75),
  on the pooled data: the upper reference next to the LoRA methods.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cmrfed.errors import UsageError

GLOBAL = "global"
LOCAL = "local"
HEAD = "head"
BACKBONE = "backbone"
# not a model tensor: a site's reference representations of some of its own training subjects,
# which an inference mixing rule (cmrfed/fed/mixing.py) compares each test instance with; kept
# private like a local adapter, never sent
REFERENCE = "reference"

# which of a method's trained groups a phase trains
ALL, PRIVATE, SHARED = "all", "private", "shared"

HEAD_CHOICES = ("shared", "local")


def _groups(*adapters: str) -> frozenset[str]:
    return frozenset(f"{name}.{factor}" for name in adapters for factor in ("A", "B"))


@dataclass(frozen=True)
class Phase:
    """One pass over a site's training data within a round (``local_epochs`` epochs, a fresh
    optimiser): which of the method's trained groups it trains (``all`` of them, or those it
    keeps ``private`` / ``shared``; the others stay frozen), and which adapters the forward adds,
    each with its weight (``mix``; None: every adapter of the method, weight 1)."""

    trains: str = ALL
    mix: tuple[tuple[str, float], ...] | None = None

    @property
    def adapters(self) -> tuple[str, ...] | None:
        return None if self.mix is None else tuple(name for name, _ in self.mix)


ONE_PHASE = (Phase(),)


@dataclass(frozen=True)
class MethodSpec:
    """What one method trains, shares and keeps, as sets of tensor groups."""

    name: str
    summary: str
    adapters: tuple[str, ...]
    trained: frozenset[str]
    shared: frozenset[str]
    # What a site that joins after training trains over the frozen shared tensors (`cmrfed adapt`):
    # its own copy of these groups, which then stays private to it.
    adapted: frozenset[str] = frozenset()
    federated: bool = True  # False: no server, nothing travels (local, central)
    pooled: bool = False  # True: one trainer on the pooled train data of every client (central)
    # the passes of a round, in order (FedDPA: the local LoRA, then the global one)
    phases: tuple[Phase, ...] = ONE_PHASE
    # how the adapters are mixed at inference: a rule of cmrfed/fed/mixing.py, None for a plain sum
    mixing: str | None = None

    @property
    def groups(self) -> frozenset[str]:
        """Every tensor group the model of this method holds (the backbone only when trained)."""
        return _groups(*self.adapters) | {HEAD} | (self.trained & {BACKBONE}) | self.kept

    @property
    def kept(self) -> frozenset[str]:
        """Private state that is not trained by gradient: the mixing rule's reference."""
        return frozenset({REFERENCE}) if self.mixing is not None else frozenset()

    def phase_groups(self, phase: Phase) -> frozenset[str]:
        """The groups ``phase`` trains."""
        side = {ALL: self.trained, PRIVATE: self.trained - self.shared, SHARED: self.trained & self.shared}
        return side[phase.trains]

    @property
    def training_phases(self) -> tuple[Phase, ...]:
        """The phases that train something (a newcomer of FedDPA trains only its local LoRA)."""
        return tuple(p for p in self.phases if self.phase_groups(p))

    @property
    def trains_backbone(self) -> bool:
        """True when every encoder weight is trained: no frozen trunk, so no feature cache."""
        return BACKBONE in self.trained

    @property
    def private(self) -> frozenset[str]:
        """Groups that never leave the client: trained and not shared, and the kept reference."""
        return (self.trained - self.shared) | self.kept

    @property
    def newcomer(self) -> MethodSpec:
        """The spec of a site that joins after training (``cmrfed adapt``): it trains only the
        ``adapted`` groups (starting from the run's values where the run shared them), keeps them
        private, and takes the rest of the run's shared tensors as they are, frozen."""
        return replace(self, trained=self.adapted, shared=self.shared - self.adapted)

    @property
    def frozen(self) -> frozenset[str]:
        """Groups that keep their seeded init (identical on every client, rebuilt from the seed)."""
        return self.groups - self.trained - self.kept


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="duallora",
            summary="Med-DualLoRA: global LoRA averaged by the server + private local LoRA",
            adapters=(GLOBAL, LOCAL),
            trained=_groups(GLOBAL, LOCAL) | {HEAD},
            shared=_groups(GLOBAL) | {HEAD},
            adapted=_groups(LOCAL),  # its own local LoRA, as every member has
        ),
        MethodSpec(
            name="feddpa",
            summary="FedDPA-T: per round the private local LoRA (global frozen, mixed in), then the "
                    "global LoRA alone; the two mixed per instance at inference",
            adapters=(GLOBAL, LOCAL),
            trained=_groups(GLOBAL, LOCAL) | {HEAD},
            shared=_groups(GLOBAL) | {HEAD},
            adapted=_groups(LOCAL),  # its own local LoRA over the frozen global one (the local phase)
            # the reference code's FedDPA-T round (fed_utils/client.py: set_local with
            # local_weight 0.5, then the global adapter trained with the local one removed)
            phases=(Phase(PRIVATE, mix=((GLOBAL, 0.5), (LOCAL, 0.5))), Phase(SHARED, mix=((GLOBAL, 1.0),))),
            mixing="similarity",
        ),
        MethodSpec(
            name="fedlora",
            summary="FedLoRA: A and B trained and averaged separately",
            adapters=(GLOBAL,),
            trained=_groups(GLOBAL) | {HEAD},
            shared=_groups(GLOBAL) | {HEAD},
            adapted=_groups(GLOBAL),  # a private copy of the shared LoRA, fine-tuned locally
        ),
        MethodSpec(
            name="ffalora",
            summary="FFA-LoRA: A frozen at the shared seeded init, B trained and averaged",
            adapters=(GLOBAL,),
            trained=frozenset({f"{GLOBAL}.B", HEAD}),
            shared=frozenset({f"{GLOBAL}.B", HEAD}),
            adapted=frozenset({f"{GLOBAL}.B"}),  # a private copy of B; A stays the seeded init
        ),
        MethodSpec(
            name="fedsa",
            summary="FedSA-LoRA: A averaged, B kept local",
            adapters=(GLOBAL,),
            trained=_groups(GLOBAL) | {HEAD},
            shared=frozenset({f"{GLOBAL}.A", HEAD}),
            adapted=frozenset({f"{GLOBAL}.B"}),  # its own B over the shared A, as every member has
        ),
        MethodSpec(
            name="local",
            summary="Local only: each site trains its own LoRA, nothing is sent",
            adapters=(GLOBAL,),
            trained=_groups(GLOBAL) | {HEAD},
            shared=frozenset(),
            adapted=_groups(GLOBAL) | {HEAD},  # nothing is shared: a site trains its own model
            federated=False,
        ),
        MethodSpec(
            name="central",
            summary="Centralised: one LoRA on the pooled data (no privacy; upper reference)",
            adapters=(GLOBAL,),
            trained=_groups(GLOBAL) | {HEAD},
            shared=_groups(GLOBAL) | {HEAD},
            adapted=_groups(GLOBAL),  # a private copy of the pooled LoRA, fine-tuned locally
            federated=False,
            pooled=True,
        ),
        MethodSpec(
            name="central-full",
            summary="Centralised full fine-tuning: every backbone weight + head on the pooled data "
                    "(CineMA's own recipe; no LoRA, no privacy; upper reference)",
            adapters=(),
            trained=frozenset({BACKBONE, HEAD}),
            shared=frozenset({BACKBONE, HEAD}),
            adapted=frozenset({HEAD}),  # a private copy of the head over the fine-tuned backbone
            federated=False,
            pooled=True,
        ),
    )
}


def resolve_method(name: str, head: str = "shared") -> MethodSpec:
    """The method's spec, with the head moved to the private side for ``--head local``."""
    if name not in METHODS:
        raise UsageError(f"unknown --method {name!r}; choose one of {', '.join(METHODS)}")
    if head not in HEAD_CHOICES:
        raise UsageError(f"unknown --head {head!r}; choose one of {', '.join(HEAD_CHOICES)}")
    spec = METHODS[name]
    if head == "local" and spec.federated:
        spec = replace(spec, shared=spec.shared - {HEAD}, adapted=spec.adapted | {HEAD})
    return spec
