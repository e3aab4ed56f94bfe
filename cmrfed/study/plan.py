"""The grid of a study: one cell per (blocks, rank, method, seed), each a full FederateConfig.

A cell's identity is its resolved configuration plus the hashes of its inputs (the prepared
manifest and the frozen backbone's weights); its folder name is only a readable label. A run
on disk belongs to a cell when its run.json records the same configuration and the same input
hashes, wherever it lies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrfed.fed.config import FederateConfig
from cmrfed.study.config import StudyConfig


@dataclass(frozen=True)
class Cell:
    """One federated run of the study."""

    name: str
    config: FederateConfig

    @property
    def setting(self) -> tuple[int | str, int]:
        """The (blocks, rank) setting the cell belongs to: one comparison per setting."""
        return (self.config.blocks, self.config.rank)

    def key(self) -> str:
        """The configuration as canonical text: equal configurations give equal keys."""
        return config_key(self.config.to_dict())


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def cell_name(method: str, blocks: int | str, rank: int, seed: int) -> str:
    return f"{method}-blocks{blocks}-rank{rank}-seed{seed}"


def setting_name(blocks: int | str, rank: int) -> str:
    return f"blocks{blocks}-rank{rank}"


def plan_cells(study: StudyConfig, prepared: Path) -> tuple[Cell, ...]:
    """Every cell, grouped by setting so each setting's comparison is ready as early as possible;
    within a setting seed by seed, so an interrupted study already holds paired runs."""
    cells = []
    for blocks in study.blocks:
        for rank in study.ranks:
            for seed in study.seeds:
                for method in study.methods:
                    config = study.cell_config(str(prepared), method, seed, blocks, rank)
                    cells.append(Cell(cell_name(method, blocks, rank, seed), config))
    return tuple(cells)
