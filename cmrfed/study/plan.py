"""The grid of a study: one cell per (blocks, rank, method, seed), each a full FederateConfig.

A cell's identity is its resolved configuration plus the hashes of its inputs (the prepared
manifest and the frozen backbone's weights); its folder name is only a readable label. A run
on disk belongs to a cell when its run.json records the same configuration and the same input
hashes, wherever it lies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
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
    def holdout(self) -> str | None:
        """The site this cell trains without (a participation cell), or None (a grid cell)."""
        return self.config.holdout

    @property
    def setting(self) -> tuple[int | str, int]:
        """The (blocks, rank) setting the cell belongs to: one comparison per setting."""
        return (self.config.blocks, self.config.rank)

    def key(self) -> str:
        """The configuration as canonical text: equal configurations give equal keys."""
        return config_key(self.config.to_dict())


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def cell_name(method: str, blocks: int | str, rank: int, seed: int, holdout: str | None = None) -> str:
    name = f"{method}-blocks{blocks}-rank{rank}-seed{seed}"
    return name if holdout is None else f"{name}-without-{holdout}"


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


def plan_participation(study: StudyConfig, prepared: Path) -> tuple[Cell, ...]:
    """The participation cells: the main setting's runs again, each without one ``holdout`` site
    (leave-one-vendor-out), per method and seed, so the held-out site's zero-shot and adapted
    scores pair with its score as a member in the grid cell of the same method and seed."""
    cells = []
    blocks, rank = study.main_blocks, study.main_rank
    for site in study.holdout:
        for seed in study.seeds:
            for method in study.methods:
                config = replace(study.cell_config(str(prepared), method, seed, blocks, rank), holdout=site)
                cells.append(Cell(cell_name(method, blocks, rank, seed, site), config))
    return tuple(cells)


def member_cell(cell: Cell, grid: tuple[Cell, ...]) -> Cell:
    """The grid cell in which ``cell``'s held-out site trained as a member."""
    return next(c for c in grid if c.key() == config_key({**cell.config.to_dict(), "holdout": None}))
