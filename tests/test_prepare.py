"""`cmrfed prepare`: dataset layouts and quirks, preprocessing, shards, manifest, bad input.

Small NIfTI trees are written here in each dataset's layout (``data_manifests/layouts.toml``); the
synthetic cohort of ``cmrfed.data.synth`` drives the end-to-end tests.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from cmrfed.atomic import sha256_file
from cmrfed.cli import main
from cmrfed.data import model_input as mi
from cmrfed.data import preprocess as pp
from cmrfed.data.layouts import read_subject, scan_dataset
from cmrfed.data.nifti import from_sitk, read_nifti, to_sitk
from cmrfed.data.prepare import assign_splits, find_duplicates, split_counts
from cmrfed.data.shards import load_manifest, load_split, verify_shard
from cmrfed.data.tables import load_tables
from cmrfed.errors import DataError
from cmrfed.paths import manifest_path, shard_path

FAST = ["--spacing", "2,2,10", "--shape", "32,32,8"]
SPACING = (1.5, 1.5, 10.0)
GRID = (40, 40, 6)
FRAMES = 10
ES_FRAME = 4  # 0-based frame of end-systole in every phantom


# ----------------------------------------------------------------------------- tiny trees


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """A beating phantom: cine (x, y, z, t) and labels (1 LV, 2 MYO, 3 RV); LV largest at t=0."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    cx, cy = rng.uniform(15, 25, size=2)
    r0 = rng.uniform(6, 8)
    body = (((x - 20) / 19) ** 2 + ((y - 20) / 17) ** 2 < 1).astype(np.float32)
    cine = np.zeros((*GRID, FRAMES), np.float32)
    labels = np.zeros((*GRID, FRAMES), np.int16)
    for t in range(FRAMES):
        r = r0 * (1 - 0.4 * np.sin(np.pi * t / (2 * ES_FRAME)) ** 2 if t <= 2 * ES_FRAME else 1)
        d = np.hypot(x - cx, y - cy)
        lv, myo = d < r, (d >= r) & (d < r + 2.5)
        rv = (np.hypot(x - (cx - r - 5), y - cy) < 3.5) & ~lv & ~myo
        plane = 80 * body + 320 * lv + 40 * myo + 260 * rv
        for z in range(GRID[2]):
            cine[:, :, z, t] = plane * (0.8 + 0.04 * z) + rng.normal(0, 6, plane.shape)
            labels[:, :, z, t] = 1 * lv + 2 * myo + 3 * rv
    return cine, labels, (cx, cy)


def _save(path: Path, array: np.ndarray, spacing=SPACING, sform_quirk: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    image = nib.Nifti1Image(array, affine)
    if sform_quirk:  # ACDC: unscaled sform, real spacing in the qform / zooms
        image.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=1)
        image.set_qform(affine, code=1)
    nib.save(image, path)


def _acdc_labels(labels: np.ndarray) -> np.ndarray:
    """Phantom codes (1 LV, 3 RV) -> ACDC codes (3 LV, 1 RV)."""
    return np.choose(labels, [0, 3, 2, 1]).astype(np.int16)


def write_acdc(root: Path, groups=("NOR", "DCM", "HCM", "NOR"), seed0=100) -> Path:
    for n, group in enumerate(groups, start=1):
        code = f"patient{n:03d}"
        folder = root / "database" / "training" / code
        cine, labels, _ = _phantom(seed0 + n)
        ed, es = 1, ES_FRAME + 1  # 1-based
        _save(folder / f"{code}_4d.nii.gz", cine, sform_quirk=True)
        for frame in (ed, es):
            _save(folder / f"{code}_frame{frame:02d}.nii.gz", cine[..., frame - 1], sform_quirk=True)
            _save(folder / f"{code}_frame{frame:02d}_gt.nii.gz", _acdc_labels(labels[..., frame - 1]),
                  sform_quirk=True)
        (folder / "Info.cfg").write_text(
            f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 180.0\nNbFrame: {FRAMES}\nWeight: 80.0\n"
        )
    return root


MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_HEADER = ["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology",
               "Sex", "Height", "Weight"]
# code, vendor, pathology, labelled, CSV ED, CSV ES
MNMS_ROWS = [
    ("A1A1A1", "A", "NOR", True, 0, ES_FRAME),
    ("A2A2A2", "A", "DCM", True, 7, 2),  # wrong CSV indices: re-derived from the labels
    ("B1B1B1", "B", "HCM", True, 0, ES_FRAME),
    ("B2B2B2", "B", "NOR", True, 0, ES_FRAME),
    ("C1C1C1", "C", "HHD", False, 0, 0),  # unlabelled vendor C
    ("D1D1D1", "D", "NOR", True, 0, ES_FRAME),
]


