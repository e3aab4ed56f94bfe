"""`cmrfed prepare --csv`: a site's own exams as DICOM series or NIfTI, listed in a CSV.

Real files throughout: DICOM series written with pydicom (the tags scanners fill, an oblique
orientation, shuffled file order and meaningless names), NIfTI with nibabel, read back by the
same code as any user's export.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from conftest import quiet_console
from test_prepare import ES_FRAME, FAST, MNMS_ROWS, run_cli, write_acdc, write_mnms

from cmrfed.atomic import sha256_file
from cmrfed.data.dicom import read_dicom_cine
from cmrfed.data.prepare import PrepareOptions, prepare
from cmrfed.data.shards import load_manifest
from cmrfed.data.synth_site import DicomGeometry, oblique_geometry, write_dicom_cine, write_nifti
from cmrfed.errors import DataError
from cmrfed.fed import inprocess
from cmrfed.fed.config import FederateConfig
from cmrfed.paths import shard_path

SPACING = (1.5, 1.5, 10.0)
GRID = (40, 36, 6)
FRAMES = 8
ES = 3  # 0-based end-systole of the phantom below
SMALL = {"spacing": (2.0, 2.0, 10.0), "shape": (32, 32, 8)}


def phantom(seed: int, grid=GRID, frames=FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """A beating disc: int16 cine (x, y, z, t) and 4-D labels (1 LV) at ED (0) and ES only."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    cx, cy = rng.uniform(0.4, 0.6, 2) * grid[:2]
    cine = np.zeros((*grid, frames), np.int16)
    labels = np.zeros((*grid, frames), np.uint8)
    for t in range(frames):
        radius = grid[0] / 5 * (1 - 0.35 * np.sin(np.pi * min(t, 2 * ES) / (2 * ES)))
        lv = np.hypot(x - cx, y - cy) < radius
        for z in range(grid[2]):
            cine[:, :, z, t] = 60 + 300 * lv * (0.8 + 0.05 * z) + rng.normal(0, 8, lv.shape)
            if t in (0, ES):
                labels[:, :, z, t] = lv
    return cine, labels


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    header = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def dicom_subject(folder: Path, seed: int, rescale=(1.0, 0.0), grid=GRID,
                  frames=FRAMES) -> tuple[np.ndarray, np.ndarray, DicomGeometry, str]:
    """An oblique DICOM cine of ``phantom(seed)`` in ``folder``; (stored cine, labels, grid, UID)."""
    cine, labels = phantom(seed, grid, frames)
    rng = np.random.default_rng(seed)
    geometry = oblique_geometry(rng, SPACING, grid)
    series = write_dicom_cine(folder, cine, geometry, dt_ms=37.5, rng=rng, uid_seed=f"test{seed}",
                              rescale=rescale)
    return cine, labels, geometry, series


def image_of(prepared: Path, subject_id: str) -> tuple[np.ndarray, dict]:
    manifest = load_manifest(prepared)
    client = next(s.client for s in manifest.subjects if s.subject_id == subject_id)
    with h5py.File(shard_path(prepared, client), "r") as shard:
        group = shard["subjects"][subject_id]
        return group["image"][()], dict(group.attrs)


def run_prepare(out: Path, **options) -> Path:
    prepare(PrepareOptions(out=out, **{**SMALL, **options}), console=quiet_console())
    return out


# ----------------------------------------------------------------------------- the same cine, two formats


