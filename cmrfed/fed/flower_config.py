"""What configures a Flower run: the run config (from the server), each site's node config, and the
names both apps use for messages and records.

The run config carries the whole FederateConfig as flat TOML scalars plus the server's own options
(RUN folder, sites, --node-timeout, --min-sites, --resume). The sites do not rebuild their model
from it: every message the server sends carries the run's FederateConfig (on ``--resume``, the one
recorded in run.json), so a site always trains the run the server is running.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrfed import paths
from cmrfed.data.shards import load_manifest, verify_shard
from cmrfed.errors import UsageError
from cmrfed.fed.config import FederateConfig, parse_blocks

# Message types as Flower routes them ("<category>" or "<category>.<action>").
IDENTIFY = "query.identify"
TRAIN = "train"
EVALUATE = "evaluate"
FINALIZE = "query.finalize"
PRIVACY = "query.privacy"  # a DP run's plan to a site, which releases its label counts

# Record names inside a message's RecordDict.
SHARED = "shared"  # ArrayRecord: shared tensors, the only tensors that travel
ROUND = "round"  # ConfigRecord: the server's instruction (see :func:`instruction`)
SITE = "site"  # ConfigRecord: what a site says about itself
METRICS = "metrics"  # MetricRecord: train loss, examples and DP steps, or validation metrics

# Node config keys of a SuperNode (one per site) and run config keys beyond FederateConfig's.
NODE_CLIENT, NODE_PREPARED, NODE_SITE_DIR, NODE_DEVICE = "client", "prepared", "site-dir", "device"
RUN_OUT, RUN_SITES, RUN_NAME, RUN_OVERWRITE, RUN_TIMEOUT, RUN_MIN_SITES = (
    "out", "sites", "run-name", "overwrite", "node-timeout-s", "min-sites")
RUN_RESUME, RUN_TYPED, RUN_FAULT = "resume", "typed", "fault"


def run_config_of(cfg: FederateConfig, out: Path, sites: int, overwrite: bool = False,
                  node_timeout_s: float = 600.0, min_sites: int | None = None, resume: bool = False,
                  typed: set[str] | frozenset[str] = frozenset(),
                  fault: str | None = None) -> dict[str, str | int | float | bool]:
    """A Flower run config (flat TOML scalars) carrying the full FederateConfig and the server's
    options; the ServerApp rebuilds the same FederateConfig from it with :func:`federate_config_of`.

    ``resume`` with ``typed`` (the options the user gave): the server continues RUN with its
    recorded options, refusing typed ones that differ (:func:`cmrfed.fed.runlog.resume_options`).
    ``fault``: a ``CMRFED_FAULT`` spec for the ServerApp's process (crash tests, cmrfed/faults.py).
    """
    if sites < 1:
        raise UsageError(f"--sites must be at least 1, got {sites}")
    if node_timeout_s <= 0:
        raise UsageError(f"--node-timeout must be positive, got {node_timeout_s:g}")
    check_min_sites(min_sites, sites, cfg.sites_per_round)
    flat: dict[str, str | int | float | bool] = {}
    for key, value in cfg.to_dict().items():
        if value is None:  # TOML has no null: an absent key means the dataclass default
            continue
        if key == "targets":
            value = ",".join(value)
        elif key == "blocks":
            value = str(value)
        flat[key] = value
    out = Path(out).expanduser().resolve()
    flat.update({RUN_OUT: str(out), RUN_SITES: int(sites), RUN_NAME: out.name,
                 RUN_OVERWRITE: bool(overwrite), RUN_TIMEOUT: float(node_timeout_s),
                 RUN_RESUME: bool(resume), RUN_TYPED: ",".join(sorted(typed))})
    if min_sites is not None:
        flat[RUN_MIN_SITES] = int(min_sites)
    if fault:
        flat[RUN_FAULT] = fault
    return flat


def check_min_sites(min_sites: int | None, sites: int, per_round: int | None) -> None:
    """``--min-sites`` must be reachable: at least 1, at most the sites asked each round."""
    if min_sites is None:
        return
    asked = sites if per_round is None else min(per_round, sites)
    if not 1 <= min_sites <= asked:
        raise UsageError(f"--min-sites must lie between 1 and the {asked} sites asked per round, "
                         f"got {min_sites}")


def federate_config_of(run_config: Mapping[str, Any]) -> FederateConfig:
    """The FederateConfig a run config carries (keys that are not its fields are ignored)."""
    raw = dict(run_config)
    if "blocks" in raw:
        raw["blocks"] = parse_blocks(str(raw["blocks"]))
    if "targets" in raw:
        raw["targets"] = tuple(t for t in str(raw["targets"]).split(",") if t)
    raw.setdefault("data", "")
    return FederateConfig.from_dict(raw)


def config_text(cfg: FederateConfig) -> str:
    """The FederateConfig as it travels in every message (JSON text in a ConfigRecord)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_text(text: str) -> FederateConfig:
    return FederateConfig.from_dict(json.loads(text))


