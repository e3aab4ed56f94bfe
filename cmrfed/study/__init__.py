"""``cmrfed study``: a declared, resumable grid of federated runs and its report.

config.py reads the study file, plan.py lays out the cells, runner.py runs them through the
same federate / evaluate / compare functions, report.py writes STUDY/report/.
"""

from __future__ import annotations

from importlib import resources

from cmrfed.errors import UsageError

TEMPLATES = ("example", "demo")


def template_text(name: str) -> str:
    """A shipped study file: ``example`` (the paper's setting, commented) or ``demo``."""
    if name not in TEMPLATES:
        raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, not {name!r}")
    return resources.files(__package__).joinpath("templates", f"{name}.toml").read_text(encoding="utf-8")
