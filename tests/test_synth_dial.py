"""The heterogeneity dial of the synthetic cohort: defaults write today's cohort, 0 makes the sites
alike (label mixes, image statistics), concept shift relabels only between two cut-offs."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from cmrfed.data.synth import read_synth_summary, write_synthetic_cohort
from cmrfed.data.synth_dial import (
    CUTOFF_OFFSET_MM,
    REFERENCE_CUTOFF_MM,
    WALL_JUDGED,
    Heterogeneity,
    apply_concept_shift,
    look_at,
    looks_at,
    site_cutoff_mm,
)
from cmrfed.data.synth_phantom import LOOKS, _render_subject, wall_thickness_mm
from cmrfed.data.synth_plan import NORMAL, label_shift, plan_cohort
from cmrfed.errors import UsageError

# A fingerprint (voxel data, zooms, qform, Info.cfg and CSV text) of the cohort written by seed 7,
# 5 subjects, 32 x 32 x 4, 6 frames, taken before the dial existed.
TODAY = "0cab54d63b33e25b3488cda54d21714038ed3f8c3507caf851674715975eb3f9"


def _fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == "synth_summary.json":
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        if path.name.endswith(".nii.gz"):
            image = nib.load(path)
            digest.update(np.ascontiguousarray(np.asarray(image.dataobj)).tobytes())
            digest.update(np.asarray(image.header.get_zooms(), dtype=np.float64).tobytes())
            digest.update(np.asarray(image.header.get_qform(), dtype=np.float64).tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.e2e
def test_the_default_dial_writes_todays_cohort_and_records_itself(tmp_path: Path) -> None:
    summary = write_synthetic_cohort(tmp_path / "c", seed=7, subjects=5, shape=(32, 32, 4), frames=6)
    assert _fingerprint(tmp_path / "c") == TODAY
    record = read_synth_summary(tmp_path / "c").heterogeneity
    assert record is not None and summary.heterogeneity == record
    assert {k: record[k] for k in ("appearance", "label_shift", "concept_shift")} == {
        "appearance": 1.0, "label_shift": 1.0, "concept_shift": 0.0}
    assert record["relabelled"] == [] and set(record["looks"]) == set(LOOKS)
    explicit = write_synthetic_cohort(tmp_path / "e", seed=7, subjects=5, shape=(32, 32, 4), frames=6,
                                      dial=Heterogeneity(1.0, 1.0, 0.0))
    assert _fingerprint(tmp_path / "e") == TODAY and explicit.heterogeneity == record


def test_appearance_one_is_todays_looks_and_zero_one_common_look() -> None:
    assert looks_at(1.0) == LOOKS
    common = set(looks_at(0.0).values())
    assert len(common) == 1
    # stronger than today: every vendor further from the common look, within physical bounds
    (look0,) = common
    for client in LOOKS:
        far = look_at(client, 2.0)
        assert abs(far.noise - look0.noise) >= abs(LOOKS[client].noise - look0.noise)
        assert far.noise > 0 and far.frames[0] >= 6 and far.gamma > 0


@pytest.mark.parametrize("bad", [-0.5, math.nan, 99.0])
def test_each_knob_is_checked_by_its_option_name(bad: float) -> None:
    for index, option in enumerate(("--appearance", "--label-shift", "--concept-shift")):
        levels = [1.0, 1.0, 0.0]
        levels[index] = bad
        with pytest.raises(UsageError, match=option):
            Heterogeneity(*levels)


def _normal_share(planned: list) -> dict[str, tuple[int, int]]:
    counts = Counter((p.subject.client, p.subject.label) for p in planned)
    return {c: (counts[(c, 0)], counts[(c, 0)] + counts[(c, 1)]) for c in {k for k, _ in counts}}


@pytest.mark.parametrize("subjects", [24, 60])
def test_at_label_shift_zero_every_site_has_the_pooled_mix_within_sampling_error(subjects: int) -> None:
    pooled = label_shift(subjects, 0.0).pooled
    for level, alike in ((0.0, True), (2.0, False)):
        shares = _normal_share(plan_cohort(0, subjects, level)[0])
        deviations = [abs(n / total - pooled) / math.sqrt(pooled * (1 - pooled) / total)
                      for n, total in shares.values()]
        if alike:
            assert max(deviations) < 2.0, shares
        else:
            assert max(deviations) > 2.0, shares
    # at 1 the mixes are today's: the Siemens site (ACDC's five equal groups) leans normal-poor
    today = dict(label_shift(subjects, 1.0).today)
    assert today["siemens"] < pooled < today["ge"]


def test_label_shift_grows_each_sites_departure() -> None:
    pooled = label_shift(60, 1.0).pooled
    departure = {level: {c: n / t - pooled
                         for c, (n, t) in _normal_share(plan_cohort(0, 60, level)[0]).items()}
                 for level in (0.0, 1.0, 2.0)}
    for client in departure[1.0]:
        assert abs(departure[0.0][client]) <= abs(departure[1.0][client]) <= abs(departure[2.0][client])


def _image_stats(level: float, per_client: int = 5) -> dict[str, list[float]]:
    """Per client, the mean intensity (relative to the 99th percentile) of normal hearts' ED frame."""
    planned, _ = plan_cohort(3, 40, 1.0)
    looks = looks_at(level)
    out: dict[str, list[float]] = {}
    for entry in planned:
        values = out.setdefault(entry.subject.client, [])
        if entry.archetype != "normal" or len(values) >= per_client:
            continue
        cine = _render_subject(3, entry, (40, 40, 4), 6, long_axis=False, looks=looks).cine[..., 0]
        cine = cine.astype(np.float64)
        values.append(float(cine.mean() / np.percentile(cine, 99)))
    return out


def test_at_appearance_zero_image_statistics_agree_and_at_two_they_do_not() -> None:
    alike = stats.kruskal(*_image_stats(0.0).values()).pvalue
    apart = stats.kruskal(*_image_stats(2.0).values()).pvalue
    assert alike > 0.01 and apart < 0.01, (alike, apart)


def test_concept_shift_changes_labels_only_between_the_common_and_the_sites_cut_off() -> None:
    planned, _ = plan_cohort(0, 60, 1.0)
    unchanged, none = apply_concept_shift(planned, 0, 0.0)
    assert unchanged == planned and none == []
    shifted, changed = apply_concept_shift(planned, 0, 2.0)
    assert len(changed) > 0
    assert [(p.render_key, p.archetype) for p in shifted] == [(p.render_key, p.archetype) for p in planned]
    for before, after in zip(planned, shifted, strict=True):
        cutoff = site_cutoff_mm(before.subject.client, 2.0)
        assert cutoff == REFERENCE_CUTOFF_MM + 2.0 * CUTOFF_OFFSET_MM[before.subject.client]
        if before.archetype not in WALL_JUDGED:
            assert after == before
            continue
        wall = wall_thickness_mm(0, before)
        low, high = sorted((REFERENCE_CUTOFF_MM, cutoff))
        in_band = low <= wall < high
        site_says = int(cutoff < REFERENCE_CUTOFF_MM) if in_band else before.subject.label
        assert after.subject.label == site_says
        if after.subject.label != before.subject.label:
            assert in_band and after.subject.pathology == ("HCM" if site_says else NORMAL)
    assert {r["subject_id"] for r in changed} == {
        a.subject.subject_id for a, b in zip(shifted, planned, strict=True) if a.subject != b.subject}
    # a stricter or more lenient rule at every level: more subjects called differently at 3 than at 1
    assert len(apply_concept_shift(planned, 0, 3.0)[1]) > len(apply_concept_shift(planned, 0, 1.0)[1])
