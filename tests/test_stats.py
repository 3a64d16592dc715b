"""Tests for harness.stats."""

from __future__ import annotations

import numpy as np
import pytest

from harness.stats import CI, aggregate_seeds, bootstrap_ci, paired_test, signature


def test_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, size=50)
    large = rng.normal(1.0, 1.0, size=2000)
    small_ci = bootstrap_ci(small, seed=0)
    large_ci = bootstrap_ci(large, seed=0)
    assert small_ci.low < small_ci.value < small_ci.high
    assert small_ci.value == pytest.approx(small.mean())
    assert large_ci.low < large_ci.value < large_ci.high
    # Width scales as 1 / sqrt(n): about sqrt(40) = 6.3 times narrower.
    assert (large_ci.high - large_ci.low) < (small_ci.high - small_ci.low) / 3


def test_constant_sample_zero_width():
    ci = bootstrap_ci(np.full(30, 0.4), units=np.repeat(np.arange(10), 3))
    assert ci == CI(value=pytest.approx(0.4), low=pytest.approx(0.4), high=pytest.approx(0.4), n=30, n_units=10)
    assert ci.high - ci.low == pytest.approx(0.0, abs=1e-15)


def test_cluster_bootstrap_wider_for_correlated_studies():
    # 20 subjects with 5 studies each. All studies of a subject share the subject's value,
    # so there are only 20 independent observations, not 100.
    rng = np.random.default_rng(1)
    subject_values = rng.normal(0.0, 1.0, size=20)
    values = np.repeat(subject_values, 5)
    subjects = np.repeat([f"sub-{i:02d}" for i in range(20)], 5)
    study_ci = bootstrap_ci(values, units=None, n_resamples=2000, seed=0)
    subject_ci = bootstrap_ci(values, units=subjects, n_resamples=2000, seed=0)
    assert subject_ci.n_units == 20
    assert study_ci.n_units == 100
    # Expected width ratio sqrt(5) = 2.24.
    ratio = (subject_ci.high - subject_ci.low) / (study_ci.high - study_ci.low)
    assert 1.7 < ratio < 2.8


def test_one_unit_per_sample_equals_no_units():
    values = np.random.default_rng(2).random(40)
    assert bootstrap_ci(values, units=np.arange(40), seed=3) == bootstrap_ci(values, units=None, seed=3)


def test_generic_statistic_path_matches_vectorised_mean():
    rng = np.random.default_rng(4)
    values = rng.random(60)
    units = rng.integers(0, 15, size=60)
    fast = bootstrap_ci(values, units, n_resamples=300, seed=5)
    generic = bootstrap_ci(values, units, statistic=lambda x: float(np.mean(x)), n_resamples=300, seed=5)
    assert generic.value == pytest.approx(fast.value)
    assert generic.low == pytest.approx(fast.low, abs=1e-12)
    assert generic.high == pytest.approx(fast.high, abs=1e-12)


def test_generic_statistic_median():
    values = np.arange(1.0, 12.0)
    ci = bootstrap_ci(values, statistic=np.median, n_resamples=200, seed=0)
    assert ci.value == 6.0
    assert ci.low <= 6.0 <= ci.high
    assert ci.low >= 1.0
    assert ci.high <= 11.0


def test_bootstrap_deterministic_by_seed():
    values = np.random.default_rng(6).random(25)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_bootstrap_invalid_inputs():
    with pytest.raises(ValueError, match="per_sample_values contains 1 NaN"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"units must have shape \(3,\)"):
        bootstrap_ci([0.1, 0.2, 0.3], units=["a", "b"])
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_ci([0.1, 0.2], confidence=95)
    with pytest.raises(ValueError, match="n_resamples must be a positive int"):
        bootstrap_ci([0.1, 0.2], n_resamples=0)


def test_paired_clear_difference_small_p():
    rng = np.random.default_rng(8)
    b = rng.random(60)
    a = b + 0.2 + rng.normal(0, 0.02, size=60)
    units = np.repeat(np.arange(30), 2)
    for method in ("permutation", "bootstrap"):
        result = paired_test(a, b, units, n_resamples=999, seed=0, method=method)
        assert result.p_value == pytest.approx(1 / 1000), method
        assert result.low < result.delta < result.high
        assert result.low > 0.15
        assert result.n_units == 30


def test_paired_identical_inputs_large_p():
    values = np.random.default_rng(9).random(40)
    for method in ("permutation", "bootstrap"):
        result = paired_test(values, values.copy(), n_resamples=500, seed=0, method=method)
        assert result.delta == 0.0
        assert result.p_value > 0.2
        assert result.low == result.high == 0.0


def test_paired_noise_only_large_p():
    rng = np.random.default_rng(10)
    a = rng.normal(0, 1, size=80)
    b = a + rng.normal(0, 0.1, size=80) - rng.normal(0, 0.1, size=80)
    result = paired_test(a, b, n_resamples=2000, seed=0)
    assert result.p_value > 0.2
    assert result.low < 0 < result.high


def test_paired_permutation_flips_whole_subjects():
    # Two subjects with 50 studies each, all differences +1. Flipping whole subjects gives
    # |T*| equal to the observed value half of the time, so the test cannot reject.
    a = np.ones(100)
    b = np.zeros(100)
    subjects = np.repeat(["sub-a", "sub-b"], 50)
    by_subject = paired_test(a, b, subjects, n_resamples=1000, seed=0)
    by_study = paired_test(a, b, None, n_resamples=1000, seed=0)
    assert by_subject.p_value > 0.4
    assert by_study.p_value == pytest.approx(1 / 1001)


def test_paired_deterministic_and_validated():
    rng = np.random.default_rng(11)
    a, b = rng.random(30), rng.random(30)
    assert paired_test(a, b, seed=1) == paired_test(a, b, seed=1)
    with pytest.raises(ValueError, match="must be aligned"):
        paired_test(a, b[:10])
    with pytest.raises(ValueError, match="method must be"):
        paired_test(a, b, method="t-test")


def test_aggregate_seeds():
    assert aggregate_seeds([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert aggregate_seeds([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="values must be a non-empty"):
        aggregate_seeds([])


def test_signature_format():
    assert signature("retrieval", "i2t/R@5", 1000, "subject", 0) == "retrieval/i2t/R@5|boot:1000|unit:subject|seed:0"
    with_extra = signature("retrieval", "t2i/R@1", 500, "subject", 2, scorer="pva", block=128)
    assert with_extra == "retrieval/t2i/R@1|boot:500|unit:subject|seed:2|block:128|scorer:pva"
    with pytest.raises(ValueError, match=r"contain no '\|'"):
        signature("retrieval", "a|b", 1000, "subject", 0)
