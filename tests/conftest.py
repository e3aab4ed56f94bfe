"""Shared fixtures: one small synthetic cohort, prepared once per test session.

Built with the real stages (synth -> prepare) in the real on-disk layouts; small shapes keep the
whole suite fast on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth import write_synthetic_cohort

DATA = Path(__file__).parent / "data"
SMALL_SHAPE = (32, 32, 4)
SMALL_SPACING = (4.0, 4.0, 10.0)


def quiet_console() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder (4 vendor clients, both labels in every split) at 32 x 32 x 4."""
    root = tmp_path_factory.mktemp("cohort")
    write_synthetic_cohort(root / "raw", seed=3, subjects=21, shape=(48, 48, 6), frames=8)
    prepare(
        PrepareOptions(
            out=root / "prepared", acdc=root / "raw" / "acdc", mnms=root / "raw" / "mnms",
            mnms2=root / "raw" / "mnms2", spacing=SMALL_SPACING, shape=SMALL_SHAPE, seed=0,
        ),
        console=quiet_console(),
    )
    return root / "prepared"


def key_table(name: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a CineMA weights file (tests/data/cinema_*_keys.json)."""
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def write_random_checkpoint(path: Path, table: dict[str, list[int]], seed: int) -> Path:
    """Random tensors under CineMA's real names and shapes, as a safetensors file."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.rand(shape, generator=generator) for name, shape in table.items()}
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def pretrained_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in the layout of CineMA's public 4-view ``pretrained/cinema.safetensors``."""
    path = tmp_path_factory.mktemp("ckpt") / "cinema.safetensors"
    return write_random_checkpoint(path, key_table("cinema_pretrained_keys.json"), seed=1)


@pytest.fixture(scope="session")
def finetuned_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file in the layout of a SAX classifier fine-tuned by CineMA's own code."""
    path = tmp_path_factory.mktemp("ckpt") / "finetuned_sax.safetensors"
    return write_random_checkpoint(path, key_table("cinema_finetuned_sax_keys.json"), seed=2)
