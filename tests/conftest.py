"""Shared fixtures: one small synthetic cohort, prepared once per test session.

Built with the real stages (synth -> prepare) in the real on-disk layouts; small shapes keep the
whole suite fast on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth import write_synthetic_cohort

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
