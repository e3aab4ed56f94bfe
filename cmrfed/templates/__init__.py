"""The study files cmrfed ships: ``example`` (the paper's setting, commented) and ``demo``.

Plain data below every command (like ``data_manifests/``): ``cmrfed study --template`` prints
them, the demo runs one, and the option's choices are read from here.
"""

from __future__ import annotations

from importlib import resources

from cmrfed.errors import UsageError

TEMPLATES = ("example", "demo")


def template_text(name: str) -> str:
    """A shipped study file: ``example`` (the paper's setting, commented) or ``demo``."""
    if name not in TEMPLATES:
        raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, not {name!r}")
    return resources.files(__package__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
