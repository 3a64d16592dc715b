"""Dataset adapters on fixtures laid out like the real data (tiny NIfTI volumes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harness.adapters import (
    ADAPTERS,
    assign_splits,
    parse_fractions,
    read_splits,
    split_of_subjects,
)
from harness.checks import check_split_integrity
from harness.manifest import read_manifest

BIMCV_COLUMNS = [
    "PatientID", "ReportID", "Report", "Labels", "Localizations", "LabelsLocalizationsBySentence",
    "labelCUIS", "LocalizationsCUIS", "num", "path", "Report_en", "ct_path",
]


def write_volume(path: Path, value: float, shape=(6, 5, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)
    return path


@pytest.fixture()
def bimcv_root(tmp_path) -> Path:
    """A BIMCV-R copy in miniature: report table under meta/, volumes under CT*/ct/.

    Six patients and eight volumes, because two patients have two sessions. One table
    row points to a volume that is not on disk, as in a partial download.
    """
    root = tmp_path / "BIMCV-R"
    rows = []
    studies = [("S1001", "E1"), ("S1001", "E2"), ("S1002", "E3"), ("S1003", "E4"), ("S1004", "E5"), ("S1004", "E6"), ("S1005", "E7"), ("S1006", "E8")]
    for index, (patient, session) in enumerate(studies):
        name = f"sub-{patient}_ses-{session}_run-1_bp-chest_ct.nii.gz"
        folder = root / ("CT_1" if index < 4 else "CT_2") / "ct"
        write_volume(folder / name, value=index * 10)
        foreign = f"/raid/BIMCV_CT/covid19_posi/sub-{patient}/ses-{session}/mod-rx"
        rows.append({
            "PatientID": f"sub-{patient}", "ReportID": f"ses-{session}",
            "Report": f"derrame pleural {index} .", "Labels": "['pleural effusion']", "Localizations": "['loc pleural']",
            "LabelsLocalizationsBySentence": "[]", "labelCUIS": "[C0032227]", "LocalizationsCUIS": "[]", "num": "1.0",
            "path": foreign, "Report_en": f"Pleural effusion {index}.", "ct_path": f"{foreign}/{name}",
        })
    rows.append({**rows[0], "ReportID": "ses-E9", "ct_path": "/raid/x/sub-S1007_ses-E9_run-1_bp-chest_ct.nii.gz", "PatientID": "sub-S1007"})
    (root / "meta").mkdir(parents=True)
    pd.DataFrame(rows, columns=BIMCV_COLUMNS).to_csv(root / "meta" / "curated_ct_report_path_En.csv", index=False)
    return root


def test_bimcv_manifest(bimcv_root, tmp_path):
    out = tmp_path / "out"
    result = ADAPTERS.get("bimcv-r").build(out, root=bimcv_root, seed=3, fractions="train=0.5,val=0.17,test=0.33")

    frame = read_manifest(result.manifest)
    assert len(frame) == 8
    assert set(frame["subject_id"]) == {f"sub-S100{i}" for i in range(1, 7)}
    assert frame.loc[0, "study_id"] == "sub-S1001_ses-E1_run-1_bp-chest_ct"
    assert frame.loc[0, "report"] == "Pleural effusion 0."
    assert all(Path(p).is_file() for p in frame["ct"])
    assert Path(frame.loc[5, "ct"]).parent == bimcv_root / "CT_2" / "ct"
    assert nib.load(frame.loc[5, "ct"]).get_fdata().max() == 50
    assert check_split_integrity(frame) == []

    card = json.loads((out / "dataset.json").read_text())
    assert card["skipped_rows"]["volume_not_found"] == 1
    assert card["preprocessing"] == "ct-v1"
    assert card["splits"]["sha256"] == hashlib.sha256((out / "splits.json").read_bytes()).hexdigest()
    assert card["manifest_sha256"] == hashlib.sha256(result.manifest.read_bytes()).hexdigest()

    splits = read_splits(out / "splits.json")
    owner = split_of_subjects(splits)
    assert all(owner[s] == split for s, split in zip(frame["subject_id"], frame["split"], strict=True))


def test_bimcv_spanish_and_strict(bimcv_root, tmp_path):
    frame = ADAPTERS.get("bimcv-r").build(tmp_path / "es", root=bimcv_root, language="es").frame
    assert frame.loc[1, "report"] == "derrame pleural 1 ."
    with pytest.raises(ValueError, match=r"line 10: volume not found"):
        ADAPTERS.get("bimcv-r").build(tmp_path / "strict", root=bimcv_root, strict=True)


def test_bimcv_reuses_split_file(bimcv_root, tmp_path):
    first = ADAPTERS.get("bimcv-r").build(tmp_path / "a", root=bimcv_root, seed=1)
    second = ADAPTERS.get("bimcv-r").build(tmp_path / "b", root=bimcv_root, splits=first.splits)
    assert second.frame["split"].tolist() == first.frame["split"].tolist()


def test_bimcv_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="curated_ct_report_path_En.csv"):
        ADAPTERS.get("bimcv-r").build(tmp_path / "o", root=tmp_path)


def test_bimcv_ct_spec_loads_volume(bimcv_root, tmp_path):
    from harness.preprocessing import get_spec, load_study

    frame = read_manifest(ADAPTERS.get("bimcv-r").build(tmp_path / "o", root=bimcv_root).manifest)
    spec = get_spec("ct-v1")
    volume = load_study(frame.iloc[2].to_dict(), spec)
    assert volume.shape == (len(spec.sequences), *spec.spatial_size)
    assert volume.dtype == np.float32


@pytest.fixture()
def inhouse_table(tmp_path) -> Path:
    """An in-house export: relative image paths, patient ids, two sequences, a label."""
    folder = tmp_path / "export"
    rows = []
    for index in range(10):
        t1c = write_volume(folder / "images" / f"case{index}_t1c.nii.gz", index)
        rows.append({
            "accession": f"A{index:03d}", "patient": f"P{index // 2}", "text": f"Finding {index}.",
            "T1C": str(t1c.relative_to(folder)), "FLAIR": "" if index % 3 else str(t1c.relative_to(folder)),
            "dx": "AD" if index % 2 else "CN",
        })
    path = folder / "export.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_generic_assigns_subject_splits(inhouse_table, tmp_path):
    result = ADAPTERS.get("generic").build(
        tmp_path / "out", table=inhouse_table, image_columns=["t1c=T1C", "flair=FLAIR"], report_column="text",
        id_column="accession", subject_column="patient", keep_columns=["dx"], seed=7,
    )
    frame = read_manifest(result.manifest)

    assert list(frame.columns[:6]) == ["study_id", "subject_id", "split", "t1c", "flair", "report"]
    assert frame.loc[0, "t1c"] == str(inhouse_table.parent / "images" / "case0_t1c.nii.gz")
    assert frame.loc[1, "flair"] is None
    assert frame["dx"].tolist()[:2] == ["CN", "AD"]
    assert check_split_integrity(frame) == []
    assert (tmp_path / "out" / "splits.json").is_file()


def test_generic_existing_split_column(inhouse_table, tmp_path):
    table = pd.read_csv(inhouse_table, dtype=str, keep_default_na=False)
    table["fold"] = ["train", "train", "val", "val", "test", "test", "train", "train", "test", "test"]
    table.to_csv(inhouse_table, index=False)
    result = ADAPTERS.get("generic").build(
        tmp_path / "o", table=inhouse_table, image_columns=["t1c=T1C"], report_column="text",
        id_column="accession", subject_column="patient", split_column="fold",
    )
    assert result.frame["split"].tolist() == table["fold"].tolist()
    assert result.splits is None

    table.loc[1, "fold"] = "test"  # patient P0 now in train and test
    table.to_csv(inhouse_table, index=False)
    with pytest.raises(ValueError, match="subject 'P0' is in splits"):
        ADAPTERS.get("generic").build(
            tmp_path / "o2", table=inhouse_table, image_columns=["t1c=T1C"], report_column="text",
            id_column="accession", subject_column="patient", split_column="fold",
        )


def test_generic_errors_name_column_and_table(inhouse_table, tmp_path):
    generic = ADAPTERS.get("generic")
    with pytest.raises(ValueError, match=r"export\.csv: columns \['notes'\] not found"):
        generic.build(tmp_path / "o", table=inhouse_table, image_columns=["t1c=T1C"], report_column="notes", id_column="accession")
    with pytest.raises(ValueError, match="sequence 'T1C' is not one of"):
        generic.build(tmp_path / "o", table=inhouse_table, image_columns=["T1C"], report_column="text", id_column="accession")
    with pytest.raises(ValueError, match="duplicate study ids"):
        generic.build(tmp_path / "o", table=inhouse_table, image_columns=["t1c=T1C"], report_column="text", id_column="patient")


def test_generic_jsonl_table(tmp_path):
    volume = write_volume(tmp_path / "v.nii.gz", 1)
    path = tmp_path / "studies.jsonl"
    path.write_text("\n".join(json.dumps({"study_id": f"s{i}", "report": "x.", "t2": str(volume)}) for i in range(4)) + "\n")
    frame = ADAPTERS.get("generic").build(tmp_path / "o", table=path, image_columns=["t2"]).frame
    assert frame["subject_id"].tolist() == ["s0", "s1", "s2", "s3"]  # one subject per study without a subject column


def test_assign_splits_deterministic_and_disjoint():
    subjects = [f"p{i}" for i in range(50)] * 2
    first = assign_splits(subjects, parse_fractions(None), seed=5)
    again = assign_splits(subjects, parse_fractions(None), seed=5)
    other = assign_splits(subjects, parse_fractions(None), seed=6)

    assert first == again
    assert first != other
    assert {len(v) for v in first.values()} == {40, 5}
    assert sorted(s for v in first.values() for s in v) == sorted(set(subjects))
    split_of_subjects(first)  # raises if a subject were in two splits


def test_small_cohort_gets_every_split():
    splits = assign_splits(["a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert all(len(subjects) == 1 for subjects in splits.values())


def test_parse_fractions_rejects_bad_sums():
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("train=0.8,test=0.3")
    with pytest.raises(ValueError, match="NAME=FRACTION"):
        parse_fractions("train:0.8")


def test_adapt_command(bimcv_root, tmp_path, capsys):
    import argparse

    from harness.commands import adapt

    parser = argparse.ArgumentParser()
    adapt.add_arguments(parser)
    args = parser.parse_args(["bimcv-r", "--out", str(tmp_path / "out"), "--root", str(bimcv_root), "--seed", "2"])
    assert adapt.run(args) == 0
    assert "8 studies, 6 subjects" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.csv").is_file()
