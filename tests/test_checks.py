"""``brat-harness check``: every seeded defect is reported with its row and column."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from harness.checks import (
    Problem,
    SplitIntegrityError,
    check_manifest,
    check_split_integrity,
    require_split_integrity,
)
from harness.cli import main
from harness.manifest import read_manifest

SHAPE = (8, 9, 7)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE).astype(np.float32) + 0.5


def _save_singular_affine(path: Path) -> str:
    """Save an image whose sform has a zero third column (nibabel refuses to build that from an affine)."""
    affine = np.eye(4)
    affine[2, 2] = 0.0
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(_image(), None, header=header), str(path))
    return str(path)


def _row(study, subject, split="train", report="Normal study.", **columns):
    return {"study_id": study, "subject_id": subject, "split": split, "report": report, **columns}


def _seeded_manifest(tmp_path, write_nifti) -> tuple[Path, list[tuple[int, str, str]]]:
    """Write a manifest with one defect of each kind; return it and ``(row, column, keyword)`` expectations."""
    ok = write_nifti("ok.nii.gz", _image())
    ok_seg = write_nifti("ok_seg.nii.gz", (_image() > 1.0).astype(np.uint8))
    nan_data = _image()
    nan_data[1, 2, 3] = np.nan
    nan_data[2, 2, 2] = np.inf
    nan_img = write_nifti("nan.nii.gz", nan_data)
    four_d = write_nifti("four_d.nii.gz", np.stack([_image(), _image(1)], axis=-1))
    singular = _save_singular_affine(tmp_path / "singular.nii.gz")
    seg_shape = write_nifti("seg_shape.nii.gz", np.zeros((8, 9, 6), np.uint8))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    seg_affine = write_nifti("seg_affine.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti file at all")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"diagnosis": ["AD", "CN"]}}), encoding="utf-8")

    rows = [
        _row("S01", "P01", t1c=ok, segmentation=ok_seg, diagnosis="AD", sex="F"),   # 1 clean
        _row("S02", "P02", t1c="missing.nii.gz"),                                    # 2 missing image
        _row("S03", "P03", t1c="garbage.nii.gz"),                                    # 3 unreadable
        _row("S04", "P04", t1c=four_d),                                              # 4 not 3D
        _row("S05", "P05", t1c=nan_img),                                             # 5 NaN / inf
        _row("S06", "P06", t1c=singular),                                            # 6 singular affine
        _row("S07", "P07", report="   ", t1c=ok),                                    # 7 empty report
        _row("S08", "P08", t1c=ok, diagnosis="MCI"),                                 # 8 label (dataset.json)
        _row("S09", "P09", t1c=ok, sex="U"),                                         # 9 label (--labels)
        _row("S10", "P10", t1c=ok, segmentation=seg_shape),                          # 10 seg shape
        _row("S11", "P11", t1c=ok, segmentation=seg_affine),                         # 11 seg affine
        _row("S12", "P12"),                                                          # 12 no image
        _row("S13", "P13", t1c="series"),                                            # 13 DICOM folder
        _row("S14", "P14", flair="slice.dcm"),                                       # 14 DICOM file
        _row("S15", "P15", split="training", t1c=ok),                                # 15 unknown split
        _row("S01", "P16", t1c=ok),                                                  # 16 duplicate study_id
        _row("S17", "P01", split="test", t1c=ok),                                    # 17 subject leak
    ]
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    expected = [
        (2, "t1c", "not found"),
        (3, "t1c", "unreadable"),
        (4, "t1c", "not 3D"),
        (5, "t1c", "1 NaN and 1 infinite"),
        (6, "t1c", "singular"),
        (7, "report", "empty report"),
        (8, "diagnosis", "'MCI'"),
        (9, "sex", "'U'"),
        (10, "segmentation", "shape"),
        (11, "segmentation", "affine differs"),
        (12, "t1c/t1/t2/flair/ct", "no image"),
        (13, "t1c", "dcm2niix"),
        (14, "flair", "dcm2niix"),
        (15, "split", "allowed: train, val, test"),
        (16, "study_id", "first used in row 1"),
    ]
    return path, expected


def test_check_cli_reports_every_defect(tmp_path, write_nifti, capsys):
    path, expected = _seeded_manifest(tmp_path, write_nifti)

    code = main(["check", str(path), "--labels", "sex=F,M"])
    lines = capsys.readouterr().out.splitlines()

    assert code == 1
    for row, column, keyword in expected:
        hits = [line for line in lines if f"row {row} " in line and f"column {column!r}" in line and keyword in line]
        assert hits, f"no line for row {row}, column {column!r} with {keyword!r} in:\n" + "\n".join(lines)
    leak = [line for line in lines if "more than one split" in line]
    assert len(leak) == 1
    assert "'P01' (train: row 1; test: row 17)" in leak[0]
    assert not any(line for line in lines if "row 1 " in line), "the clean row 1 must not be reported"
    assert len(lines) == len(expected) + 1


def test_check_workers_match_serial(tmp_path, write_nifti):
    path, _ = _seeded_manifest(tmp_path, write_nifti)
    serial = check_manifest(path, labels={"sex": ["F", "M"]})
    pooled = check_manifest(path, labels={"sex": ["F", "M"]}, workers=2)
    assert [str(p) for p in pooled] == [str(p) for p in serial]


def test_check_no_images_skips_files(tmp_path, write_nifti):
    path, _ = _seeded_manifest(tmp_path, write_nifti)
    problems = check_manifest(path, check_images=False)
    columns = {p.column for p in problems}
    assert "t1c" not in columns
    assert "report" in columns
    assert "t1c/t1/t2/flair/ct" in columns


def test_check_clean_manifest_exits_zero(tmp_path, write_nifti, capsys):
    t1c = write_nifti("a_t1c.nii.gz", _image())
    flair = write_nifti("a_flair.nii.gz", _image(2)[..., None])  # 4D with a single volume is accepted
    seg = write_nifti("a_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    rows = [
        _row("001", "P1", t1c=t1c, flair=flair, segmentation=seg, diagnosis="CN"),
        _row("002", "P2", split="val", t1c="b_t1c.nii.gz", diagnosis="AD"),
        _row("003", "P1", t1c=t1c),
    ]
    write_nifti("b_t1c.nii.gz", _image(3))
    path = tmp_path / "clean.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

    code = main(["check", str(path), "--labels", "diagnosis=AD,CN"])
    out = capsys.readouterr().out

    assert code == 0
    assert "OK" in out
    assert "3 studies" in out
    assert "2 subjects" in out
    assert "train 2" in out
    assert "val 1" in out
    assert "t1c 3" in out
    assert "flair 1" in out


def test_check_missing_required_columns(tmp_path, write_nifti, capsys):
    t1c = write_nifti("a.nii.gz", _image())
    path = tmp_path / "m.csv"
    pd.DataFrame([{"study_id": "S1", "t1c": t1c}]).to_csv(path, index=False)

    code = main(["check", str(path)])
    out = capsys.readouterr().out

    assert code == 1
    for column in ("subject_id", "split", "report"):
        assert f"column {column!r}: missing required column" in out


def test_check_utf8_error_names_row(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_bytes(b"study_id,subject_id,split,t1c,report\nS1,P1,train,a.nii.gz,ok\n"
                     + "S2,P2,train,b.nii.gz,Läsion\n".encode("latin-1"))
    code = main(["check", str(path), "--no-images"])
    out = capsys.readouterr().out
    assert code == 1
    assert "row 2" in out
    assert "column 'report'" in out
    assert "iconv -f latin1 -t utf-8" in out


def test_check_invalid_labels_option(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("study_id,subject_id,split,t1c,report\n", encoding="utf-8")
    assert main(["check", str(path), "--labels", "diagnosis"]) == 2
    assert "COL=V1,V2" in capsys.readouterr().err


def test_split_integrity_lists_subjects():
    df = pd.DataFrame([
        {"study_id": "a", "subject_id": "P1", "split": "train"},
        {"study_id": "b", "subject_id": "P1", "split": "val"},
        {"study_id": "c", "subject_id": "P2", "split": "train"},
        {"study_id": "d", "subject_id": "P3", "split": "test"},
        {"study_id": "e", "subject_id": "P3", "split": "train"},
    ])
    problems = check_split_integrity(df)

    assert len(problems) == 1
    message = problems[0].message
    assert message.startswith("2 subject(s) in more than one split")
    assert "'P1' (train: row 1; val: row 2)" in message
    assert "'P3' (test: row 4; train: row 5)" in message
    assert "'P2'" not in message
    with pytest.raises(SplitIntegrityError, match="P3"):
        require_split_integrity(df)


def test_split_integrity_clean():
    df = pd.DataFrame([{"subject_id": "P1", "split": "train"}, {"subject_id": "P1", "split": "train"}])
    assert check_split_integrity(df) == []
    require_split_integrity(df)


def test_problem_str_names_row_column_value():
    problem = Problem(3, "S3", "split", "training", "unknown split; allowed: train, val, test")
    assert str(problem) == "row 3 (study_id 'S3'), column 'split', value 'training': unknown split; allowed: train, val, test"
    assert str(Problem(None, None, "report", None, "missing required column")) == "column 'report': missing required column"


def test_read_manifest_then_check_relative_paths(tmp_path, write_nifti):
    write_nifti("sub/a.nii.gz", _image())
    path = tmp_path / "m.tsv"
    path.write_text("study_id\tsubject_id\tsplit\tt1c\treport\nS1\tP1\ttest\tsub/a.nii.gz\tok\n", encoding="utf-8")
    assert read_manifest(path).loc[0, "t1c"] == str(tmp_path / "sub" / "a.nii.gz")
    assert check_manifest(path) == []


def test_check_header_only_manifest(tmp_path, capsys):
    path = tmp_path / "manifest.csv"
    path.write_text("study_id,subject_id,split,report,t1c\n")

    assert main(["check", str(path)]) != 0
    assert "the manifest has no studies" in capsys.readouterr().out