@pytest.mark.parametrize("rescale", [(1.0, 0.0), (0.5, -10.0)], ids=["stored", "rescaled"])
def test_dicom_and_nifti_of_one_cine_prepare_to_identical_images(tmp_path, rescale):
    cine, labels, geometry, _ = dicom_subject(tmp_path / "export" / "p01", seed=1, rescale=rescale)
    (tmp_path / "export" / "p01" / "README.txt").write_text("exported from PACS")  # not DICOM: skipped
    values = cine if rescale == (1.0, 0.0) else (cine * rescale[0] + rescale[1]).astype(np.float32)
    write_nifti(tmp_path / "nifti" / "p01_cine.nii.gz", values, geometry)
    write_nifti(tmp_path / "seg.nii.gz", labels, geometry)
    for name in ("dicom", "nifti"):
        image = "export/p01" if name == "dicom" else "nifti/p01_cine.nii.gz"
        write_csv(tmp_path / f"{name}.csv", [{"subject": "p01", "site": f"{name}_site", "label": 1,
                                             "image": image, "seg": "seg.nii.gz"}])
    out = run_prepare(tmp_path / "prepared", csv=(tmp_path / "dicom.csv", tmp_path / "nifti.csv"))

    from_dicom, dicom_attrs = image_of(out, "dicom_site_p01")
    from_nifti, nifti_attrs = image_of(out, "nifti_site_p01")
    np.testing.assert_array_equal(from_dicom, from_nifti)
    assert from_dicom.shape == (2, 30, 27, 6) and from_dicom.max() >= 254
    for attrs in (dicom_attrs, nifti_attrs):
        assert (attrs["ed_frame"], attrs["es_frame"]) == (0, ES) and attrs["centre_from"] == "labels"
    # through-plane spacing from the slice positions (10 mm), not SliceThickness (8 mm)
    assert list(dicom_attrs["original_spacing"]) == pytest.approx(SPACING)
    manifest = load_manifest(out)
    assert [d["subjects"] for d in manifest.raw["duplicates"]] == [["dicom_site_p01", "nifti_site_p01"]]
    assert [entry["sha256"] for entry in manifest.raw["inputs"]["csv"]] == [
        sha256_file(tmp_path / "dicom.csv"), sha256_file(tmp_path / "nifti.csv")]
    sources = {s["subject_id"]: s["sources"] for s in manifest.raw["subjects"]}
    assert [path for path, _ in sources["dicom_site_p01"]] == ["export/p01", "seg.nii.gz"]
    assert sources["nifti_site_p01"][0] == ["nifti/p01_cine.nii.gz",
                                            sha256_file(tmp_path / "nifti/p01_cine.nii.gz")]


def test_dicom_grid_geometry_and_phase_order(tmp_path):
    cine, _, geometry, _ = dicom_subject(tmp_path / "p", seed=2)
    volume = read_dicom_cine(tmp_path / "p")
    np.testing.assert_array_equal(volume.array, cine)
    assert volume.direction == pytest.approx(geometry.direction, abs=1e-12)
    assert volume.origin == pytest.approx(geometry.origin) and volume.spacing == pytest.approx(SPACING)
    files = sorted((tmp_path / "p").iterdir())
    assert len(files) == GRID[2] * FRAMES and not any(f.suffix for f in files)
    first = pydicom.dcmread(files[0])
    assert float(first.SliceThickness) == pytest.approx(8.0)
    normal = np.array(geometry.direction).reshape(3, 3)[:, 2]
    assert abs(normal[2]) < 0.95  # oblique: the slice normal is not the feet-head axis
    # without TriggerTime, phases follow InstanceNumber
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.TriggerTime
        ds.save_as(path)
    np.testing.assert_array_equal(read_dicom_cine(tmp_path / "p").array, cine)


def test_seg_on_another_grid_is_resampled_onto_the_cine(tmp_path):
    """A seg converted from the DICOM by another tool (rows flipped, the affine saying so)."""
    _, labels, geometry, _ = dicom_subject(tmp_path / "p01", seed=3)
    write_nifti(tmp_path / "same.nii.gz", labels, geometry)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, GRID[1] - 1  # voxel j of the file is voxel ny - 1 - j of the cine
    flipped = DicomGeometry(geometry.origin, geometry.direction, geometry.spacing)
    affine = flipped.affine_ras() @ flip
    import nibabel as nib

    image = nib.Nifti1Image(labels[:, ::-1].copy(), affine)
    image.set_qform(affine, code=1)
    nib.save(image, tmp_path / "flipped.nii.gz")
    write_csv(tmp_path / "site.csv", [
        {"subject": "a", "site": "h", "label": 0, "image": "p01", "seg": "same.nii.gz"},
        {"subject": "b", "site": "h", "label": 0, "image": "p01", "seg": "flipped.nii.gz"}])
    out = run_prepare(tmp_path / "prepared", csv=(tmp_path / "site.csv",))
    np.testing.assert_array_equal(image_of(out, "h_a")[0], image_of(out, "h_b")[0])
    assert any("flipped.nii.gz" in w and "resampled" in w for w in load_manifest(out).raw["warnings"])