def write_mnms(root: Path, rows=MNMS_ROWS, seed0=200) -> Path:
    base = root / "OpenDataset"
    base.mkdir(parents=True, exist_ok=True)
    with (base / MNMS_CSV).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MNMS_HEADER)
        for n, (code, vendor, pathology, labelled, ed, es) in enumerate(rows):
            cine, labels, _ = _phantom(seed0 + n)
            split = "Training/Labeled" if labelled else "Training/Unlabeled"
            folder = base / split / code
            _save(folder / f"{code}_sa.nii.gz", cine)
            gt = np.zeros_like(labels)
            if labelled:
                gt[..., 0], gt[..., ES_FRAME] = labels[..., 0], labels[..., ES_FRAME]
            _save(folder / f"{code}_sa_gt.nii.gz", gt)
            writer.writerow([n, code, "Siemens", vendor, 1, ed, es, 50, pathology, "M", "", 70])
    return root


MNMS2_ROWS = [(1, "NOR", "SIEMENS"), (2, "LV", "Philips Medical Systems"), (3, "HCM", "GE MEDICAL SYSTEMS"),
              (12, "NOR", "SIEMENS")]


def write_mnms2(root: Path, rows=MNMS2_ROWS, seed0=300, padding_rows=2000) -> Path:
    base = root / "MnM2"
    base.mkdir(parents=True, exist_ok=True)
    with (base / "dataset_information.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"])
        for code, disease, vendor in rows:
            writer.writerow([code, disease, vendor, "Avanto", 1.5])
        writer.writerows([["", "", "", "", ""]] * padding_rows)  # spreadsheet padding
    for code, _, _ in rows:
        name = f"{code:03d}"
        cine, labels, _ = _phantom(seed0 + code)
        folder = base / "dataset" / name
        _save(folder / f"{name}_SA_CINE.nii.gz", cine)
        for phase, t in (("ED", 0), ("ES", ES_FRAME)):
            _save(folder / f"{name}_SA_{phase}.nii.gz", cine[..., t])
            _save(folder / f"{name}_SA_{phase}_gt.nii.gz", labels[..., t])
    return root


def plant_duplicate(mnms_root: Path, mnms2_root: Path, mnms_code: str, mnms2_code: int) -> None:
    """Make an M&Ms-2 subject hold the same scan as an M&Ms-1 subject (other file encoding)."""
    folder = mnms_root / "OpenDataset" / "Training" / "Labeled" / mnms_code
    cine = read_nifti(folder / f"{mnms_code}_sa.nii.gz", ndim=4).array
    labels = read_nifti(folder / f"{mnms_code}_sa_gt.nii.gz", ndim=4, labels=True).array
    name = f"{mnms2_code:03d}"
    folder = mnms2_root / "MnM2" / "dataset" / name
    _save(folder / f"{name}_SA_CINE.nii.gz", (cine * 2.0).astype(np.float64))
    for phase, t in (("ED", 0), ("ES", ES_FRAME)):
        _save(folder / f"{name}_SA_{phase}.nii.gz", (cine[..., t] * 2.0).astype(np.float64))
        _save(folder / f"{name}_SA_{phase}_gt.nii.gz", labels[..., t])


@pytest.fixture(scope="session")
def prep_trees(tmp_path_factory) -> Path:
    """ACDC + M&Ms-1 + M&Ms-2 trees as downloaded, with one M&Ms-1 scan repeated in M&Ms-2."""
    root = tmp_path_factory.mktemp("trees")
    write_acdc(root / "acdc")
    write_mnms(root / "mnms")
    write_mnms2(root / "mnms2")
    plant_duplicate(root / "mnms", root / "mnms2", "A1A1A1", 12)
    return root


