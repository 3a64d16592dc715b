"""Reading manifests: formats, id and path normalisation, UTF-8 errors, dataset cards."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.manifest import (
    IMAGE_COLUMNS,
    REQUIRED_COLUMNS,
    SEQUENCES,
    ManifestError,
    read_dataset_card,
    read_manifest,
)

ROWS = [
    {"study_id": "001", "subject_id": "007", "split": "train", "t1c": "img/a.nii.gz", "flair": "",
     "report": "Enhancing lesion in the left frontal lobe.", "diagnosis": "AD", "age": "71"},
    {"study_id": "002", "subject_id": "008", "split": "test", "t1c": "/data/b.nii.gz", "flair": "img/b_flair.nii.gz",
     "report": "", "diagnosis": "", "age": "64.5"},
]


def _write_all_formats(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(ROWS)
    paths = {fmt: folder / f"manifest.{fmt}" for fmt in ("csv", "tsv", "jsonl", "parquet")}
    frame.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["tsv"], index=False, sep="\t")
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    frame.to_parquet(paths["parquet"])
    return paths


def test_constants_channel_order():
    assert SEQUENCES == ("t1c", "t1", "t2", "flair")
    assert IMAGE_COLUMNS == ("t1c", "t1", "t2", "flair", "ct")
    assert set(REQUIRED_COLUMNS) >= {"study_id", "subject_id", "split"}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_read_manifest_formats(tmp_path, fmt):
    path = _write_all_formats(tmp_path)[fmt]
    df = read_manifest(path)

    assert list(df["study_id"]) == ["001", "002"]
    assert list(df["subject_id"]) == ["007", "008"]
    assert df.loc[0, "t1c"] == str(tmp_path / "img" / "a.nii.gz")
    assert df.loc[1, "t1c"] == "/data/b.nii.gz"
    assert df.loc[0, "flair"] is None
    assert df.loc[1, "flair"] == str(tmp_path / "img" / "b_flair.nii.gz")
    assert df.loc[1, "report"] == ""
    assert df.loc[0, "report"].startswith("Enhancing lesion")
    assert list(df["age"]) == [71.0, 64.5]
    assert df.loc[0, "diagnosis"] == "AD"
    assert pd.isna(df.loc[1, "diagnosis"])


def test_read_manifest_keeps_other_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("study_id,subject_id,split,t1c,report,site\nS1,P1,train,a.nii.gz,ok,Bern\n", encoding="utf-8")
    df = read_manifest(path)
    assert df.loc[0, "site"] == "Bern"


def test_read_manifest_jsonl_integer_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"study_id": 17, "subject_id": 3, "split": "val", "t1c": "x.nii.gz", "report": "r"}\n',
                    encoding="utf-8")
    df = read_manifest(path)
    assert df.loc[0, "study_id"] == "17"
    assert df.loc[0, "subject_id"] == "3"


def test_read_manifest_unknown_suffix(tmp_path):
    path = tmp_path / "manifest.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"manifest\.xlsx.*unknown manifest format.*\.csv"):
        read_manifest(path)


def test_read_manifest_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.csv")


def test_utf8_error_names_data_row(tmp_path):
    # Row 1 has a quoted report over three lines, so file line numbers and data rows differ.
    text = (
        b"study_id,subject_id,split,t1c,report\n"
        b'S1,P1,train,a.nii.gz,"Line one.\nLine two.\nLine three."\n'
    )
    text += "S2,P2,test,b.nii.gz,Lésion frontale.\n".encode("latin-1")
    path = tmp_path / "m.csv"
    path.write_bytes(text)

    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert info.value.row == 2
    assert info.value.column == "report"
    assert "line 5" in message
    assert "data row 2" in message
    assert "0xe9" in message
    assert "iconv" in message
    assert "LÃ©sion" not in message


def test_utf8_error_jsonl_row(tmp_path):
    path = tmp_path / "m.jsonl"
    good = b'{"study_id": "S1", "subject_id": "P1", "split": "train", "report": "ok"}\n\n'
    bad = '{"study_id": "S2", "subject_id": "P2", "split": "train", "report": "Lésion"}\n'.encode("latin-1")
    path.write_bytes(good + bad)
    with pytest.raises(ManifestError, match=r"line 3 \(data row 2\) is not valid UTF-8.*iconv") as info:
        read_manifest(path)
    assert info.value.row == 2


def test_jsonl_invalid_json_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"study_id": "S1"}\n{"study_id": \n', encoding="utf-8")
    with pytest.raises(ManifestError, match="line 2 is not valid JSON"):
        read_manifest(path)


def test_dataset_card_absent_and_present(tmp_path):
    manifest = tmp_path / "m.csv"
    assert read_dataset_card(manifest) == {}

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"diagnosis": ["AD", "CN"]}}), encoding="utf-8")
    assert read_dataset_card(manifest)["labels"] == {"diagnosis": ["AD", "CN"]}


@pytest.mark.parametrize("content", ['{"labels": {"diagnosis": "AD"}}', '{"labels": ', "[1, 2]"])
def test_dataset_card_invalid(tmp_path, content):
    (tmp_path / "dataset.json").write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError, match="dataset.json"):
        read_dataset_card(tmp_path / "m.csv")


def test_extra_fields_rejected(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("study_id,subject_id,split,report\nr1,s1,train,ok,EXTRA,MORE\n")

    with pytest.raises(ManifestError, match="as many fields as the header"):
        read_manifest(path)