def test_csv_subject_laid_out_as_acdc_prepares_as_the_acdc_route(tmp_path):
    write_acdc(tmp_path / "acdc", groups=("DCM",))
    folder = "acdc/database/training/patient001"
    write_csv(tmp_path / "site.csv", [{
        "subject": "patient001", "site": "dijon", "pathology": "DCM",
        "image": f"{folder}/patient001_4d.nii.gz", "seg": f"{folder}/patient001_frame01_gt.nii.gz",
        "ed": 0, "es": ES_FRAME, "lv_label": 3}])
    out = run_prepare(tmp_path / "prepared", acdc=tmp_path / "acdc", csv=(tmp_path / "site.csv",))
    from_acdc, acdc_attrs = image_of(out, "acdc_patient001")
    from_csv, csv_attrs = image_of(out, "dijon_patient001")
    np.testing.assert_array_equal(from_csv, from_acdc)
    assert csv_attrs["label"] == acdc_attrs["label"] == 1 and csv_attrs["pathology"] == "DCM"
    assert csv_attrs["csv_row"] == 2 and json.loads(csv_attrs["csv_extra"]) == {}
    # one scan twice: found by its fingerprint and kept in one client and split
    assert [d["subjects"] for d in load_manifest(out).raw["duplicates"]] == [
        ["acdc_patient001", "dijon_patient001"]]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> Path:
    """A small valid DICOM cine (4 slices x 5 phases) that each bad-input test copies and damages."""
    folder = tmp_path_factory.mktemp("series") / "p01"
    dicom_subject(folder, seed=4, grid=(24, 20, 4), frames=5)
    return folder


def _by_position(folder: Path) -> dict[tuple[int, int], Path]:
    """(slice along the normal, InstanceNumber-ordered phase) -> file."""
    datasets = {p: pydicom.dcmread(p) for p in folder.iterdir()}
    return {divmod(int(ds.InstanceNumber) - 1, 5): p for p, ds in datasets.items()}


