"""Tests of the synthetic cohort: real NIfTI files through nibabel, small cohorts."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from harness.cohort import MANIFEST_COLUMNS, SEQUENCES, generate_cohort, sample_cohort, write_report
from harness.cohort.anatomy import load_template
from harness.cohort.generate import check_sequences, write_study
from harness.cohort.render import voxel_to_mni
from harness.cohort.report_writer import location_phrase
from harness.commands import cohort as cohort_command

SEED = 3
N_STUDIES = 4


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    return generate_cohort(out, N_STUDIES, seed=SEED, workers=1, progress=False)


def test_manifest_columns_and_paths(cohort: Path):
    rows = _read_manifest(cohort)
    assert len(rows) == N_STUDIES
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    for row in rows:
        for column in (*SEQUENCES, "segmentation", "findings"):
            assert not Path(row[column]).is_absolute()
            assert (cohort.parent / row[column]).is_file(), row[column]
        assert row["report"].strip()
        assert row["diagnosis"] in ("", "AD", "CN")
        assert int(row["age"]) > 0


def test_dataset_description(cohort: Path):
    description = json.loads((cohort.parent / "dataset.json").read_text())
    assert description["name"] == "synthetic-brain"
    assert description["seed"] == SEED
    assert description["n_studies"] == N_STUDIES
    assert description["sequences"] == list(SEQUENCES)
    assert description["labels"] == {"diagnosis": ["AD", "CN"]}
    assert description["segmentation_labels"]["3"] == "enhancing tumour"


def test_segmentation_on_image_grid(cohort: Path):
    for row in _read_manifest(cohort):
        segmentation = nib.load(cohort.parent / row["segmentation"])
        labels = np.unique(np.asarray(segmentation.dataobj))
        assert set(labels.tolist()) <= {0, 1, 2, 3}
        for sequence in SEQUENCES:
            image = nib.load(cohort.parent / row[sequence])
            assert image.shape == segmentation.shape
            assert np.allclose(image.affine, segmentation.affine)
            assert image.get_data_dtype() == np.int16
            assert np.allclose(image.header.get_qform(), image.affine, atol=1e-4)


@pytest.mark.slow
def test_same_seed_same_bytes_any_workers(cohort: Path, tmp_path: Path):
    # Two studies with two workers against the fixture written by one worker: study
    # files do not depend on the cohort size, so the first two folders must match.
    again = generate_cohort(tmp_path / "again", 2, seed=SEED, workers=2, progress=False)
    for row in _read_manifest(again):
        folder = Path(row["findings"]).parent
        written = _digests(again.parent / folder)
        assert len(written) == len(SEQUENCES) + 2
        assert written == _digests(cohort.parent / folder)


def test_other_seed_differs(cohort: Path, tmp_path: Path):
    parser = argparse.ArgumentParser()
    cohort_command.add_arguments(parser)
    args = parser.parse_args(["--n", "1", "--seed", str(SEED + 1), "--out", str(tmp_path / "other"), "--sequences", "t1", "--workers", "1", "--no-progress"])
    assert cohort_command.run(args) == 0
    other = tmp_path / "other" / "manifest.csv"
    first = _read_manifest(cohort)[0]
    other_row = _read_manifest(other)[0]
    assert other_row["t1c"] == ""
    assert (other.parent / other_row["t1"]).read_bytes() != (cohort.parent / first["t1"]).read_bytes()


def test_resume_skips_complete_studies(cohort: Path):
    folder = cohort.parent
    before = {path: path.stat().st_mtime_ns for path in folder.glob("studies/*/*.nii.gz")}
    digests = _digests(folder)
    removed = sorted(folder.glob("studies/*/findings.json"))[-1]
    removed.unlink()

    generate_cohort(folder, N_STUDIES, seed=SEED, workers=1, progress=False)

    rewritten = {path for path in before if path.stat().st_mtime_ns != before[path]}
    assert rewritten
    assert {path.parent for path in rewritten} == {removed.parent}
    assert _digests(folder) == digests


def test_previous_seed_mismatch_rejected(cohort: Path):
    with pytest.raises(ValueError, match="seed"):
        generate_cohort(cohort.parent, 1, seed=SEED + 7, progress=False)


def test_cli_invalid_sequence_exit_code(tmp_path: Path):
    parser = argparse.ArgumentParser()
    cohort_command.add_arguments(parser)
    args = parser.parse_args(["--n", "1", "--out", str(tmp_path), "--sequences", "t1,dwi"])
    assert cohort_command.run(args) == 2
    assert not (tmp_path / "manifest.csv").exists()


def test_invalid_sequence_rejected():
    with pytest.raises(ValueError, match="dwi"):
        check_sequences(["t1", "dwi"])
    assert check_sequences(["flair", "T1C"]) == ("t1c", "flair")


def test_subject_splits_disjoint():
    specs = sample_cohort(200, seed=0)
    splits_by_subject: dict[str, set[str]] = {}
    for spec in specs:
        splits_by_subject.setdefault(spec.subject_id, set()).add(spec.split)
    assert all(len(splits) == 1 for splits in splits_by_subject.values())
    assert {spec.split for spec in specs} == {"train", "val", "test"}


def test_follow_up_sessions_exist():
    specs = sample_cohort(60, seed=0)
    sessions = [spec.session for spec in specs]
    assert max(sessions) >= 2
    follow_ups = [spec for spec in specs if spec.session > 1]
    assert all(spec.interval_months is not None for spec in follow_ups)
    assert any("COMPARISON: MRI brain from" in write_report(spec, 0) for spec in follow_ups)


def test_cohort_prefix_stable():
    small = sample_cohort(10, seed=5)
    large = sample_cohort(30, seed=5)
    complete = [spec for spec in small if spec.subject_id != small[-1].subject_id]
    for a, b in zip(complete, large, strict=False):
        assert a.to_dict() == b.to_dict()


def test_report_mentions_every_finding():
    for spec in sample_cohort(120, seed=1):
        report = write_report(spec, 1)
        assert "FINDINGS:" in report
        assert "IMPRESSION:" in report
        for lesion in spec.lesions + spec.resolved:
            assert location_phrase(lesion) in report, (spec.study_id, lesion.lesion_id)
        if spec.small_vessel_disease is not None:
            assert f"Fazekas grade {spec.small_vessel_disease.fazekas}" in report
        if spec.atrophy is not None:
            assert "volume" in report.lower()
        if not spec.lesions:
            assert "enhancing lesion in" not in report


def test_metastasis_sizes_in_report():
    specs = [spec for spec in sample_cohort(80, seed=2) if any(lesion.kind == "metastasis" for lesion in spec.lesions)]
    assert specs
    for spec in specs:
        report = write_report(spec, 2)
        assert " mm" in report or " cm" in report


def _study_with(side: str, seed: int = 0):
    for spec in sample_cohort(80, seed=seed):
        tumours = [lesion for lesion in spec.lesions if lesion.kind == "metastasis"]
        if tumours and all(lesion.hemisphere == side for lesion in spec.lesions) and spec.session == 1:
            return spec
    raise AssertionError(f"no study with only {side} metastases in the first 80")


@pytest.mark.parametrize("side", ["left", "right"])
def test_lesion_laterality_in_world(side: str, tmp_path: Path):
    spec = _study_with(side)
    write_study(tmp_path, spec, 0, ("t1c",))
    folder = tmp_path / "studies" / spec.study_id
    segmentation = nib.load(folder / "seg.nii.gz")
    t1c = np.asarray(nib.load(folder / "t1c.nii.gz").dataobj)
    labels = np.asarray(segmentation.dataobj)
    enhancing = np.argwhere(labels == 3)
    assert len(enhancing) > 0
    world = nib.affines.apply_affine(segmentation.affine, enhancing)
    # RAS world: x < 0 is the subject's left, like MNI x.
    assert (np.mean(world[:, 0]) < 0) == (side == "left")
    assert t1c[labels == 3].mean() > 1.3 * t1c[labels == 0][t1c[labels == 0] > 0].mean()
    lesion = spec.lesions[0]
    findings = json.loads((folder / "findings.json").read_text())
    assert findings["findings"][0]["hemisphere"] == side
    assert side in findings["report"]
    if len(spec.lesions) == 1:
        centroid = world.mean(axis=0)
        assert np.linalg.norm(centroid - np.asarray(lesion.centre_mni)) < 20.0


def test_lesions_only_inside_brain(tmp_path: Path):
    spec = _study_with("left", seed=4)
    write_study(tmp_path, spec, 4, ("flair",))
    segmentation = nib.load(tmp_path / "studies" / spec.study_id / "seg.nii.gz")
    labelled = np.argwhere(np.asarray(segmentation.dataobj) > 0).T.astype(np.float32)
    assert labelled.shape[1] > 0
    mni = voxel_to_mni(spec, 4, labelled, segmentation.affine)
    template = load_template()
    depth = ndimage.map_coordinates(template.signed_distance, (mni - template.origin[:, None]) / 2.0, order=1)
    # Partial volume at the brain surface reaches half a voxel: 2 mm for 4 mm slices.
    assert depth.min() > -2.0
