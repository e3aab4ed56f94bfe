"""What ``--overwrite`` may replace: only the kind of folder the command itself makes.

Each output kind is recognised by the file its command writes (a PREPARED folder by the
manifest ``prepare`` wrote, a RUN by the run.json ``federate`` wrote, ...). ``--overwrite`` of a
folder that is not that kind of cmrfed artefact is refused, naming what is in it: a thesis and a
CSV in a folder passed as ``--out`` by mistake must never be deleted.

How a folder is replaced is :mod:`cmrfed.atomic`'s one mechanism (old content set aside as
``.NAME.old-PID-*``, new content built as ``.NAME.tmp-PID-*`` or in place); this module only
decides whether it may be: :func:`new_output` builds beside and swaps, :func:`replacing` builds
in place.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrfed import paths
from cmrfed.atomic import atomic_dir, clean_stale_temporaries, set_aside
from cmrfed.errors import UsageError

MANIFEST_KIND = "cmrfed prepared data"  # the "kind" of a PREPARED folder's manifest.json


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder and how to recognise one that a cmrfed command made."""

    name: str  # e.g. "PREPARED folder"
    command: str  # the command that makes it
    recognise: Callable[[Path], bool]


def _json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _is_prepared(folder: Path) -> bool:
    raw = _json(paths.manifest_path(folder))
    return raw is not None and raw.get("kind") == MANIFEST_KIND


def _is_run(folder: Path) -> bool:
    raw = _json(paths.run_config_path(folder))
    return raw is not None and str(raw.get("created_by", "")).startswith("cmrfed ")


def _is_report(folder: Path) -> bool:
    return _json(paths.comparison_json_path(folder)) is not None


def _is_cohort(folder: Path) -> bool:
    return _json(paths.synth_summary_path(folder)) is not None


def _is_study(folder: Path) -> bool:
    raw = _json(paths.study_record_path(folder))
    return raw is not None and raw.get("created_by") == "cmrfed study"


def _is_inspect(folder: Path) -> bool:
    raw = _json(paths.inspect_json_path(folder))
    return raw is not None and raw.get("created_by") == "cmrfed inspect"


def _is_demo(folder: Path) -> bool:
    """``cmrfed demo``'s OUT: its cohort/ and the study/ it runs on it."""
    return _is_cohort(folder / "cohort") or _is_study(folder / "study")


COHORT = OutputKind("synthetic cohort", "cmrfed synth", _is_cohort)
PREPARED = OutputKind("PREPARED folder", "cmrfed prepare", _is_prepared)
RUN = OutputKind("RUN folder", "cmrfed federate", _is_run)
REPORT = OutputKind("REPORT folder", "cmrfed compare", _is_report)
STUDY = OutputKind("STUDY folder", "cmrfed study", _is_study)
DEMO = OutputKind("demo folder", "cmrfed demo", _is_demo)
INSPECT = OutputKind("inspect folder", "cmrfed inspect", _is_inspect)


def visible_entries(folder: Path) -> list[str]:
    """Names in ``folder``, sorted (an unreadable folder counts as holding something)."""
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError:
        return ["(unreadable)"]


def describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not visible_entries(folder)


def check_replaceable(folder: Path, kind: OutputKind, overwrite: bool, option: str = "--out") -> None:
    """Refuse to write ``folder`` unless it is absent, empty, or (with ``overwrite``) a ``kind``.

    Nothing is removed here; the caller builds the new output beside it and swaps.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise UsageError(f"{option} {folder} is a file, not a folder; choose another {option}")
    names = visible_entries(folder)
    if not names:
        return
    if not overwrite:
        raise UsageError(f"{folder} already exists; pass --overwrite to replace it, or choose "
                         f"another {option}")
    if not kind.recognise(folder):
        raise UsageError(
            f"--overwrite refused: {folder} is not a {kind.name} made by `{kind.command}` (it holds "
            f"{describe(names)}); nothing was changed. Move those files away or choose another {option}"
        )


@contextlib.contextmanager
def new_output(folder: str | Path, kind: OutputKind, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``folder`` (a ``kind``) once the block succeeds.

    ``folder`` is checked first (:func:`check_replaceable`); an old one is replaced only after the
    new one is complete, so a failed or killed command leaves it untouched.
    """
    check_replaceable(Path(folder), kind, overwrite)
    with atomic_dir(folder) as tmp:
        yield tmp


@contextlib.contextmanager
def replacing(folder: Path, kind: OutputKind, overwrite: bool) -> Iterator[None]:
    """Replace ``folder`` (a ``kind``) by what the block builds in its place, never losing it.

    For outputs that cannot be built beside and swapped (a study's runs record the absolute path
    of its prepared data): the old folder is set aside (:func:`cmrfed.atomic.set_aside`), deleted
    only when the block succeeds and put back when it fails; when the process is killed, the next
    command on the same folder puts it back (:func:`cmrfed.atomic.clean_stale_temporaries`).
    """
    folder = Path(folder)
    clean_stale_temporaries(folder)
    check_replaceable(folder, kind, overwrite)
    if not (folder.exists() and visible_entries(folder)):
        yield
        return
    with set_aside(folder):
        yield