def _inputs(trees: Path) -> list[str]:
    return ["--acdc", str(trees / "acdc"), "--mnms", str(trees / "mnms"), "--mnms2", str(trees / "mnms2")]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the real console entry point; returns (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["cmrfed", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


@pytest.fixture(scope="session")
def prep_prepared(prep_trees, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["cmrfed", "prepare", *_inputs(prep_trees), "--out", str(out), *FAST])
        main()
    finally:
        mp.undo()
    return out


def _shard_subject(prepared: Path, client: str, subject_id: str) -> tuple[np.ndarray, dict]:
    with h5py.File(shard_path(prepared, client), "r") as shard:
        group = shard["subjects"][subject_id]
        return group["image"][()], dict(group.attrs)


# ----------------------------------------------------------------------------- end to end, small trees


def test_prepare_writes_shards_and_manifest(prep_prepared):
    manifest = json.loads(manifest_path(prep_prepared).read_text())
    ids = [s["subject_id"] for s in manifest["subjects"]]
    assert len(ids) == 4 + 6 + 4 and ids == sorted(ids)
    assert {"acdc_patient001", "mnms_A1A1A1", "mnms2_001", "mnms2_012"} <= set(ids)
    assert manifest["clients"] == ["siemens", "philips", "ge", "canon"]
    assert manifest["options"]["shape"] == [32, 32, 8] and manifest["options"]["seed"] == 0
    assert manifest["versions"]["cmrfed"]
    total = 0
    for client in manifest["clients"]:
        path = shard_path(prep_prepared, client)
        assert sha256_file(path) == manifest["shards"][client]["sha256"]
        with h5py.File(path, "r") as shard:
            assert shard.attrs["client"] == client and shard.attrs["format_version"] == 2
            assert list(shard.attrs["shape"]) == [32, 32, 8]
            for subject_id, group in shard["subjects"].items():
                entry = next(s for s in manifest["subjects"] if s["subject_id"] == subject_id)
                image = group["image"][()]
                # uint8 as CineMA stores it: in-plane cropped to 32 x 32 (the 40 x 40 grid at 1.5 mm
                # is 30 x 30 at 2 mm, kept whole), every one of the 6 slices kept
                assert image.shape == (2, 30, 30, 6) and image.dtype == np.uint8
                # floor(255 x) of a float32 [0, 1] rescale: the top voxel may land at 254
                assert image[0].min() == 0 and image[0].max() >= 254 and image[1].max() >= 254
                assert list(group.attrs["crop_start"]) == [0, 0] and group.attrs["n_slices"] == 6
                assert group.attrs["label"] == entry["label"] and group.attrs["split"] == entry["split"]
                assert entry["client"] == client
                assert len(group.attrs["source_sha256"]) == len(group.attrs["source_files"]) >= 2
                total += 1
    assert total == len(ids)
    counted = sum(n for per_split in manifest["counts"].values() for per in per_split.values()
                  for n in per.values())
    assert counted == total
    labels = {s["subject_id"]: s["label"] for s in manifest["subjects"]}
    assert labels["acdc_patient001"] == 0 and labels["acdc_patient002"] == 1 and labels["mnms2_002"] == 1


def test_acdc_one_based_frames_and_sform_quirk(prep_prepared, prep_trees):
    _, attrs = _shard_subject(prep_prepared, "siemens", "acdc_patient002")
    assert (attrs["ed_frame"], attrs["es_frame"]) == (0, ES_FRAME)
    assert list(attrs["original_spacing"]) == pytest.approx(SPACING)  # not the unscaled sform's 1, 1, 1
    assert list(attrs["original_shape"]) == list(GRID)
    assert attrs["source"] == "database/training/patient002"
    assert "database/training/patient002/patient002_frame05.nii.gz" in list(attrs["source_files"])
    tables = load_tables()
    subject = scan_dataset("acdc", prep_trees / "acdc", tables).subjects[1]
    frames = read_subject(subject)
    cine = read_nifti(prep_trees / "acdc/database/training/patient002/patient002_4d.nii.gz", ndim=4).array
    np.testing.assert_array_equal(frames.es, cine[..., ES_FRAME])  # ES: 5 (1-based) is frame 4
    stored, _ = _shard_subject(prep_prepared, "siemens", "acdc_patient002")
    expected = pp.preprocess(frames, subject.lv_label, (2.0, 2.0, 10.0), (32, 32, 8)).image
    np.testing.assert_array_equal(stored, expected)  # the shard holds exactly the preprocessed image


def test_mnms_frames_rederived_from_labels(prep_prepared):
    manifest = json.loads(manifest_path(prep_prepared).read_text())
    _, attrs = _shard_subject(prep_prepared, "siemens", "mnms_A2A2A2")
    assert (attrs["ed_frame"], attrs["es_frame"]) == (0, ES_FRAME)  # CSV said 7 / 2
    assert any("mnms_A2A2A2" in w and "7/2" in w for w in manifest["warnings"])
    _, good = _shard_subject(prep_prepared, "canon", "mnms_D1D1D1")
    assert (good["ed_frame"], good["es_frame"]) == (0, ES_FRAME) and good["centre_from"] == "labels"


def test_unlabelled_vendor_c_uses_label_free_centre(prep_prepared):
    manifest = json.loads(manifest_path(prep_prepared).read_text())
    _, attrs = _shard_subject(prep_prepared, "ge", "mnms_C1C1C1")
    assert attrs["centre_from"] == "label-free"
    assert attrs["es_frame"] != attrs["ed_frame"]  # ED = ES = 0 in the CSV: ES estimated from motion
    assert any("mnms_C1C1C1" in w and "label-free" in w for w in manifest["warnings"])


def test_mnms2_unpadded_codes_and_padded_csv(prep_prepared):
    manifest = json.loads(manifest_path(prep_prepared).read_text())
    mnms2 = {s["subject_id"]: s for s in manifest["subjects"] if s["dataset"] == "mnms2"}
    assert sorted(mnms2) == ["mnms2_001", "mnms2_002", "mnms2_003", "mnms2_012"]  # 2000 empty rows dropped
    assert mnms2["mnms2_002"]["client"] == "philips" and mnms2["mnms2_003"]["client"] == "ge"
    assert mnms2["mnms2_002"]["pathology"] == "LV"
    assert mnms2["mnms2_002"]["vendor"] == "Philips Medical Systems"


def test_duplicate_scan_found_and_kept_in_one_split(prep_prepared):
    manifest = json.loads(manifest_path(prep_prepared).read_text())
    assert [d["subjects"] for d in manifest["duplicates"]] == [["mnms2_012", "mnms_A1A1A1"]]
    by_id = {s["subject_id"]: s for s in manifest["subjects"]}
    assert by_id["mnms2_012"]["split"] == by_id["mnms_A1A1A1"]["split"] == manifest["duplicates"][0]["split"]
    assert by_id["mnms2_012"]["client"] == by_id["mnms_A1A1A1"]["client"]


def test_reader_api(prep_prepared, tmp_path):
    manifest = load_manifest(prep_prepared)
    assert manifest.shape == (32, 32, 8) and manifest.spacing == (2.0, 2.0, 10.0)
    assert manifest.sha256 == sha256_file(manifest_path(prep_prepared))
    assert verify_shard(prep_prepared, manifest, "siemens") == shard_path(prep_prepared, "siemens")
    seen = []
    for split in ("train", "val", "test"):
        arrays = load_split(prep_prepared, "siemens", split)
        expected = sorted(s.subject_id for s in manifest.subjects
                          if s.client == "siemens" and s.split == split)
        assert arrays.subject_ids == tuple(expected)
        assert arrays.images.shape == (len(expected), 2, 32, 32, 8) and arrays.images.dtype == np.float32
        assert arrays.images.min() == 0.0 and all(row.max() == 1.0 for row in arrays.images)
        assert not arrays.images[:, :, 30:].any() and not arrays.images[..., 6:].any()  # padded at the end
        assert arrays.single_window and arrays.window_subject.tolist() == list(range(len(expected)))
        assert arrays.labels.dtype == np.int64
        label_of = {s.subject_id: s.label for s in manifest.subjects}
        assert arrays.labels.tolist() == [label_of[i] for i in expected]
        seen += expected
    assert len(seen) == sum(1 for s in manifest.subjects if s.client == "siemens")

    copy = tmp_path / "copy"
    shutil.copytree(prep_prepared, copy)
    with h5py.File(shard_path(copy, "siemens"), "a") as shard:
        shard.attrs["tampered"] = 1
    with pytest.raises(DataError, match="sha256 differs"):
        verify_shard(copy, load_manifest(copy), "siemens")
    with pytest.raises(DataError, match=r"no manifest\.json; run `cmrfed prepare` first"):
        load_manifest(tmp_path / "nothing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(DataError, match="not a cmrfed"):
        load_manifest(tmp_path / "foreign")


def test_same_seed_identical_and_workers_do_not_matter(prep_trees, prep_prepared, tmp_path, monkeypatch,
                                                       capsys):
    out = tmp_path / "w2"
    code, _ = run_cli(monkeypatch, capsys, "prepare", *_inputs(prep_trees), "--out", str(out), *FAST,
                      "--workers", "2")
    assert code == 0
    first = json.loads(manifest_path(prep_prepared).read_text())
    second = json.loads(manifest_path(out).read_text())
    assert second["shards"] == first["shards"]  # same bytes, whatever the worker count
    assert second["subjects"] == first["subjects"]
    other = tmp_path / "seed1"
    code, _ = run_cli(monkeypatch, capsys, "prepare", *_inputs(prep_trees), "--out", str(other), *FAST,
                      "--seed", "1")
    third = json.loads(manifest_path(other).read_text())
    assert code == 0 and [s["split"] for s in third["subjects"]] != [s["split"] for s in first["subjects"]]


def test_existing_out_refused_without_overwrite(prep_trees, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["prepare", "--acdc", str(prep_trees / "acdc"), "--out", str(out), *FAST]
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "already exists" in text and "--overwrite" in text
    assert (out / "keep.txt").read_text() == "mine" and not manifest_path(out).exists()
    # --overwrite replaces only a PREPARED folder, never a folder of other files
    code, text = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 2 and "not a PREPARED folder" in text and "keep.txt" in text
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    code, _ = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and manifest_path(out).is_file()


def test_summary_table_and_subset_of_inputs(prep_trees, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--mnms2", str(prep_trees / "mnms2" / "MnM2"),
                         "--out", str(out), *FAST, "--split", "0.5,0.5,0")
    assert code == 0 and "Prepared subjects per client" in text and "philips" in text
    manifest = load_manifest(out)
    assert manifest.clients == ("siemens", "philips", "ge")
    assert {s.split for s in manifest.subjects} <= {"train", "val"}


# ----------------------------------------------------------------------------- synthetic cohort


SYNTH_FAST = ["--spacing", "2,2,10", "--shape", "64,64,8"]


@pytest.fixture(scope="session")
def prep_synth(tmp_path_factory):
    """A small synthetic cohort (10 subjects per dataset, one unlabelled vendor-C subject)."""
    from cmrfed.data.synth import write_synthetic_cohort

    return write_synthetic_cohort(tmp_path_factory.mktemp("synth") / "cohort", seed=0, subjects=10,
                                  shape=(64, 64, 8))


def _synth_inputs(root: Path) -> list[str]:
    return ["--acdc", str(root / "acdc"), "--mnms", str(root / "mnms"), "--mnms2", str(root / "mnms2")]


@pytest.fixture(scope="session")
def prep_synth_prepared(prep_synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_prepared") / "out"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["cmrfed", "prepare", *_synth_inputs(prep_synth.out), "--out", str(out),
                                 *SYNTH_FAST])
        main()
    finally:
        mp.undo()
    return out


def _synth_id(subject) -> str:
    return f"{subject.dataset}_{subject.subject_id}"


def test_synth_end_to_end_counts_labels_shapes(prep_synth, prep_synth_prepared):
    manifest = load_manifest(prep_synth_prepared)
    expected = {_synth_id(s): s for s in prep_synth.subjects}
    assert {s.subject_id for s in manifest.subjects} == set(expected) and not manifest.raw["skipped"]
    for entry in manifest.subjects:
        truth = expected[entry.subject_id]
        assert (entry.client, entry.label, entry.pathology) == (truth.client, truth.label, truth.pathology)
    for client in manifest.clients:
        verify_shard(prep_synth_prepared, manifest, client)
        with h5py.File(shard_path(prep_synth_prepared, client), "r") as shard:
            groups = shard["subjects"]
            assert sorted(groups) == sorted(s.subject_id for s in manifest.subjects if s.client == client)
            for split in ("train", "val", "test"):
                per_label = manifest.raw["counts"][client][split]
                for label in (0, 1):
                    in_shard = [g for g in groups.values()
                                if g.attrs["split"] == split and g.attrs["label"] == label]
                    assert len(in_shard) == per_label[str(label)]
            for group in groups.values():
                image = group["image"][()]
                assert image.dtype == np.uint8 and image.shape[:3] == (2, 64, 64)
                assert image.shape[3] == group.attrs["n_slices"] >= 3  # no crop in z
                assert image[0].min() == 0 and image[0].max() >= 254
                assert not np.array_equal(image[0], image[1])  # ED and ES differ
    # every client trains on both labels: the split is stratified
    for client in manifest.clients:
        train = manifest.raw["counts"][client]["train"]
        assert train["0"] > 0 and train["1"] > 0


def test_synth_planted_duplicate_kept_in_one_split(prep_synth, prep_synth_prepared):
    manifest = load_manifest(prep_synth_prepared)
    pair = prep_synth.duplicate
    found = [d["subjects"] for d in manifest.raw["duplicates"]]
    assert found == [sorted([f"mnms_{pair.mnms}", f"mnms2_{pair.mnms2}"])]
    by_id = {s.subject_id: s for s in manifest.subjects}
    first, second = by_id[f"mnms_{pair.mnms}"], by_id[f"mnms2_{pair.mnms2}"]
    assert first.split == second.split and first.client == second.client == pair.client


def test_synth_acdc_frames_and_sform_quirk(prep_synth, prep_synth_prepared):
    quirky = [s for s in prep_synth.subjects if "unscaled_sform" in s.quirks]
    assert quirky
    for subject in quirky:
        folder = prep_synth.out / subject.path
        info = dict(line.split(": ") for line in (folder / "Info.cfg").read_text().splitlines())
        frame = folder / f"{subject.subject_id}_frame{int(info['ED']):02d}.nii.gz"
        header = nib.load(frame)
        assert np.allclose(np.abs(np.diag(header.affine)[:3]), 1.0)  # the unscaled sform
        _, attrs = _shard_subject(prep_synth_prepared, "siemens", _synth_id(subject))
        assert list(attrs["original_spacing"]) == pytest.approx(header.header.get_zooms()[:3], rel=1e-6)
        assert attrs["original_spacing"][0] > 1.2  # real in-plane spacing, not the sform's 1 mm
        assert (attrs["ed_frame"], attrs["es_frame"]) == (int(info["ED"]) - 1, int(info["ES"]) - 1)


def test_synth_mnms_wrong_csv_indices_rederived(prep_synth, tmp_path, monkeypatch, capsys):
    shutil.copytree(prep_synth.out / "mnms", tmp_path / "mnms")
    table = next((tmp_path / "mnms" / "OpenDataset").glob("*.csv"))
    rows = list(csv.reader(table.open()))
    victim = next(r for r in rows[1:] if r[5] != r[6])  # a labelled subject: ED != ES
    truth = (int(victim[5]), int(victim[6]))
    victim[5], victim[6] = victim[6], victim[5]
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--mnms", str(tmp_path / "mnms"), "--out", str(out),
                         *SYNTH_FAST)
    assert code == 0, text
    manifest = load_manifest(out)
    client = next(s.client for s in manifest.subjects if s.subject_id == f"mnms_{victim[1]}")
    _, attrs = _shard_subject(out, client, f"mnms_{victim[1]}")
    assert (attrs["ed_frame"], attrs["es_frame"]) == truth
    assert any(f"mnms_{victim[1]}" in w and "used the labels" in w for w in manifest.raw["warnings"])


def test_synth_unlabelled_vendor_c_label_free_centre(prep_synth, prep_synth_prepared):
    unlabelled = [s for s in prep_synth.subjects if not s.labelled]
    assert unlabelled and all(s.vendor == "C" for s in unlabelled)
    warnings = load_manifest(prep_synth_prepared).raw["warnings"]
    for subject in unlabelled:
        _, attrs = _shard_subject(prep_synth_prepared, "ge", _synth_id(subject))
        assert attrs["centre_from"] == "label-free" and attrs["es_frame"] != attrs["ed_frame"]
        assert any(_synth_id(subject) in w and "label-free" in w for w in warnings)
    # on labelled subjects the label-free centre lands on the heart (within 3 cm of the LV centre)
    tables = load_tables()
    for subject in scan_dataset("mnms", prep_synth.out / "mnms", tables).subjects[:4]:
        frames = read_subject(subject)
        if frames.ed_labels is None:
            continue
        from_labels = np.array(pp.lv_centre(frames.ed_labels, subject.lv_label)) * frames.spacing
        cine = read_nifti(subject.cine, ndim=4).array
        label_free = np.array(pp.motion_centre(cine, frames.spacing, frames.spacing)) * frames.spacing
        assert np.linalg.norm((label_free - from_labels)[:2]) < 30.0


def test_synth_mnms2_codes_and_padded_csv(prep_synth, prep_synth_prepared):
    table = prep_synth.out / "mnms2" / "MnM2" / "dataset_information.csv"
    lines = table.read_text().splitlines()
    assert len(lines) > 1000 and "," in lines[-1] and not lines[-1].strip(",")  # spreadsheet padding
    codes = sorted(s.subject_id for s in prep_synth.subjects if s.dataset == "mnms2")
    manifest = load_manifest(prep_synth_prepared)
    found = sorted(s.subject_id for s in manifest.subjects if s.dataset == "mnms2")
    assert found == [f"mnms2_{c}" for c in codes]
    assert all(len(c) == 3 for c in codes) and any(c.startswith("0") for c in codes)


def test_synth_workers_give_identical_shards(prep_synth, prep_synth_prepared, tmp_path, monkeypatch, capsys):
    out = tmp_path / "w2"
    code, _ = run_cli(monkeypatch, capsys, "prepare", *_synth_inputs(prep_synth.out), "--out", str(out),
                      *SYNTH_FAST, "--workers", "2")
    assert code == 0
    assert load_manifest(out).shard_sha256 == load_manifest(prep_synth_prepared).shard_sha256


# ----------------------------------------------------------------------------- bad input


def _copy_trees(trees: Path, tmp_path: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(trees / name, tmp_path / name)
    return tmp_path


def assert_prepare_fails(monkeypatch, capsys, tmp_path, args: list[str], *needles: str) -> str:
    out = tmp_path / "prepared"
    code, text = run_cli(monkeypatch, capsys, "prepare", *args, "--out", str(out), *FAST)
    assert code == 1, text
    for needle in needles:
        assert needle in text, text
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))
    return text


def test_missing_input_folder(tmp_path, monkeypatch, capsys):
    # a path option naming nothing is a usage error (exit 2), checked before anything is written
    out = tmp_path / "prepared"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--acdc", str(tmp_path / "nowhere"), "--out",
                         str(out), *FAST)
    assert code == 2 and str(tmp_path / "nowhere") in text and "no such file or folder" in text, text
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_input_of_wrong_dataset(prep_trees, tmp_path, monkeypatch, capsys):
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--acdc", str(prep_trees / "mnms")],
                    str(prep_trees / "mnms"), "does not hold the ACDC dataset")


