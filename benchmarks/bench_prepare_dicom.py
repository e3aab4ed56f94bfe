"""Throughput of ``cmrfed prepare --csv`` on DICOM series against the same cines as 4-D NIfTI.

Run: ``python benchmarks/bench_prepare_dicom.py [--subjects 24] [--synth-shape 96,96,8]``. A
synthetic site (``cmrfed synth --site``: one classic single-frame DICOM file per slice and phase,
plus a survey series beside each cine) is prepared from its CSV; each cine is then written as one
4-D NIfTI (gzip, on the same grid) and listed in a second CSV with the same label files, and
prepared again. Prints subjects per second and CPU seconds per subject for both, the ratio, and
compares the two formats' shard images voxel by voxel. One worker, one ITK / torch thread.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk
import torch
from common import Machine, cpu_seconds, markdown_table, write_results
from rich.console import Console
from rich.table import Table

from cmrfed.data.dicom import read_dicom_cine
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.synth_site import CSV_NAME, DicomGeometry, write_nifti, write_synthetic_site
from cmrfed.paths import SHARDS_DIR

COLUMNS = ("cine format", "subjects", "files per subject", "wall s", "subjects / s", "CPU s / subject",
           "vs NIfTI")
SITE = "bench"


def _triple(text: str, kind: type) -> tuple:
    return tuple(kind(v) for v in text.split(","))


def _nifti_twin(site: Path) -> Path:
    """The site's CSV with every DICOM cine replaced by a 4-D NIfTI of it on the same grid."""
    with (site / CSV_NAME).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        volume = read_dicom_cine(site / row["image"], row["series"])
        name = f"{row['subject']}_cine.nii.gz"
        write_nifti(site / name, volume.array, DicomGeometry(volume.origin, volume.direction, volume.spacing))
        row.update(image=name, series="")
    twin = site / "nifti.csv"
    with twin.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return twin


def _images(prepared: Path) -> dict[str, np.ndarray]:
    with h5py.File(prepared / SHARDS_DIR / f"{SITE}.h5", "r") as shard:
        subjects = shard["subjects"]
        return {name.removeprefix(f"{SITE}_"): group["image"][()] for name, group in subjects.items()}


def _agreement(dicom: dict[str, np.ndarray], nifti: dict[str, np.ndarray]) -> str:
    """How many subjects' images are identical; how far the others are."""
    differences = {k: dicom[k].astype(int) - nifti[k] for k in dicom}
    voxels = sum(int((d != 0).sum()) for d in differences.values())
    worst = max(int(np.abs(d).max()) for d in differences.values())
    same = sum(not d.any() for d in differences.values())
    return (f"{same} of {len(differences)} subjects have identical shard images; the others differ in"
            f" {voxels} voxels in all, by at most {worst} grey level(s) of 255")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=24, help="synthetic subjects per dataset drawn")
    parser.add_argument("--synth-shape", default="96,96,8", help="nominal synthetic matrix")
    parser.add_argument("--spacing", default="1,1,10", help="prepare --spacing")
    parser.add_argument("--shape", default="192,192,16", help="prepare --shape")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    console = Console()
    machine = Machine()
    with tempfile.TemporaryDirectory() as scratch:
        site = Path(scratch) / "site"
        write_synthetic_site(site, SITE, seed=0, subjects=args.subjects, shape=_triple(args.synth_shape, int))
        tables = {"DICOM": site / CSV_NAME, "NIfTI": _nifti_twin(site)}
        n_files = sum(1 for p in site.rglob("*") if p.is_file() and p.parent != site)
        rows, images = [], {}
        for name, table in tables.items():
            options = PrepareOptions(out=Path(scratch) / f"prepared-{name}", csv=(table,),
                                     spacing=_triple(args.spacing, float), shape=_triple(args.shape, int))
            cpu_before, start = cpu_seconds(), time.perf_counter()
            result = prepare(options, console=Console(quiet=True))
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
            subjects = len(result.manifest["subjects"])
            files = n_files / subjects if name == "DICOM" else 2
            rows.append((name, subjects, files, seconds, cpu))
            images[name] = _images(options.out)
    same_ids = images["DICOM"].keys() == images["NIfTI"].keys()
    agreement = _agreement(images["DICOM"], images["NIfTI"]) if same_ids else "different subjects"
    nifti_rate = rows[1][1] / rows[1][3]
    formatted = [(name, n, f"{files:.0f}", f"{t:.2f}", f"{n / t:.2f}", f"{c / n:.3f}",
                  f"{n / t / nifti_rate:.2f}x") for name, n, files, t, c in rows]
    table = Table(title=f"cmrfed prepare --csv, DICOM vs NIfTI cines, --shape {args.shape} "
                        f"--spacing {args.spacing}")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in formatted:
        table.add_row(*map(str, row))
    console.print(table)
    console.print(agreement)
    body = (f"A synthetic site drawn from {args.subjects} subjects per dataset (`synth --site`; its "
            "labelled M&Ms-1 subjects), each cine as classic single-frame DICOM files (plus a "
            "survey series beside it) and as one 4-D NIfTI (gzip), prepared to --shape "
            f"{args.shape} --spacing {args.spacing}, one worker. Files per subject: DICOM files of"
            " the subject's folder plus its label file.\n\n" + markdown_table(COLUMNS, formatted)
            + f"\n\n{agreement}. A cine stored as floats (rescaled by its DICOM tags) can differ from its"
            " NIfTI twin in the last bit of the geometry (decimal positions against the NIfTI header's"
            " numbers), which moves the float voxels of the resampled image by one unit in the last"
            " place; the voxels clipped at the 99.5th percentile then land on 254 or 255.\n")
    path = write_results(Path(__file__).parent / "results", "prepare_dicom", machine,
                         "cmrfed prepare --csv: subjects per second, DICOM against NIfTI", body)
    console.print(f"written: {path.relative_to(Path(__file__).parent.parent)}")
    if not same_ids:
        raise SystemExit("the two formats prepared different subjects")


if __name__ == "__main__":
    main()