def _edit(path: Path, **tags: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _missing_slice(folder: Path) -> None:
    for (k, _), path in _by_position(folder).items():
        if k == 1:
            path.unlink()


def _second_series(folder: Path) -> None:
    for (k, t), path in _by_position(folder).items():
        if t == 0:
            copy = folder / f"survey{k}"
            shutil.copy(path, copy)
            _edit(copy, SeriesInstanceUID="1.2.3.4.5", SOPInstanceUID=f"1.2.3.4.5.{k}")


def _enhanced(folder: Path) -> None:
    _edit(next(iter(sorted(folder.iterdir()))), NumberOfFrames=5)


def _seg_with_one_labelled_frame(folder: Path) -> None:
    volume = read_dicom_cine(folder)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[5:15, 5:15, :, 0] = 1
    write_nifti(folder.parent / "seg.nii.gz", labels, DicomGeometry(volume.origin, volume.direction,
                                                                     volume.spacing))


BASE_ROW = {"subject": "p01", "site": "hospital_a", "pathology": "NOR", "image": "p01", "ed": 0, "es": 2}
BAD = {
    # name: (damage to the series folder, row changes, needle)
    "missing-image": (None, {"image": "nowhere"}, "image 'nowhere'"),
    "absolute-path": (None, {"image": "/p01"}, "give the path relative to the CSV"),
    "several-series": (_second_series, {}, "holds 2 series"),
    "missing-slice": (_missing_slice, {}, "not evenly spaced"),
    "missing-phase": (lambda f: _by_position(f)[(2, 3)].unlink(), {}, "miss phases"),
    "spacing-changes": (lambda f: _edit(_by_position(f)[(1, 1)], PixelSpacing=["1.4", "1.5"]), {},
                        "PixelSpacing changes within the series"),
    "orientation-changes": (lambda f: _edit(_by_position(f)[(0, 2)],
                                            ImageOrientationPatient=["1", "0", "0", "0", "1", "0"]), {},
                            "ImageOrientationPatient changes within the series"),
    "enhanced": (_enhanced, {}, "enhanced multi-frame MR"),
    "seg-gives-no-es": (_seg_with_one_labelled_frame, {"seg": "seg.nii.gz", "ed": "", "es": ""},
                        "its label file does not give them (1 labelled frame(s), two needed)"),
    "es-out-of-range": (None, {"es": 9}, "ES index 9 is out of range 0..4"),
    "unknown-pathology": (None, {"pathology": "XYZ"}, "pathology 'XYZ' is not in the csv label table"),
    "site-not-identifier": (None, {"site": "Hospital A"}, "is not a lowercase identifier"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_row_and_subject_and_writes_nothing(case, small_series, tmp_path, monkeypatch,
                                                            capsys):
    damage, changes, needle = BAD[case]
    shutil.copytree(small_series, tmp_path / "p00")
    shutil.copytree(small_series, tmp_path / "p01")
    if damage is not None:
        damage(tmp_path / "p01")
    good = {**BASE_ROW, "subject": "p00", "image": "p00"}
    table = write_csv(tmp_path / "site.csv", [good, {**BASE_ROW, **changes}])
    out = tmp_path / "prepared"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--csv", str(table), "--out", str(out), *FAST)
    assert code == 1, text
    assert f"{table} row 3 (subject 'p01')" in text and needle in text, text
    assert "Traceback" not in text
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_series_column_picks_the_cine_beside_other_series(small_series, tmp_path):
    shutil.copytree(small_series, tmp_path / "p01")
    uid = str(pydicom.dcmread(next((tmp_path / "p01").iterdir())).SeriesInstanceUID)
    _second_series(tmp_path / "p01")
    _edit(tmp_path / "p01" / "survey0", NumberOfFrames=5)  # an enhanced file of the other series: not read
    table = write_csv(tmp_path / "site.csv", [{**BASE_ROW, "series": uid}])
    out = run_prepare(tmp_path / "prepared", csv=(table,))
    assert [s.subject_id for s in load_manifest(out).subjects] == ["hospital_a_p01"]


@pytest.mark.parametrize("case", ["duplicate-subject", "missing-columns"])
def test_bad_csv_table(case, small_series, tmp_path, monkeypatch, capsys):
    shutil.copytree(small_series, tmp_path / "p01")
    if case == "duplicate-subject":
        table = write_csv(tmp_path / "site.csv", [BASE_ROW, BASE_ROW])
        needle = f"{table} row 3 (subject 'p01'): duplicate subject"
    else:
        table = write_csv(tmp_path / "site.csv", [{k: v for k, v in BASE_ROW.items() if k != "image"}])
        needle = f"{table} row 1 (the header): missing column(s) 'image'"
    out = tmp_path / "prepared"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--csv", str(table), "--out", str(out), *FAST)
    assert code == 1 and needle in text, text
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_pathology_codes_extend_with_tables(small_series, tmp_path):
    shutil.copytree(small_series, tmp_path / "p01")
    table = write_csv(tmp_path / "site.csv", [{**BASE_ROW, "pathology": "MYOC"}])
    tables = tmp_path / "tables"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data_manifests", tables)
    labels = tables / "labels.toml"
    labels.write_text(labels.read_text().replace("[csv]\n", "[csv]\nMYOC = 1  # myocarditis\n"))
    out = run_prepare(tmp_path / "prepared", csv=(table,), tables=tables)
    assert image_of(out, "hospital_a_p01")[1]["label"] == 1
    # a tables copy from before site CSVs: codes fail with the fix named, 0/1 labels still work
    labels.write_text(labels.read_text().split("[csv]")[0])
    with pytest.raises(DataError, match=r"row 2 \(subject 'p01'\).*has no \[csv\] table"):
        run_prepare(tmp_path / "again", csv=(table,), tables=tables)
    write_csv(table, [{**BASE_ROW, "pathology": "", "label": 1}])
    assert image_of(run_prepare(tmp_path / "labelled", csv=(table,), tables=tables), "hospital_a_p01")[1][
        "label"] == 1


def test_skip_invalid_lists_bad_rows(small_series, tmp_path, monkeypatch, capsys):
    shutil.copytree(small_series, tmp_path / "p01")
    table = write_csv(tmp_path / "site.csv", [
        BASE_ROW, {**BASE_ROW, "subject": "p02", "es": 7}, {**BASE_ROW, "subject": "p03", "label": 2},
        {**BASE_ROW, "subject": "p04", "ed": "", "es": ""}, {**BASE_ROW, "subject": "p05", "ward": "B"}])
    out = tmp_path / "prepared"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--csv", str(table), "--out", str(out), *FAST,
                         "--skip-invalid")
    assert code == 0, text
    manifest = load_manifest(out)
    assert [s.subject_id for s in manifest.subjects] == ["hospital_a_p01", "hospital_a_p05"]
    skipped = {s["subject_id"]: s["reason"] for s in manifest.raw["skipped"]}
    assert "row 3 (subject 'p02')" in skipped["hospital_a_p02"] and "ES index 7" in skipped["hospital_a_p02"]
    assert "label '2' is not 0" in skipped["hospital_a_p03"]
    assert "no ed/es and no seg" in skipped["hospital_a_p04"]
    assert manifest.raw["inputs"]["csv"][0]["extra_columns"] == ["ward"]
    assert json.loads(image_of(out, "hospital_a_p05")[1]["csv_extra"]) == {"ward": "B"}


# ----------------------------------------------------------------------------- with the public datasets


def test_csv_site_federates_with_acdc_and_mnms(tmp_path):
    write_acdc(tmp_path / "acdc", groups=("NOR", "DCM"))
    write_mnms(tmp_path / "mnms", rows=[r for r in MNMS_ROWS if r[1] == "B"])
    rows = []
    for n in range(4):
        dicom_subject(tmp_path / "site" / f"s{n}", seed=10 + n)
        rows.append({"subject": f"s{n}", "site": "hospital_a", "label": n % 2, "image": f"s{n}",
                     "ed": 0, "es": ES})
    table = write_csv(tmp_path / "site" / "site.csv", rows)
    prepared = run_prepare(tmp_path / "prepared", acdc=tmp_path / "acdc", mnms=tmp_path / "mnms",
                           csv=(table,), spacing=(4.0, 4.0, 10.0), shape=(32, 32, 4))
    manifest = load_manifest(prepared)
    assert manifest.clients == ("siemens", "philips", "hospital_a")
    cfg = FederateConfig(data=str(prepared), rounds=1, local_epochs=1, batch_size=8, rank=2,
                         augment="none")
    inprocess.federate(cfg, tmp_path / "run", device="cpu", console=quiet_console())
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and "hospital_a" in json.dumps(rounds[0])


# ----------------------------------------------------------------------------- synth --site


@pytest.mark.e2e
def test_synth_site_writes_a_csv_and_dicom_site_that_prepares(tmp_path, monkeypatch, capsys):
    args = ["--subjects", "5", "--shape", "32,32,4", "--frames", "6", "--seed", "3"]
    code, text = run_cli(monkeypatch, capsys, "synth", "--out", str(tmp_path / "site"), "--site", "clinic",
                         *args)
    assert code == 0 and "--csv" in text, text
    table = tmp_path / "site" / "site.csv"
    rows = list(csv.DictReader(table.open()))
    assert rows and {r["site"] for r in rows} == {"clinic"} and all(r["series"] for r in rows)
    assert any(r["ed"] == "" for r in rows) and any(r["ed"] != "" for r in rows)
    code, text = run_cli(monkeypatch, capsys, "prepare", "--csv", str(table), "--out",
                         str(tmp_path / "prepared"), *FAST)
    assert code == 0, text
    manifest = load_manifest(tmp_path / "prepared")
    assert manifest.clients == ("clinic",) and len(manifest.subjects) == len(rows)
    assert manifest.raw["inputs"]["csv"][0]["extra_columns"] == ["age"]
    # DICOM read in worker processes gives the same shards
    code, text = run_cli(monkeypatch, capsys, "prepare", "--csv", str(table), "--out",
                         str(tmp_path / "prepared-2"), *FAST, "--workers", "2")
    assert code == 0 and load_manifest(tmp_path / "prepared-2").shard_sha256 == manifest.shard_sha256, text
    # the same seed gives the same files
    code, _ = run_cli(monkeypatch, capsys, "synth", "--out", str(tmp_path / "again"), "--site", "clinic",
                      *args)

    def digest(root: Path) -> str:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth_summary.json")
        return hashlib.sha256(b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes()
                                       for p in files)).hexdigest()

    assert code == 0 and digest(tmp_path / "site") == digest(tmp_path / "again")


def test_fingerprints_of_small_images_of_other_sizes_compare():
    """Images narrower than the fingerprint grid (small test volumes, coarse --spacing) still give
    vectors of one length, so subjects of other sizes can be checked for duplicates together."""
    from cmrfed.data.preprocess import fingerprint

    rng = np.random.default_rng(0)
    small, other = (rng.integers(0, 255, (2, *shape), dtype=np.uint8) for shape in ((15, 14, 6), (30, 30, 3)))
    assert fingerprint(small).shape == fingerprint(other).shape == (16 * 16 * 4,)
    assert fingerprint(small) @ fingerprint(small) == pytest.approx(1.0)


@pytest.mark.parametrize("given", ['"site_a.csv"', '["site_a.csv", "site_b.csv"]'])
def test_study_prepare_table_takes_site_csvs(tmp_path, given):
    from cmrfed.options import prepare_options
    from cmrfed.study.config import parse_study

    text = f'[prepare]\ncsv = {given}\nacdc = "acdc"\n[grid]\nmethods = ["duallora", "fedlora"]\n'
    study = parse_study(text, "study.toml", tmp_path)
    expected = [str(tmp_path / name) for name in ("site_a.csv", "site_b.csv")][: given.count(".csv")]
    assert list(study.prepare["csv"]) == expected
    options = prepare_options({**study.prepare, "out": str(tmp_path / "prepared"), "overwrite": False})
    assert options.csv == tuple(Path(p) for p in expected)
