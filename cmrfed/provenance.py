"""What every stage records about the software that produced an artefact."""

from __future__ import annotations

import platform
from importlib import metadata

import cmrfed

_TRACKED = ("torch", "numpy", "h5py", "SimpleITK", "nibabel", "safetensors", "scipy")


def versions() -> dict[str, str]:
    """Versions of cmrfed, Python and the libraries whose behaviour shapes the numbers."""
    found = {"cmrfed": cmrfed.__version__, "python": platform.python_version()}
    for name in _TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
