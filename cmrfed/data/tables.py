"""The declared tables of ``data_manifests/``: vendor -> client, pathology -> label, layouts.

They are data, read at run time and validated on load, so a site can extend them (``--tables``)
without touching code. Every lookup failure names the dataset, the value and the table to edit.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cmrfed.errors import DataError, UsageError

DATASETS: tuple[str, ...] = ("acdc", "mnms", "mnms2")
SITE_LABELS = "csv"  # the pathology table of sites listed in a CSV (optional in a --tables copy)
CLIENT_NAME = re.compile(r"[a-z][a-z0-9_]*")
CLIENT_NAME_RULE = "a lowercase identifier (a-z, 0-9, _; a letter first); it names the client"
NORMAL_CODE = "NOR"
_WILDCARD = "*"
_REQUIRED_LAYOUT_KEYS = {
    "acdc": ("root", "splits", "subject_glob", "info_file", "info_keys", "cine", "frame_image",
             "frame_labels", "frame_base", "labels"),
    "mnms": ("root", "csv_glob", "csv_columns", "splits", "image", "labels_file", "frame_base",
             "labels"),
    "mnms2": ("root", "csv", "csv_columns", "subjects_dir", "subject_digits", "cine", "ed_image",
              "ed_labels", "es_image", "es_labels", "labels", "code_splits"),
}


@dataclass(frozen=True)
class Tables:
    """The three validated tables."""

    clients: tuple[str, ...]
    vendors: dict[str, dict[str, str]]
    labels: dict[str, dict[str, int]]
    layouts: dict[str, dict[str, Any]]
    source: str

    def client_for(self, dataset: str, vendor: str, where: str) -> str:
        """Client of a vendor spelling; ``where`` names the subject/file for the error."""
        table = self.vendors[dataset]
        client = table.get(str(vendor).strip(), table.get(_WILDCARD))
        if client is None:
            known = ", ".join(sorted(table))
            raise DataError(
                f"{where}: vendor {vendor!r} is not in the {dataset} vendor table (known: {known});"
                f" add it to vendors.toml in {self.source} or pass --tables DIR"
            )
        return client

    def label_for(self, dataset: str, code: str, where: str) -> int:
        """Binary label of a pathology code (NOR = 0, any pathology = 1)."""
        table = self.labels.get(dataset)
        if table is None:
            raise DataError(f"{where}: labels.toml in {self.source} has no [{dataset}] table; copy it"
                            " from data_manifests/ (or give the label column instead)")
        key = str(code).strip()
        if key not in table:
            known = ", ".join(sorted(table))
            raise DataError(
                f"{where}: pathology {code!r} is not in the {dataset} label table (known: {known});"
                f" add it to labels.toml in {self.source} or pass --tables DIR"
            )
        return table[key]


def _packaged_table(name: str) -> str:
    """The installed copy of ``data_manifests/`` (package ``cmrfed.manifests``), or, when running
    from a source tree that was not installed, the folder beside the package."""
    try:
        return resources.files("cmrfed.manifests").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        beside = Path(__file__).resolve().parents[2] / "data_manifests" / name
        return beside.read_text(encoding="utf-8")


def _read_toml(directory: Path | None, name: str) -> dict[str, Any]:
    try:
        text = _packaged_table(name) if directory is None else (directory / name).read_text(encoding="utf-8")
        return tomllib.loads(text)
    except FileNotFoundError as exc:
        raise UsageError(f"table {name} not found in {directory}: copy it from data_manifests/") from exc
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"table {name} in {directory or 'data_manifests'} is not valid TOML: {exc}") from exc


def _label_table(labels_raw: dict[str, Any], name: str, source: str) -> dict[str, int]:
    label_table = labels_raw.get(name)
    if not isinstance(label_table, dict) or not label_table:
        raise DataError(f"labels.toml in {source}: missing table [{name}]")
    bad = sorted(k for k, v in label_table.items() if v not in (0, 1) or isinstance(v, bool))
    if bad:
        raise DataError(f"labels.toml in {source}: [{name}] codes {bad} must map to 0 or 1")
    if label_table.get(NORMAL_CODE) != 0:
        raise DataError(f"labels.toml in {source}: [{name}] must map {NORMAL_CODE} to 0")
    return {str(k): int(v) for k, v in label_table.items()}


def load_tables(directory: str | Path | None = None) -> Tables:
    """Load and validate the tables, from the packaged ``data_manifests`` or from ``directory``."""
    folder = Path(directory) if directory is not None else None
    source = str(folder) if folder is not None else "data_manifests"
    vendors_raw = _read_toml(folder, "vendors.toml")
    labels_raw = _read_toml(folder, "labels.toml")
    layouts_raw = _read_toml(folder, "layouts.toml")

    clients = tuple(vendors_raw.get("clients", ()))
    if not clients or len(set(clients)) != len(clients):
        raise DataError(f"vendors.toml in {source}: `clients` must list distinct client names")
    vendors: dict[str, dict[str, str]] = {}
    labels: dict[str, dict[str, int]] = {}
    layouts: dict[str, dict[str, Any]] = {}
    for dataset in DATASETS:
        vendor_table = vendors_raw.get(dataset)
        if not isinstance(vendor_table, dict) or not vendor_table:
            raise DataError(f"vendors.toml in {source}: missing table [{dataset}]")
        unknown = sorted(set(vendor_table.values()) - set(clients))
        if unknown:
            raise DataError(f"vendors.toml in {source}: [{dataset}] maps to unknown clients {unknown}")
        vendors[dataset] = {str(k): str(v) for k, v in vendor_table.items()}

        labels[dataset] = _label_table(labels_raw, dataset, source)

        layout = layouts_raw.get(dataset)
        if not isinstance(layout, dict):
            raise DataError(f"layouts.toml in {source}: missing table [{dataset}]")
        missing = [k for k in _REQUIRED_LAYOUT_KEYS[dataset] if k not in layout]
        if missing:
            raise DataError(f"layouts.toml in {source}: [{dataset}] lacks keys {missing}")
        layouts[dataset] = layout
    if SITE_LABELS in labels_raw:
        labels[SITE_LABELS] = _label_table(labels_raw, SITE_LABELS, source)
    return Tables(clients=clients, vendors=vendors, labels=labels, layouts=layouts, source=source)
