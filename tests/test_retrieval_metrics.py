"""Tests for tasks.retrieval.metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.retrieval.metrics import (
    mean_rank,
    median_rank,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
)


def test_constant_matrix_ranks_last():
    scores = torch.zeros(5, 5)
    assert retrieval_ranks(scores).tolist() == [5] * 5
    result = retrieval_metrics(scores)
    assert result.values["i2t/R@1"] == 0.0
    assert result.values["t2i/R@1"] == 0.0
    assert result.values["i2t/MdR"] == 5.0
    assert result.values["i2t/R@5"] == 1.0


def test_identity_matrix_perfect_recall():
    result = retrieval_metrics(torch.eye(12))
    for direction in ("i2t", "t2i"):
        assert result.values[f"{direction}/R@1"] == 1.0
        assert result.values[f"{direction}/MdR"] == 1.0
        assert result.values[f"{direction}/MnR"] == 1.0
        assert result.per_query[f"{direction}/rank"].tolist() == [1] * 12


def test_ties_count_against_model():
    scores = torch.tensor(
        [
            [0.5, 0.5, 0.1],  # tie with column 1: rank 2
            [0.2, 0.7, 0.9],  # column 2 is higher: rank 2
            [0.3, 0.3, 0.3],  # three-way tie: rank 3
        ]
    )
    assert retrieval_ranks(scores).tolist() == [2, 2, 3]
    # Columns as queries: column 0 -> [0.5, 0.2, 0.3] rank 1, column 1 -> [0.5, 0.7, 0.3]
    # rank 1, column 2 -> [0.1, 0.9, 0.3] rank 2.
    result = retrieval_metrics(scores, ks=(1, 2))
    assert result.per_query["t2i/rank"].tolist() == [1, 1, 2]
    assert result.values["i2t/R@1"] == 0.0
    assert result.values["i2t/R@2"] == pytest.approx(2 / 3)
    assert result.values["t2i/R@1"] == pytest.approx(2 / 3)
    assert result.values["i2t/MnR"] == pytest.approx(7 / 3)
    assert result.per_query["i2t/hit@2"].tolist() == [1.0, 1.0, 0.0]


def test_positives_index_vector():
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.2], [0.8, 0.3, 0.1, 0.0]])
    positives = torch.tensor([1, 3])
    assert retrieval_ranks(scores, positives).tolist() == [1, 4]
    result = retrieval_metrics(scores, positives, ks=(1,))
    # Report 1 queries the studies with scores [0.9, 0.3]: rank 1.
    # Report 3 queries them with [0.2, 0.0], and its study is row 1: rank 2.
    assert result.per_query["t2i/rank"].tolist() == [1, 2]


def test_positives_must_be_distinct():
    with pytest.raises(ValueError, match="positives must be distinct"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([1, 1]))


def test_nan_scores_rejected():
    scores = torch.eye(3)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="scores contains 1 NaN"):
        retrieval_ranks(scores)
    with pytest.raises(ValueError, match="scores contains 1 NaN"):
        retrieval_metrics(scores)


def test_invalid_arguments_named():
    with pytest.raises(ValueError, match="positives must index columns 0..2"):
        retrieval_ranks(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="Pass positives"):
        retrieval_ranks(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="k must be a positive int"):
        recall_at_k([1, 2], 0)
    with pytest.raises(ValueError, match="ranks start at 1"):
        mean_rank([0, 1])


def test_summary_functions_hand_values():
    ranks = torch.tensor([1, 4, 2, 10])
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 4) == 0.75
    assert median_rank(ranks) == 3.0
    assert mean_rank(ranks) == 4.25
    assert median_rank(np.array([5, 1, 3])) == 3.0


def test_random_scores_match_sorting_reference():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 40, generator=generator)
    ranks = retrieval_ranks(scores)
    order = torch.argsort(scores, dim=1, descending=True)
    expected = (order == torch.arange(40)[:, None]).float().argmax(dim=1) + 1
    assert torch.equal(ranks, expected)
