"""Suite runner: job records, failures, resume, interruption, pretraining and executors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from tiny_models import SLOW_ENV, make_cohort

from harness.cli import main
from harness.executors import RayExecutor
from harness.results import RECORD_FIELDS, read_per_sample, read_records
from harness.runner import run_suite

TESTS_DIR = Path(__file__).resolve().parent


def write_suite(folder: Path, manifest: Path, **overrides) -> Path:
    content = {
        "name": "unit",
        "datasets": {"tiny": {"manifest": str(manifest)}},
        "models": {
            "tiny": {"kind": "tiny", "seed": 0},
            "tiny-b": {"kind": "tiny", "seed": 1},
            "broken": {"kind": "tiny", "seed": 2, "fail": True},
        },
        "tasks": [{"task": "retrieval", "dataset": "tiny", "split": "test"}],
        "seeds": [0],
        "baseline": "tiny",
        "bootstrap": 50,
    }
    content.update(overrides)
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("runner-data"), n=8, seed=2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, manifest):
    """One run of the suite through the command line, shared by the checks below."""
    folder = tmp_path_factory.mktemp("run")
    suite = write_suite(folder, manifest)
    code = main(["run", str(suite), "--out", str(folder / "out")])
    return folder / "out", suite, code


def values(records) -> dict:
    return {(r.model, r.metric, r.seed): (r.value, r.ci_low, r.ci_high, r.p_value, r.delta_vs_baseline) for r in records}


def test_run_writes_records(finished_run):
    run_dir, _, code = finished_run
    records = read_records(run_dir)

    assert code == 1  # the broken model failed
    assert {r.model for r in records} == {"tiny", "tiny-b"}
    assert len(records) == 2 * 10
    for record in records:
        assert set(record.to_dict()) == set(RECORD_FIELDS)
        assert record.signature == f"retrieval/{record.metric}|boot:50|unit:subject|seed:0"
        assert (record.suite, record.dataset, record.split) == ("unit", "tiny", "test")
        assert record.baseline == "tiny"
        assert record.versions["torch"]
        assert len(record.job_hash) == 64
        assert len(record.config_hash) == 64
    assert len({r.config_hash for r in records}) == 1


def test_paired_comparison_against_baseline(finished_run):
    records = {(r.model, r.metric): r for r in read_records(finished_run[0])}
    for metric in ("i2t/R@1", "t2i/R@5", "i2t/MnR"):
        assert records[("tiny", metric)].p_value is None
        assert records[("tiny", metric)].delta_vs_baseline is None
        other = records[("tiny-b", metric)]
        assert 0.0 <= other.p_value <= 1.0
        assert other.delta_vs_baseline == pytest.approx(other.value - records[("tiny", metric)].value)
    median = records[("tiny-b", "i2t/MdR")]
    assert median.p_value is None  # a median has no per-sample form
    assert median.delta_vs_baseline == pytest.approx(median.value - records[("tiny", "i2t/MdR")].value)


def test_failed_job_is_recorded(finished_run):
    run_dir = finished_run[0]
    run = json.loads((run_dir / "run.json").read_text())
    failed = [job for job in run["jobs"] if job["status"] == "failed"]

    assert [job["name"] for job in failed] == ["retrieval/tiny/test broken seed 0"]
    error = json.loads((run_dir / "jobs" / failed[0]["hash"] / "error.json").read_text())
    assert error["type"] == "RuntimeError"
    assert "fail=True" in error["message"]
    assert "Traceback" in error["traceback"]
    assert not (run_dir / "jobs" / failed[0]["hash"] / "done.json").exists()
    assert run["finished"]
    assert run["suite_hash"]
    assert run["versions"]["torch"]


def test_job_folders_and_tables(finished_run):
    run_dir = finished_run[0]
    done = sorted(run_dir.glob("jobs/*/done.json"))
    assert len(done) == 2
    for marker in done:
        per_sample = read_per_sample(marker.parent)
        assert list(per_sample.columns) == ["pool", "study_id", "subject_id", "direction", "rank", "hit@1", "hit@5", "hit@10"]
        assert len(per_sample) == 16
        assert (marker.parent / "result.jsonl").is_file()
        assert (marker.parent / "job.json").is_file()
    markdown = (run_dir / "table.md").read_text()
    assert markdown.startswith("| Model | i2t/R@1 ↑")
    assert "\\toprule" in (run_dir / "table.tex").read_text()
    assert (run_dir / "table.csv").read_text().startswith("model,source,")


def test_resume_skips_done_jobs(finished_run):
    run_dir, suite, _ = finished_run
    before = values(read_records(run_dir))
    summary = run_suite(suite, run_dir)

    statuses = sorted((o.job.name, o.status) for o in summary.outcomes)
    assert statuses == [
        ("retrieval/tiny/test broken seed 0", "failed"),  # failed jobs are retried
        ("retrieval/tiny/test tiny seed 0", "cached"),
        ("retrieval/tiny/test tiny-b seed 0", "cached"),
    ]
    assert values(read_records(run_dir)) == before


def test_pretrain_and_adapter_stages(tmp_path, manifest):
    table = manifest.parent / "manifest.csv"
    suite = write_suite(
        tmp_path,
        manifest,
        datasets={"adapted": {"adapter": "generic", "table": str(table), "image_columns": ["t1c"], "subject_column": "subject_id", "split_column": "split"}},
        pretrain={"p": {"config": "tiny", "objective": "pva", "dataset": "adapted", "epochs": 3, "trainer": "tiny"}},
        models={"pretrained": {"kind": "tiny-checkpoint", "pretrain": "p"}},
        tasks=[{"task": "retrieval", "dataset": "adapted", "split": "test"}],
        baseline="pretrained",
    )
    first = run_suite(suite, tmp_path / "out")
    assert [(o.job.kind, o.status) for o in first.outcomes] == [("dataset", "done"), ("pretrain", "done"), ("eval", "done")]
    calls_file = tmp_path / "out" / "jobs" / first.outcomes[0].job.hash / "data" / "pretrain-calls.txt"
    assert calls_file.read_text() == "p\n"
    assert {r.model for r in first.records} == {"pretrained"}
    checkpoint = json.loads((tmp_path / "out" / "jobs" / first.outcomes[1].job.hash / "checkpoint" / "config.json").read_text())
    assert checkpoint["cache_dir"] == str(tmp_path / "out" / "cache" / "pretrain")

    second = run_suite(suite, tmp_path / "out")
    assert [o.status for o in second.outcomes] == ["cached", "cached", "cached"]
    assert calls_file.read_text() == "p\n"  # not pretrained again


def test_blocked_jobs_when_dataset_fails(tmp_path, manifest):
    suite = write_suite(
        tmp_path,
        manifest,
        datasets={"adapted": {"adapter": "generic", "table": str(tmp_path / "missing.csv"), "image_columns": ["t1c"]}},
        models={"tiny": {"kind": "tiny", "seed": 0}},
        tasks=[{"task": "retrieval", "dataset": "adapted", "split": "test"}],
    )
    summary = run_suite(suite, tmp_path / "out")
    assert [(o.job.kind, o.status) for o in summary.outcomes] == [("dataset", "failed"), ("eval", "blocked")]
    assert "dataset 'adapted' is not available" in summary.outcomes[1].error
    assert summary.records == []


def test_ray_executor_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'brat-harness\[ray\]'"):
        RayExecutor()


def test_ray_executor_runs_same_jobs(tmp_path, manifest, monkeypatch, finished_run):
    """A stand-in ``ray`` module that pickles each task's arguments, as Ray does."""
    calls = []
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.shutdown = lambda: calls.append(("shutdown", {}))
    fake.remote = lambda **options: (lambda fn: types.SimpleNamespace(remote=lambda *args: (fn, pickle.dumps(args))))
    fake.get = lambda future: future[0](*pickle.loads(future[1]))
    monkeypatch.setitem(sys.modules, "ray", fake)

    summary = run_suite(finished_run[1], tmp_path / "ray-out", executor="ray")
    assert [name for name, _ in calls] == ["init", "shutdown"]
    assert values(summary.records) == values(read_records(finished_run[0]))