def test_no_metadata_csv(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms")
    (root / "mnms" / "OpenDataset" / MNMS_CSV).unlink()
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--mnms", str(root / "mnms")], "OpenDataset",
                    "no metadata CSV")


def test_csv_missing_a_column(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms2")
    table = root / "mnms2" / "MnM2" / "dataset_information.csv"
    table.write_text(table.read_text().replace("VENDOR", "MAKER", 1))
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--mnms2", str(root / "mnms2")],
                    str(table), "missing column(s) 'VENDOR'")


def test_vendor_not_in_table(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms2")
    table = root / "mnms2" / "MnM2" / "dataset_information.csv"
    table.write_text(table.read_text().replace("GE MEDICAL SYSTEMS", "TOSHIBA", 1))
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--mnms2", str(root / "mnms2")],
                    "subject 003", "vendor 'TOSHIBA' is not in the mnms2 vendor table")
    # the fix the message names: an extended table passed with --tables
    tables = tmp_path / "tables"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data_manifests", tables)
    vendors = tables / "vendors.toml"
    vendors.write_text(vendors.read_text().replace('"GE MEDICAL SYSTEMS" = "ge"',
                                                   '"GE MEDICAL SYSTEMS" = "ge"\n"TOSHIBA" = "canon"'))
    out = tmp_path / "with-tables"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--mnms2", str(root / "mnms2"), "--out", str(out),
                         *FAST, "--tables", str(tables))
    assert code == 0, text
    assert {s.subject_id: s.client for s in load_manifest(out).subjects}["mnms2_003"] == "canon"