@dataclass(frozen=True)
class ServerOptions:
    """What the ServerApp needs beyond the FederateConfig."""

    out: Path
    sites: int
    run_name: str
    overwrite: bool
    node_timeout_s: float
    min_sites: int | None = None  # None: every site asked must answer
    resume: bool = False
    typed: frozenset[str] = frozenset()
    fault: str | None = None

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> ServerOptions:
        missing = [k for k in (RUN_OUT, RUN_SITES) if k not in run_config]
        if missing:
            raise UsageError(f"the Flower run config lacks {missing}; start runs with `cmrfed flower run`")
        out = Path(str(run_config[RUN_OUT]))
        return cls(out=out, sites=int(run_config[RUN_SITES]),
                   run_name=str(run_config.get(RUN_NAME, out.name)),
                   overwrite=bool(run_config.get(RUN_OVERWRITE, False)),
                   node_timeout_s=float(run_config.get(RUN_TIMEOUT, 600.0)),
                   min_sites=int(run_config[RUN_MIN_SITES]) if RUN_MIN_SITES in run_config else None,
                   resume=bool(run_config.get(RUN_RESUME, False)),
                   typed=frozenset(t for t in str(run_config.get(RUN_TYPED, "")).split(",") if t),
                   fault=str(run_config[RUN_FAULT]) if RUN_FAULT in run_config else None)


@dataclass(frozen=True)
class SiteConfig:
    """A SuperNode's node config: which client it is, where its data and its private files are."""

    client: str
    prepared: Path
    site_dir: Path
    device: str = "auto"

    @classmethod
    def of(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        missing = [k for k in (NODE_CLIENT, NODE_PREPARED, NODE_SITE_DIR) if k not in node_config]
        if missing:
            raise UsageError(
                f"this SuperNode's --node-config lacks {missing}; start it with the line "
                "`cmrfed flower site-config` prints for this site"
            )
        return cls(client=str(node_config[NODE_CLIENT]), prepared=Path(str(node_config[NODE_PREPARED])),
                   site_dir=Path(str(node_config[NODE_SITE_DIR])),
                   device=str(node_config.get(NODE_DEVICE, "auto")))

    def node_config(self) -> str:
        """The ``--node-config`` argument of ``flower-supernode`` for this site."""
        values = {NODE_CLIENT: self.client, NODE_PREPARED: str(self.prepared),
                  NODE_SITE_DIR: str(self.site_dir), NODE_DEVICE: self.device}
        for key, value in values.items():
            if '"' in value or "'" in value:
                raise UsageError(f"{key} {value!r}: quotes cannot pass through Flower's --node-config")
        return " ".join(f'{key}="{value}"' for key, value in values.items())


def site_node_config(client: str, prepared: Path, site_dir: Path, device: str = "auto") -> str:
    """Check that ``prepared`` holds ``client``'s shard, intact, and return the site's node config."""
    prepared = Path(prepared).expanduser().resolve()
    manifest = load_manifest(prepared)
    if client not in manifest.clients:
        raise UsageError(f"--client {client!r} is not in {paths.manifest_path(prepared)}; "
                         f"choose one of {', '.join(manifest.clients)}")
    verify_shard(prepared, manifest, client)
    return SiteConfig(client, prepared, Path(site_dir).expanduser().resolve(), device).node_config()
