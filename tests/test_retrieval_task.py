"""Retrieval task on the tiny real encoder, real preprocessing and the real scorers."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import TinyEncoder, make_cohort

from harness.cache import EmbeddingCache
from harness.extract import extract_embeddings
from harness.runner import load_eval_dataset
from harness.tasks import get_task

METRICS = [f"{d}/{m}" for d in ("i2t", "t2i") for m in ("R@1", "R@5", "R@10", "MnR", "MdR")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrieval")
    manifest = make_cohort(folder, n=12, seed=1, test_fraction=2 / 3)
    return load_eval_dataset("tiny", manifest)


@pytest.fixture()
def cache(tmp_path):
    return EmbeddingCache(tmp_path / "cache")


def oracle(dataset, cache, shift: int) -> TinyEncoder:
    """A tiny encoder whose report i embeds exactly like the views of test study ``i + shift``."""
    rows = dataset.split_rows("test")
    views = extract_embeddings(TinyEncoder(), rows.to_dict("records"), cache, reports=False, progress=False).views
    n = len(rows)
    table = {rows.loc[i, "report"]: views[(i + shift) % n] for i in range(n)}
    return TinyEncoder(text_table=table)


def by_name(output):
    return {m.metric: m for m in output.metrics}


def test_whole_split_metrics(dataset, cache):
    output = get_task("retrieval").run(TinyEncoder(), dataset, "test", {"n_resamples": 50}, 0, cache)
    metrics = by_name(output)

    assert sorted(metrics) == sorted(METRICS)
    per_sample = output.per_sample
    assert len(per_sample) == 2 * 8
    assert set(per_sample["direction"]) == {"i2t", "t2i"}
    assert per_sample["rank"].between(1, 8).all()
    assert (per_sample["hit@1"] == (per_sample["rank"] <= 1)).all()
    assert metrics["i2t/R@10"].value == 1.0  # 8 candidates: the match is always in the top 10
    for metric in metrics.values():
        assert metric.ci_low <= metric.value <= metric.ci_high or metric.metric.endswith("MdR")
        assert (metric.n, metric.n_units) == (8, 4)
    assert metrics["i2t/MnR"].higher_is_better is False
    assert metrics["i2t/R@5"].value == pytest.approx(per_sample.query("direction == 'i2t'")["hit@5"].mean())


def test_oracle_finds_every_match(dataset, cache):
    metrics = by_name(get_task("retrieval").run(oracle(dataset, cache, 0), dataset, "test", {"n_resamples": 50}, 0, cache))
    for direction in ("i2t", "t2i"):
        assert metrics[f"{direction}/R@1"].value == 1.0
        assert metrics[f"{direction}/MdR"].value == 1.0
        assert metrics[f"{direction}/MnR"].value == 1.0


def test_shifted_reports_miss_every_match(dataset, cache):
    output = get_task("retrieval").run(oracle(dataset, cache, 1), dataset, "test", {"n_resamples": 50}, 0, cache)
    metrics = by_name(output)
    assert metrics["i2t/R@1"].value == 0.0
    assert metrics["t2i/R@1"].value == 0.0
    assert (output.per_sample["rank"] >= 2).all()


def test_random_pools(dataset, cache):
    task = get_task("retrieval")
    params = {"pool_size": 4, "n_pools": 3, "n_resamples": 50}
    first = task.run(oracle(dataset, cache, 0), dataset, "test", params, 7, cache)
    again = task.run(oracle(dataset, cache, 0), dataset, "test", params, 7, cache)
    other = task.run(oracle(dataset, cache, 0), dataset, "test", params, 8, cache)

    per_sample = first.per_sample
    assert len(per_sample) == 3 * 4 * 2
    assert per_sample.groupby("pool")["study_id"].nunique().tolist() == [4, 4, 4]
    assert per_sample["rank"].max() <= 4
    assert by_name(first)["i2t/R@1"].value == 1.0
    assert per_sample["study_id"].tolist() == again.per_sample["study_id"].tolist()
    assert per_sample["study_id"].tolist() != other.per_sample["study_id"].tolist()
    assert set(per_sample["study_id"]) <= set(dataset.split_rows("test")["study_id"])


def test_scorer_override(dataset, cache):
    output = get_task("retrieval").run(TinyEncoder(), dataset, "test", {"scorer": "cosine", "n_resamples": 20}, 0, cache)
    assert output.info["scorer"] == "cosine"
    default = get_task("retrieval").run(TinyEncoder(), dataset, "test", {"n_resamples": 20}, 0, cache)
    assert default.info["scorer"] == "pva"


def test_sample_values_pair_by_query(dataset, cache):
    task = get_task("retrieval")
    output = task.run(TinyEncoder(), dataset, "test", {"n_resamples": 20}, 0, cache)
    values = task.sample_values(output.per_sample, "t2i/R@5").frame

    assert values["key"].is_unique
    assert len(values) == 8
    assert values["value"].mean() == pytest.approx(by_name(output)["t2i/R@5"].value)
    assert values["unit"].nunique() == 4
    assert task.sample_values(output.per_sample, "t2i/MdR") is None
    np.testing.assert_array_equal(task.sample_values(output.per_sample, "i2t/MnR").frame["value"], output.per_sample.query("direction == 'i2t'")["rank"])


def test_invalid_parameters(dataset, cache):
    task = get_task("retrieval")
    with pytest.raises(ValueError, match="pool_size 20 is larger than the split"):
        task.run(TinyEncoder(), dataset, "test", {"pool_size": 20}, 0, cache)
    with pytest.raises(ValueError, match="unknown parameter 'pools'"):
        task.run(TinyEncoder(), dataset, "test", {"pools": 2}, 0, cache)
    with pytest.raises(ValueError, match="has no split 'validation'"):
        task.run(TinyEncoder(), dataset, "validation", {}, 0, cache)
    assert task.check_params({"pool_size": 1}) == ["pool_size must be an integer >= 2 or null (got 1)"]