@pytest.mark.parametrize("damage", ["unreadable", "truncated", "not-gzip"])
def test_bad_nifti_file(prep_trees, tmp_path, monkeypatch, capsys, damage):
    root = _copy_trees(prep_trees, tmp_path, "acdc")
    target = root / "acdc/database/training/patient003/patient003_frame01.nii.gz"
    data = target.read_bytes()
    if damage == "unreadable":
        target.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
        needle = "not a readable NIfTI"
    elif damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
        needle = "truncated"
    else:
        target.write_bytes(gzip.decompress(data))
        needle = "not gzip-compressed"
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--acdc", str(root / "acdc")], str(target), needle)


def test_ed_es_out_of_range(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "acdc")
    info = root / "acdc/database/training/patient002/Info.cfg"
    info.write_text(info.read_text().replace("ES: 5", "ES: 31"))
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--acdc", str(root / "acdc")], str(info),
                    "ES frame 31 is out of range 1..10")


def test_mnms_csv_index_out_of_range(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms")
    table = root / "mnms" / "OpenDataset" / MNMS_CSV
    rows = list(csv.reader(table.open()))
    unlabelled = next(r for r in rows if r[1] == "C1C1C1")
    unlabelled[5] = "40"  # no labels to re-derive from: the CSV index is used, and is wrong
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--mnms", str(root / "mnms")], str(table),
                    "mnms_C1C1C1 ED index 40 is out of range 0..9")