@pytest.mark.slow
def test_killed_run_resumes_to_same_results(tmp_path, manifest):
    """SIGKILL a run after its first job finished; the restarted run gives the same results."""
    suite = write_suite(tmp_path, manifest, models={"tiny": {"kind": "tiny", "seed": 0}, "tiny-b": {"kind": "tiny", "seed": 1}}, seeds=[0, 1])
    reference = run_suite(suite, tmp_path / "uninterrupted")

    script = (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import tiny_models; "
        f"from harness.cli import main; sys.exit(main(['run', {str(suite)!r}, '--out', {str(tmp_path / 'killed')!r}]))"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, SLOW_ENV: "2"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "killed").glob("jobs/*/done.json")):
        assert process.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() < deadline, "no job finished within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (tmp_path / "killed" / "results.jsonl").exists()
    assert len(list((tmp_path / "killed").glob("jobs/*/done.json"))) < 4

    resumed = run_suite(suite, tmp_path / "killed")
    assert sum(o.status == "cached" for o in resumed.outcomes) >= 1
    assert values(resumed.records) == values(reference.records)


def test_split_leak_stops_run(tmp_path, manifest, capsys):
    import pandas as pd

    frame = pd.read_csv(manifest, dtype=str)
    first_subject = frame["subject_id"].iloc[0]
    other_split = next(split for split in ("train", "val", "test") if split != frame["split"].iloc[0])
    leaked = frame.copy()
    leaked.loc[len(leaked)] = {**frame.iloc[0].to_dict(), "study_id": "leak-1", "split": other_split}
    leaked_manifest = manifest.parent / "leaked.csv"
    leaked.to_csv(leaked_manifest, index=False)
    suite = write_suite(tmp_path, leaked_manifest)

    assert main(["run", str(suite), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert first_subject in error
    assert "No job was run" in error
    assert not (tmp_path / "out" / "jobs").exists() or not any((tmp_path / "out" / "jobs").glob("*/done.json"))
