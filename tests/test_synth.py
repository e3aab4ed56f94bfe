"""The synthetic cohort: exact download layouts, header quirks, anatomy, vendors, determinism, CLI.

Everything is measured from the written files with nibabel and csv, never from the generator's
internals, so the tests say what a reader of the trees will find.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cmrfed import cli as cli_module
from cmrfed.cli import cli
from cmrfed.data import synth
from cmrfed.data.synth import SynthSummary, read_synth_summary, write_synthetic_cohort
from cmrfed.data.tables import load_tables
from cmrfed.errors import UsageError

SMALL = {"subjects": 5, "shape": (48, 48, 4), "frames": 8}
LV = {"acdc": 3, "mnms": 1, "mnms2": 1}
MYO = 2
RV = {"acdc": 1, "mnms": 3, "mnms2": 3}


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    """The default cohort (seed 0, 24 subjects per dataset), written once."""
    return write_synthetic_cohort(tmp_path_factory.mktemp("synth") / "cohort")


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _mnms_rows(root: Path) -> list[dict[str, str]]:
    (csv_path,) = (root / "mnms" / "OpenDataset").glob("*M&Ms*Dataset*information*.csv")
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _ed_es_labels(root: Path, subject: synth.SynthSubject) -> tuple[np.ndarray, np.ndarray, float]:
    """ED and ES label volumes and the voxel volume (mL) as a reader finds them."""
    folder, sid = root / subject.path, subject.subject_id
    if subject.dataset == "acdc":
        info = dict(line.split(": ") for line in (folder / "Info.cfg").read_text().splitlines())
        ed_path = folder / f"{sid}_frame{int(info['ED']):02d}_gt.nii.gz"
        es_path = folder / f"{sid}_frame{int(info['ES']):02d}_gt.nii.gz"
        ed, es, header = _data(ed_path), _data(es_path), nib.load(ed_path).header
    elif subject.dataset == "mnms":
        row = next(r for r in _mnms_rows(root) if r["External code"] == sid)
        image = nib.load(folder / f"{sid}_sa_gt.nii.gz")
        labels = np.asarray(image.dataobj)
        ed, es, header = labels[..., int(row["ED"])], labels[..., int(row["ES"])], image.header
    else:
        ed_path = folder / f"{sid}_SA_ED_gt.nii.gz"
        ed, es = _data(ed_path), _data(folder / f"{sid}_SA_ES_gt.nii.gz")
        header = nib.load(ed_path).header
    return ed, es, float(np.prod(header.get_zooms()[:3])) / 1000.0


def _measures(root: Path, subject: synth.SynthSubject) -> dict[str, float]:
    ed, es, voxel_ml = _ed_es_labels(root, subject)
    lv = LV[subject.dataset]
    edv, esv = (ed == lv).sum() * voxel_ml, (es == lv).sum() * voxel_ml
    # mean wall thickness on the slice with the largest cavity: outer minus inner radius
    z = int(np.argmax((ed == lv).sum(axis=(0, 1))))
    cavity, myo = (ed[..., z] == lv).sum(), (ed[..., z] == MYO).sum()
    in_plane = float(nib.load(next((root / subject.path).glob("*gt.nii.gz"))).header.get_zooms()[0])
    wall = (np.sqrt((cavity + myo) / np.pi) - np.sqrt(cavity / np.pi)) * in_plane
    return {"edv": edv, "esv": esv, "ef": 1 - esv / edv, "wall": wall,
            "rv_edv": (ed == RV[subject.dataset]).sum() * voxel_ml}


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- layouts -----------------------------------------------------------------------------------


def test_acdc_tree_has_the_download_names(cohort: SynthSummary) -> None:
    root = cohort.out / "acdc" / "database"
    assert sorted(p.name for p in root.iterdir()) == ["testing", "training"]
    acdc = [s for s in cohort.subjects if s.dataset == "acdc"]
    assert len(acdc) == 24
    for subject in acdc:
        folder = cohort.out / subject.path
        assert folder.parent.name == subject.split and re.fullmatch(r"patient\d{3}", folder.name)
        number = int(folder.name[-3:])
        assert (1 <= number <= 100) if subject.split == "training" else (101 <= number <= 150)
        lines = (folder / "Info.cfg").read_text().splitlines()
        info = dict(line.split(": ") for line in lines)
        assert list(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
        assert info["Group"] == subject.pathology
        ed, es, frames = int(info["ED"]), int(info["ES"]), int(info["NbFrame"])
        assert 1 <= ed < es <= frames  # 1-based frame numbers
        pid = folder.name
        expected = {"Info.cfg", f"{pid}_4d.nii.gz"} | {
            f"{pid}_frame{n:02d}{suffix}.nii.gz" for n in (ed, es) for suffix in ("", "_gt")}
        assert {p.name for p in folder.iterdir()} == expected
        cine = nib.load(folder / f"{pid}_4d.nii.gz")
        assert cine.ndim == 4 and cine.shape[3] == frames and cine.get_data_dtype() == np.int16
        frame = _data(folder / f"{pid}_frame{es:02d}.nii.gz")
        np.testing.assert_array_equal(frame, np.asarray(cine.dataobj)[..., es - 1])
        labels = nib.load(folder / f"{pid}_frame{ed:02d}_gt.nii.gz")
        assert labels.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(labels.dataobj))) == {0, 1, 2, 3}
    splits = Counter(s.split for s in acdc)
    assert splits["training"] > splits["testing"] > 0


def test_mnms_tree_csv_and_labels_only_at_ed_es(cohort: SynthSummary) -> None:
    root = cohort.out / "mnms" / "OpenDataset"
    (csv_path,) = root.glob("*M&Ms*Dataset*information*.csv")
    assert re.fullmatch(r"\d{6}_M&Ms_Dataset_information_diagnosis_opendataset\.csv", csv_path.name)
    header = csv_path.read_text().splitlines()[0]
    assert header == ",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"
    rows = _mnms_rows(cohort.out)
    assert [int(r[""]) for r in rows] == list(range(len(rows)))  # the unnamed index column
    assert any(r["Height"] == "" for r in rows) and any(r["Height"] != "" for r in rows)
    centres = {"A": {"1"}, "B": {"2", "3"}, "C": {"4"}, "D": {"5"}}
    names = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
    by_code = {r["External code"]: r for r in rows}
    mnms = [s for s in cohort.subjects if s.dataset == "mnms"]
    assert set(by_code) == {s.subject_id for s in mnms}
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["Testing", "Training", "Validation"]
    unlabelled = 0
    for subject in mnms:
        row = by_code[subject.subject_id]
        assert re.fullmatch(r"[A-Z0-9]{6}", subject.subject_id)
        assert row["Centre"] in centres[row["Vendor"]] and row["VendorName"] == names[row["Vendor"]]
        assert row["Pathology"] == subject.pathology and row["Vendor"] == subject.vendor
        folder = cohort.out / subject.path
        assert folder.parent.relative_to(root).as_posix() == subject.split
        assert {p.name for p in folder.iterdir()} == {f"{subject.subject_id}_sa.nii.gz",
                                                      f"{subject.subject_id}_sa_gt.nii.gz"}
        image = nib.load(folder / f"{subject.subject_id}_sa.nii.gz")
        labels = _data(folder / f"{subject.subject_id}_sa_gt.nii.gz")
        assert image.ndim == 4 and labels.shape == image.shape and labels.dtype == np.uint8
        labelled_frames = {t for t in range(labels.shape[3]) if labels[..., t].any()}
        if subject.split == "Training/Unlabeled":
            unlabelled += 1
            assert subject.vendor == "C" and not subject.labelled
            assert labelled_frames == set() and row["ED"] == row["ES"] == "0"
        else:
            ed, es = int(row["ED"]), int(row["ES"])  # 0-based
            assert labelled_frames == {ed, es} and ed != es
            # the larger LV is ED: what a reader re-deriving ED/ES from the labels relies on
            assert (labels[..., ed] == 1).sum() > (labels[..., es] == 1).sum()
    assert unlabelled >= 1
    assert any(int(by_code[s.subject_id]["ED"]) > 0 for s in mnms if s.labelled)


def test_mnms2_tree_padded_csv_and_long_axis(cohort: SynthSummary) -> None:
    root = cohort.out / "mnms2" / "MnM2"
    lines = (root / "dataset_information.csv").read_text().splitlines()
    assert lines[0] == "SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD"
    filled = [line for line in lines[1:] if line.strip(",")]
    assert lines[1 + len(filled):] == [",,,,"] * (len(lines) - 1 - len(filled))
    assert len(lines) - 1 - len(filled) >= 1000  # the spreadsheet padding
    rows = list(csv.DictReader(filled and [lines[0], *filled]))
    codes = [r["SUBJECT_CODE"] for r in rows]
    assert all(code == str(int(code)) for code in codes) and "1" in codes  # un-padded integers
    mnms2 = {s.subject_id: s for s in cohort.subjects if s.dataset == "mnms2"}
    assert {f"{int(c):03d}" for c in codes} == set(mnms2)
    assert {p.name for p in (root / "dataset").iterdir()} == set(mnms2)
    ranges = {"train": (1, 160), "val": (161, 200), "test": (201, 360)}
    vendors = {"SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}
    for row in rows:
        code = f"{int(row['SUBJECT_CODE']):03d}"
        subject = mnms2[code]
        low, high = ranges[subject.split]
        assert low <= int(code) <= high and row["VENDOR"] in vendors
        assert row["FIELD"] in {"1.5", "3.0"} and row["DISEASE"] == subject.pathology
        if row["DISEASE"] in {"RV", "TRI"}:
            assert int(code) > 160
    assert set(Counter(s.split for s in mnms2.values())) == set(ranges)
    for code, subject in mnms2.items():
        folder = cohort.out / subject.path
        names = {f"{code}_{view}_{part}.nii.gz" for view in ("SA", "LA")
                 for part in ("CINE", "ED", "ED_gt", "ES", "ES_gt")}
        assert {p.name for p in folder.iterdir()} == names
        cine = _data(folder / f"{code}_SA_CINE.nii.gz")
        ed_image = _data(folder / f"{code}_SA_ED.nii.gz")
        assert cine.ndim == 4 and any(np.array_equal(ed_image, cine[..., t])
                                      for t in range(cine.shape[3]))
        la_cine = nib.load(folder / f"{code}_LA_CINE.nii.gz")
        assert la_cine.ndim == 4 and la_cine.shape[2] == 1
        for part in ("ED", "ED_gt", "ES", "ES_gt"):
            la = nib.load(folder / f"{code}_LA_{part}.nii.gz")
            assert la.shape == (*la_cine.shape[:2], 1)
        la_labels = _data(folder / f"{code}_LA_ED_gt.nii.gz")
        assert la_labels.dtype == np.uint8 and set(np.unique(la_labels)) == {0, 1, 2, 3}


def test_acdc_unscaled_sform_quirk(cohort: SynthSummary) -> None:
    acdc = [s for s in cohort.subjects if s.dataset == "acdc"]
    quirky = [s for s in acdc if "unscaled_sform" in s.quirks]
    assert 0 < len(quirky) < len(acdc)
    for subject in acdc:
        image = nib.load(cohort.out / subject.path / f"{subject.subject_id}_4d.nii.gz")
        zooms = np.array(image.header.get_zooms()[:3])
        assert 0.5 < zooms[0] < 3.0 and zooms[0] == zooms[1] and 5.0 <= zooms[2] <= 15.0
        qform_spacing = np.linalg.norm(image.header.get_qform()[:3, :3], axis=0)
        np.testing.assert_allclose(qform_spacing, zooms, rtol=1e-5)
        affine_spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        if subject in quirky:
            np.testing.assert_allclose(image.header.get_sform(), np.diag([-1.0, -1.0, 1.0, 1.0]))
            np.testing.assert_allclose(affine_spacing, 1.0)
            assert not np.allclose(affine_spacing, zooms)
        else:
            np.testing.assert_allclose(affine_spacing, zooms, rtol=1e-5)


# --- anatomy and motion ------------------------------------------------------------------------


def test_hearts_contract_and_diagnoses_show_in_the_labels(cohort: SynthSummary) -> None:
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    # the same diagnosis under each dataset's code
    family = {"NOR": "normal", "DCM": "dilated", "LV": "dilated", "HCM": "hypertrophic"}
    for subject in cohort.subjects:
        if not subject.labelled:
            continue
        measures = _measures(cohort.out, subject)
        assert measures["edv"] > measures["esv"] > 0, subject
        groups[family.get(subject.pathology, subject.pathology)].append(measures)

    def mean(group: str, key: str) -> float:
        return float(np.mean([m[key] for m in groups[group]]))

    assert len(groups["normal"]) >= 10 and len(groups["dilated"]) >= 5
    assert mean("dilated", "edv") > 1.4 * mean("normal", "edv")
    assert mean("dilated", "ef") < mean("normal", "ef") - 0.15
    assert mean("hypertrophic", "wall") > 1.4 * mean("normal", "wall")
    assert 0.5 < mean("normal", "ef") < 0.75
    assert mean("RV", "rv_edv") > 1.3 * mean("normal", "rv_edv")  # ACDC abnormal RV
    # per-subject variation: normal hearts are not all alike
    assert np.std([m["edv"] for m in groups["normal"]]) > 3.0


# --- vendors and clients -----------------------------------------------------------------------


def test_every_client_has_both_labels_and_the_mix_is_non_iid(cohort: SynthSummary) -> None:
    counts = cohort.client_label_counts()
    for client in ("siemens", "philips", "ge", "canon"):
        assert counts[(client, 0)] >= 5 and counts[(client, 1)] >= 5, (client, counts)
    by_vendor: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for subject in cohort.subjects:
        by_vendor[(subject.dataset, subject.vendor)][subject.pathology] += 1
    assert "ARV" not in by_vendor[("mnms", "B")]
    assert by_vendor[("mnms", "C")]["HHD"] + by_vendor[("mnms", "C")]["Other"] >= 2
    assert "HHD" not in by_vendor[("mnms", "A")] and "Other" not in by_vendor[("mnms", "A")]
    shares = {client: counts[(client, 0)] / (counts[(client, 0)] + counts[(client, 1)])
              for client in ("siemens", "philips", "ge", "canon")}
    assert max(shares.values()) - min(shares.values()) > 0.1  # label skew across clients
    # the reader's declared tables agree with the summary on client and label
    tables = load_tables()
    for subject in cohort.subjects:
        where = subject.subject_id
        assert tables.client_for(subject.dataset, subject.vendor, where) == subject.client
        assert tables.label_for(subject.dataset, subject.pathology, where) == subject.label


def test_vendors_differ_in_geometry_and_intensity(cohort: SynthSummary) -> None:
    stats: dict[str, dict[str, set[float]]] = defaultdict(lambda: defaultdict(set))
    for subject in cohort.subjects:
        if subject.dataset != "mnms":
            continue
        image = nib.load(cohort.out / subject.path / f"{subject.subject_id}_sa.nii.gz")
        data = np.asarray(image.dataobj)
        stats[subject.client]["matrix"].add(image.shape[0])
        stats[subject.client]["frames"].add(image.shape[3])
        stats[subject.client]["p99"].add(float(np.percentile(data, 99)))
    matrices = [stats[c]["matrix"] for c in ("siemens", "philips", "ge", "canon")]
    assert all(len(m) == 1 for m in matrices) and len(set().union(*matrices)) == 4
    assert not stats["philips"]["frames"] & stats["ge"]["frames"]
    brightness = {c: np.median(sorted(stats[c]["p99"])) for c in stats}
    assert brightness["philips"] > 2 * brightness["siemens"]


def test_duplicate_subject_is_planted(cohort: SynthSummary) -> None:
    pair = cohort.duplicate
    assert pair is not None
    one = next(s for s in cohort.subjects if s.dataset == "mnms" and s.subject_id == pair.mnms)
    two = next(s for s in cohort.subjects if s.dataset == "mnms2" and s.subject_id == pair.mnms2)
    assert one.client == two.client == pair.client and one.labelled
    source = cohort.out / one.path / f"{one.subject_id}_sa.nii.gz"
    copy = cohort.out / two.path / f"{two.subject_id}_SA_CINE.nii.gz"
    assert source.read_bytes() == copy.read_bytes()
    cines = [p for p in cohort.out.rglob("*.nii.gz")
             if p.name.endswith(("_sa.nii.gz", "_SA_CINE.nii.gz"))]
    digests = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in cines)
    assert len(cines) == 48 and sorted(digests.values())[-2:] == [1, 2]  # one pair, no other


def test_summary_is_written_and_reads_back(cohort: SynthSummary) -> None:
    again = read_synth_summary(cohort.out)
    assert again == cohort
    assert len(cohort.subjects) == 72 and sum(cohort.counts().values()) == 72


# --- determinism, atomicity, options -----------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    first = write_synthetic_cohort(tmp_path / "a", seed=3, **SMALL)
    second = write_synthetic_cohort(tmp_path / "b", seed=3, **SMALL)
    other = write_synthetic_cohort(tmp_path / "c", seed=4, **SMALL)
    assert first.subjects == second.subjects
    digest_a, digest_b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert digest_a == digest_b and len(digest_a) > 50
    assert other.subjects != first.subjects
    images = [name for name in digest_a if name.endswith("_4d.nii.gz")]
    digest_c = _tree_digest(tmp_path / "c")
    assert all(digest_c.get(name) != digest_a[name] for name in images)


def test_refuses_existing_out_and_leaves_nothing_when_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        write_synthetic_cohort(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def crash(*_: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_mnms2_csv", crash)
    with pytest.raises(RuntimeError):
        write_synthetic_cohort(tmp_path / "fresh", **SMALL)
    with pytest.raises(UsageError, match="not a synthetic cohort"):  # not one synth made
        write_synthetic_cohort(out, overwrite=True, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("options", [{"subjects": 2}, {"subjects": 151}, {"shape": (16, 16, 8)},
                                     {"shape": (96, 96, 2)}, {"frames": 3}, {"seed": -1}])
def test_bad_options_are_usage_errors(tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        write_synthetic_cohort(tmp_path / "out", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_cli_synth_writes_prints_and_exits_with_codes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cohort"
    args = ["synth", "--out", str(out), "--subjects", "5", "--shape", "48,48,4", "--frames", "8"]
    runner = CliRunner()
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "canon" in result.output and "mnms2" in result.output
    assert read_synth_summary(out).subjects_per_dataset == 5

    refused = runner.invoke(cli, args)
    assert refused.exit_code == 2 and "already exists" in refused.output
    bad_shape = runner.invoke(cli, ["synth", "--out", str(tmp_path / "x"), "--shape", "48,48"])
    assert bad_shape.exit_code == 2 and "--shape" in bad_shape.output

    monkeypatch.setattr(sys, "argv", ["cmrfed", *args])
    with pytest.raises(SystemExit) as exited:
        cli_module.main()
    assert exited.value.code == 2