def test_two_d_where_three_d_expected(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms2")
    target = root / "mnms2/MnM2/dataset/002/002_SA_ES.nii.gz"
    _save(target, read_nifti(target, ndim=3).array[:, :, 0])
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--mnms2", str(root / "mnms2")], str(target),
                         "is 2-D")


def test_nan_voxels(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms")
    target = root / "mnms/OpenDataset/Training/Labeled/B1B1B1/B1B1B1_sa.nii.gz"
    cine = read_nifti(target, ndim=4).array
    cine[3, 3, 1, 2] = np.nan
    _save(target, cine)
    assert_prepare_fails(monkeypatch, capsys, tmp_path, ["--mnms", str(root / "mnms")], str(target),
                    "NaN or infinite")


def test_empty_label_file_is_a_warning(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "mnms2")
    target = root / "mnms2/MnM2/dataset/001/001_SA_ED_gt.nii.gz"
    target.write_bytes(b"")
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prepare", "--mnms2", str(root / "mnms2"), "--out", str(out),
                         *FAST)
    assert code == 0, text
    manifest = json.loads(manifest_path(out).read_text())
    assert any(str(target) in w and "label-free" in w for w in manifest["warnings"])
    _, attrs = _shard_subject(out, "siemens", "mnms2_001")
    assert attrs["centre_from"] == "label-free"


