"""ONE table: for each federated method, which adapter tensor groups exist, are trained, shared, kept.

A tensor group is ``"<adapter>.A"``, ``"<adapter>.B"`` (LoRA factors of the named adapter, on
every adapted layer) or ``"head"`` (the classification head). Everything else in the code reads
this table; no method name appears in an ``if`` elsewhere.

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
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cmrfed.errors import UsageError

GLOBAL = "global"
LOCAL = "local"
HEAD = "head"

HEAD_CHOICES = ("shared", "local")


def _groups(*adapters: str) -> frozenset[str]:
    return frozenset(f"{name}.{factor}" for name in adapters for factor in ("A", "B"))


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

    @property
    def groups(self) -> frozenset[str]:
        """Every tensor group the model of this method holds."""
        return _groups(*self.adapters) | {HEAD}

    @property
    def private(self) -> frozenset[str]:
        """Trained groups that never leave the client."""
        return self.trained - self.shared

    @property
    def newcomer(self) -> MethodSpec:
        """The spec of a site that joins after training (``cmrfed adapt``): it trains only the
        ``adapted`` groups (starting from the run's values where the run shared them), keeps them
        private, and takes the rest of the run's shared tensors as they are, frozen."""
        return replace(self, trained=self.adapted, shared=self.shared - self.adapted)

    @property
    def frozen(self) -> frozenset[str]:
        """Groups that keep their seeded init (identical on every client, rebuilt from the seed)."""
        return self.groups - self.trained


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
