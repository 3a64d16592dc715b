"""Result records: fields, signatures, JSONL round trip, per-sample files."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pandas as pd
import pytest

from harness.results import (
    RECORD_FIELDS,
    ResultRecord,
    format_signature,
    package_versions,
    read_per_sample,
    read_records,
    write_per_sample,
    write_records,
)

EXPECTED_FIELDS = {
    "run_id", "suite", "job_hash", "config_hash", "model", "model_digest", "task", "dataset", "split",
    "metric", "value", "ci_low", "ci_high", "ci_level", "n", "n_units", "seed", "higher_is_better",
    "signature", "baseline", "delta_vs_baseline", "p_value", "versions",
}


def make_record(**overrides) -> ResultRecord:
    values = dict(
        run_id="demo-1", suite="demo", job_hash="a" * 64, config_hash="b" * 64, model="brat-pva",
        model_digest="c" * 64, task="retrieval", dataset="cohort", split="test", metric="i2t/R@5",
        value=0.493, ci_low=0.451, ci_high=0.530, n=200, n_units=180, seed=0, higher_is_better=True,
        signature=format_signature("retrieval", "i2t/R@5", 1000, "subject", 0),
        baseline="clip", delta_vs_baseline=0.02, p_value=0.03, versions={"torch": "2.14.1"},
    )
    values.update(overrides)
    return ResultRecord(**values)


def test_record_has_every_field():
    assert set(RECORD_FIELDS) == EXPECTED_FIELDS
    assert set(make_record().to_dict()) == EXPECTED_FIELDS
    assert make_record().ci_level == 0.95


def test_signature_format():
    assert format_signature("retrieval", "i2t/R@5", 1000, "subject", 0) == "retrieval/i2t/R@5|boot:1000|unit:subject|seed:0"
    assert format_signature("retrieval", "t2i/MdR", 200, "subject", 3) == "retrieval/t2i/MdR|boot:200|unit:subject|seed:3"


def test_jsonl_round_trip(tmp_path):
    records = [make_record(), make_record(metric="t2i/MdR", value=3.0, higher_is_better=False, p_value=None)]
    write_records(tmp_path / "results.jsonl", records)

    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["signature"] == "retrieval/i2t/R@5|boot:1000|unit:subject|seed:0"
    assert read_records(tmp_path) == records  # a run folder reads its results.jsonl


def test_nan_written_as_null(tmp_path):
    write_records(tmp_path / "r.jsonl", [make_record(ci_low=math.nan)])
    assert json.loads((tmp_path / "r.jsonl").read_text())["ci_low"] is None


def test_invalid_line_names_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = json.dumps(make_record().to_dict())
    path.write_text(good + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 2"):
        read_records(path)


def test_missing_field_is_named(tmp_path):
    row = make_record().to_dict()
    del row["metric"]
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="metric"):
        read_records(tmp_path / "results.jsonl")


def test_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        read_records(tmp_path)


def test_per_sample_parquet_round_trip(tmp_path):
    frame = pd.DataFrame({"study_id": ["s1", "s2"], "subject_id": ["p1", "p1"], "rank": [1, 7], "hit@5": [1, 0]})
    path = write_per_sample(tmp_path, frame)
    assert path.name == "per_sample.parquet"
    pd.testing.assert_frame_equal(read_per_sample(tmp_path), frame)


def test_per_sample_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    frame = pd.DataFrame({"study_id": ["s1", "s2"], "rank": [1, 7]})
    path = write_per_sample(tmp_path, frame)
    assert path.name == "per_sample.jsonl.gz"
    assert read_per_sample(tmp_path).to_dict("list") == {"study_id": ["s1", "s2"], "rank": [1, 7]}


def test_package_versions():
    import torch

    versions = package_versions(("torch", "no-such-distribution-xyz"))
    assert torch.__version__.startswith(versions["torch"].split("+")[0])
    assert versions["no-such-distribution-xyz"] is None


def test_from_dict_ignores_unknown_keys():
    row = dict(make_record().to_dict(), extra_column="kept elsewhere")
    assert ResultRecord.from_dict(row) == make_record()
    assert dataclasses.asdict(make_record())["value"] == 0.493