def test_skip_invalid_lists_the_reason(prep_trees, tmp_path, monkeypatch, capsys):
    root = _copy_trees(prep_trees, tmp_path, "acdc", "mnms2")
    bad = root / "acdc/database/training/patient001/patient001_frame05.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    table = root / "mnms2" / "MnM2" / "dataset_information.csv"
    table.write_text(table.read_text().replace("GE MEDICAL SYSTEMS", "TOSHIBA", 1))
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prepare", *_inputs(root)[:2], *_inputs(root)[4:],
                         "--out", str(out), *FAST, "--skip-invalid")
    assert code == 0, text
    skipped = {s["subject_id"]: s["reason"] for s in load_manifest(out).raw["skipped"]}
    assert set(skipped) == {"acdc_patient001", "mnms2_003"}
    assert str(bad) in skipped["acdc_patient001"] and "TOSHIBA" in skipped["mnms2_003"]
    assert "skipped acdc_patient001" in text and "skipped mnms2_003" in text
    assert "acdc_patient001" not in {s.subject_id for s in load_manifest(out).subjects}


@pytest.mark.e2e  # starts a subprocess
def test_console_entry_point_exit_code(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "cmrfed.cli", "prepare", "--mnms", str(tmp_path / "x"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- units


def test_sitk_round_trip_keeps_itk_index_order():
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    image = to_sitk(array, (1.0, 2.0, 3.0))
    assert image.GetSize() == (3, 4, 5) and image.GetSpacing() == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(from_sitk(image), array)


def test_resample_and_crop_centre_on_lv():
    labels = np.zeros((60, 50, 4), np.int16)
    labels[40:50, 10:20, :] = 1
    resampled = pp.resample(labels, (1.0, 1.0, 10.0), (2.0, 2.0, 10.0), labels=True)
    assert resampled.shape == (30, 25, 4) and set(np.unique(resampled)) == {0, 1}
    assert resampled.dtype == np.int16
    centre = pp.lv_centre(resampled, 1)
    assert centre == pytest.approx((22.0, 7.0, 1.5), abs=0.6)
    starts = tuple(pp.crop_start(c, n, 16) for c, n in zip(centre[:2], resampled.shape[:2], strict=False))
    cropped = pp.crop_in_plane(resampled, starts, (16, 16, 8))
    assert cropped.shape == (16, 16, 4) and cropped.sum() == resampled.sum()  # z never cropped
    padded = mi.model_input(np.stack([cropped, cropped]).astype(np.uint8), (16, 16, 8))
    assert padded.shape == (1, 2, 16, 16, 8) and not padded[..., 4:].any()


def test_normalise_range_and_clipping():
    volume = np.random.default_rng(0).normal(100, 20, (20, 20, 5)).astype(np.float32)
    volume[0, 0, 0] = 1e6  # an outlier clipped at the 99.5th percentile
    out = pp.normalise_uint8(volume)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() >= 254
    assert np.mean(out) > 0.3 * 255  # without clipping the outlier would squash everything near 0
    # intensity-affine invariant up to the last float bit: at most 1 / 255 apart
    assert np.abs(pp.normalise_uint8(volume * 3 + 7).astype(int) - out).max() <= 1


def test_label_free_centre_finds_the_beating_heart():
    cine, _, (cx, cy) = _phantom(7)
    centre = pp.motion_centre(cine, SPACING, (1.5, 1.5, 10.0))
    assert abs(centre[0] - cx) < 4 and abs(centre[1] - cy) < 4


def test_split_counts_and_stratified_seeded_split():
    assert split_counts(10, (0.6, 0.2, 0.2)) == (6, 2, 2)
    assert split_counts(1, (0.6, 0.2, 0.2)) == (1, 0, 0)
    assert sum(split_counts(7, (0.6, 0.2, 0.2))) == 7
    units = {"a": [((f"s{i:02d}",), i % 2) for i in range(20)] + [(("d1", "d2"), 1)]}
    first = assign_splits(units, (0.6, 0.2, 0.2), seed=3)
    assert first == assign_splits(units, (0.6, 0.2, 0.2), seed=3)
    assert first != assign_splits(units, (0.6, 0.2, 0.2), seed=4)
    assert first["d1"] == first["d2"]
    normal = [first[f"s{i:02d}"] for i in range(0, 20, 2)]
    assert normal.count("train") == 6 and normal.count("val") == 2 and normal.count("test") == 2


def test_find_duplicates_groups_near_identical_prints():
    rng = np.random.default_rng(0)
    prints = rng.normal(size=(4, 64))
    prints[3] = prints[1] + 1e-4 * rng.normal(size=64)
    prints /= np.linalg.norm(prints, axis=1, keepdims=True)
    assert find_duplicates(["a", "b", "c", "d"], prints) == [("b", "d")]
