"""Embedding cache and streaming extraction on real NIfTI files and the real preprocessing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TEST_SPEC, TinyEncoder, make_cohort

from harness.cache import DigestIndex, EmbeddingCache, StudyEmbedding
from harness.extract import extract_embeddings
from harness.manifest import read_manifest
from harness.preprocessing import get_spec

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("cohort")
    return read_manifest(make_cohort(folder, n=6)).to_dict("records")


def test_second_run_recomputes_nothing(tmp_path, cohort):
    encoder = TinyEncoder()
    first = extract_embeddings(encoder, cohort, EmbeddingCache(tmp_path), progress=False)
    assert encoder.images_encoded == 6
    assert encoder.reports_encoded == 6

    cache = EmbeddingCache(tmp_path)
    second = extract_embeddings(encoder, cohort, cache, progress=False)
    assert encoder.images_encoded == 6  # unchanged: everything came from the cache
    assert encoder.reports_encoded == 6
    assert (cache.stats.study_hits, cache.stats.study_misses) == (6, 0)
    assert (cache.stats.report_hits, cache.stats.report_misses) == (6, 0)
    np.testing.assert_array_equal(first.views, second.views)
    assert first.views.shape == (6, 4, 16)
    assert first.pooled.shape == (6, 16)
    assert first.attention.shape[:2] == (6, 4)
    assert [s.shape[0] for s in second.sentences] == [2] * 6
    assert second.study_ids == [row["study_id"] for row in cohort]


def test_changed_model_or_spec_recomputes(tmp_path, cohort):
    extract_embeddings(TinyEncoder(seed=0), cohort, EmbeddingCache(tmp_path), progress=False)

    other_weights = TinyEncoder(seed=1)
    extract_embeddings(other_weights, cohort, EmbeddingCache(tmp_path), progress=False)
    assert other_weights.images_encoded == 6
    assert other_weights.reports_encoded == 6

    same_weights = TinyEncoder(seed=0)
    cache = EmbeddingCache(tmp_path)
    extract_embeddings(same_weights, cohort, cache, spec=get_spec("test-tiny-b"), progress=False)
    assert same_weights.images_encoded == 6  # same model digest, new spec digest
    assert same_weights.reports_encoded == 0  # report embeddings do not depend on the spec
    assert cache.stats.report_hits == 6


def test_changed_image_file_recomputes_only_that_study(tmp_path, cohort):
    rows = [dict(row) for row in cohort]
    encoder = TinyEncoder()
    extract_embeddings(encoder, rows, EmbeddingCache(tmp_path), progress=False)

    import nibabel as nib

    image = nib.load(rows[2]["t1c"])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2.0 + 5.0, image.affine), rows[2]["t1c"])
    extract_embeddings(encoder, rows, EmbeddingCache(tmp_path), progress=False)
    assert encoder.images_encoded == 7


def test_worker_processes_give_same_embeddings(tmp_path, cohort):
    in_process = extract_embeddings(TinyEncoder(), cohort, EmbeddingCache(tmp_path / "a", batch_size=4, workers=0), progress=False)
    workers = extract_embeddings(TinyEncoder(), cohort, EmbeddingCache(tmp_path / "b", batch_size=4, workers=2), progress=False)
    np.testing.assert_allclose(in_process.views, workers.views, rtol=1e-5, atol=1e-6)


def test_entry_layout(tmp_path, cohort):
    encoder = TinyEncoder()
    cache = EmbeddingCache(tmp_path)
    extract_embeddings(encoder, cohort[:1], cache, progress=False)
    digest = cache.image_digest({"t1c": cohort[0]["t1c"]})
    expected = tmp_path / encoder.digest[:16] / TEST_SPEC.digest[:12] / f"study000-{digest[:12]}.safetensors"
    assert expected.is_file()
    assert len(list((tmp_path / encoder.digest[:16] / "reports").glob("*.safetensors"))) == 1


def test_digest_index_memoises(tmp_path):
    path = tmp_path / "volume.bin"
    path.write_bytes(b"x" * 1000)
    index = DigestIndex(tmp_path / "index.json")
    first = index.digest(path)
    index.digest(path)
    assert index.hashed == 1
    index.flush()

    reopened = DigestIndex(tmp_path / "index.json")
    assert reopened.digest(path) == first
    assert reopened.hashed == 0  # read from the index file

    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(1, 1))  # new content and modification time
    assert reopened.digest(path) != first
    assert reopened.hashed == 1


def test_killed_write_leaves_no_entry(tmp_path):
    """A process killed in the middle of writing an entry leaves only a hidden temporary file."""
    script = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        import safetensors.numpy
        import harness.cache as cache_module

        def half_write(tensors, filename, metadata=None):
            with open(filename, "wb") as handle:
                handle.write(b"partial-bytes")
                handle.flush()
            os._exit(9)  # like SIGKILL: no cleanup handlers run

        cache_module.save_file = half_write
        cache = cache_module.EmbeddingCache({str(tmp_path)!r})
        entry = cache_module.StudyEmbedding(np.ones((2, 4), np.float32), np.ones(4, np.float32))
        cache.save_study("m" * 64, "s" * 64, "study-1", "i" * 64, entry)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr

    cache = EmbeddingCache(tmp_path)
    assert cache.entries() == []
    assert cache.load_study("m" * 64, "s" * 64, "study-1", "i" * 64) is None
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".study-1")

    entry = StudyEmbedding(np.ones((2, 4), np.float32), np.ones(4, np.float32))
    cache.save_study("m" * 64, "s" * 64, "study-1", "i" * 64, entry)
    np.testing.assert_array_equal(cache.load_study("m" * 64, "s" * 64, "study-1", "i" * 64).views, entry.views)


@pytest.mark.slow
def test_concurrent_extraction_is_consistent(tmp_path, cohort):
    """Two processes fill one cache at the same time; the result is complete and readable."""
    manifest_rows = tmp_path / "rows.json"
    manifest_rows.write_text(json.dumps(cohort))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from tiny_models import TinyEncoder
        from harness.cache import EmbeddingCache
        from harness.extract import extract_embeddings
        rows = json.load(open({str(manifest_rows)!r}))
        encoder = TinyEncoder()
        extract_embeddings(encoder, rows, EmbeddingCache({str(tmp_path / "cache")!r}, batch_size=1), progress=False)
        print(encoder.images_encoded)
        """
    )
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]

    cache = EmbeddingCache(tmp_path / "cache")
    encoder = TinyEncoder()
    result = extract_embeddings(encoder, cohort, cache, progress=False)
    assert encoder.images_encoded == 0
    assert cache.stats.study_hits == 6
    assert len(cache.entries(encoder.digest)) == 6 + 6  # studies + reports
    index = json.loads((tmp_path / "cache" / "file-digests.json").read_text())
    assert sorted(index) == sorted(str(Path(row["t1c"]).resolve()) for row in cohort)
    alone = extract_embeddings(TinyEncoder(), cohort, EmbeddingCache(tmp_path / "fresh"), progress=False)
    np.testing.assert_allclose(result.views, alone.views, rtol=1e-6)


def test_extract_command(tmp_path, cohort, capsys):
    import pandas as pd

    from harness.cli import main

    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(cohort).to_csv(manifest, index=False)
    arguments = ["extract", "--model", "tiny:seed=3", "--manifest", str(manifest), "--out", str(tmp_path / "cache"), "--workers", "0", "--no-progress"]

    assert main(arguments) == 0
    assert "6 computed; reports: 0 from cache, 6 computed" in capsys.readouterr().out
    assert main(arguments + ["--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 studies")
    assert "6 from cache, 0 computed; reports: 6 from cache, 0 computed" in out


def test_model_argument_parsing():
    from harness.commands.extract import parse_model

    assert parse_model("brat:/ckpt/brat-tiny", []) == ("brat", {"path": "/ckpt/brat-tiny"})
    assert parse_model("brat-random:brat-tiny", ["seed=3"]) == ("brat-random", {"config": "brat-tiny", "seed": 3})
    assert parse_model("tiny:seed=1,dim=8", []) == ("tiny", {"seed": 1, "dim": 8})
    with pytest.raises(ValueError, match="write tiny:KEY=VALUE"):
        parse_model("tiny:something", [])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_model("tiny", ["seed"])
