"""Tests for the image-report scorers in harness.scoring."""

from __future__ import annotations

import math

import pytest
import torch

from harness.scoring import (
    SCORERS,
    colbert_score,
    colbert_score_blocked,
    cosine_score,
    cosine_score_blocked,
    pad_sentences,
    pva_score,
    pva_score_blocked,
)


def reference_pva(matrix: list[list[float]]) -> tuple[float, list[tuple[int, int]]]:
    """Score one pair's ``Q x S`` similarity matrix with a plain-Python greedy matching.

    Returns the score and the matched ``(row, column)`` pairs in selection order.
    """
    n_rows, n_columns = len(matrix), len(matrix[0])
    used_rows: set[int] = set()
    used_columns: set[int] = set()
    matches = []
    for _ in range(min(n_rows, n_columns)):
        best = None
        for row in range(n_rows):
            for column in range(n_columns):
                if row in used_rows or column in used_columns:
                    continue
                # Strict ">" while scanning row-major keeps the lowest row, then column.
                if best is None or matrix[row][column] > matrix[best[0]][best[1]]:
                    best = (row, column)
        matches.append(best)
        used_rows.add(best[0])
        used_columns.add(best[1])
    return sum(matrix[r][c] for r, c in matches) / len(matches), matches


def pair_matrix(views: torch.Tensor, sentences: torch.Tensor, mask: torch.Tensor) -> list:
    """Return the ``Q x S_valid`` similarity matrix of one pair as nested lists."""
    return (views.double() @ sentences[mask].double().T).tolist()


def test_pva_two_by_two_hand_value():
    # M = [[0.9, 0.8], [0.1, 0.2]]: 0.9 at (0, 0) first, then (1, 1) = 0.2 is all that is left.
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sentences = torch.tensor([[[0.9, 0.1], [0.8, 0.2]]])
    score = pva_score(views, sentences)
    assert score.shape == (1, 1)
    assert score.item() == pytest.approx(0.55, abs=1e-6)


def test_pva_greedy_not_optimal_assignment():
    # Greedy takes 0.9 first and is left with 0.0, but the optimal assignment would give 0.8 + 0.8.
    views = torch.eye(2)[None]
    sentences = torch.tensor([[[0.9, 0.8], [0.8, 0.0]]]).transpose(1, 2)
    assert pva_score(views, sentences).item() == pytest.approx(0.45, abs=1e-6)


def test_pva_ties_lowest_row_then_column():
    # M = [[1, 1, 0], [1, 0.5, 0.2]]. All three 1s tie and (0, 0) wins, which leaves row 1 with
    # columns 1 and 2, so the second pick is 0.5: score 0.75. Picking (0, 1) first would
    # give (1 + 1) / 2 = 1.0, and picking (1, 0) first would also give 1.0.
    views = torch.eye(2)[None]
    matrix = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 0.2]])
    sentences = matrix.T[None]
    assert pva_score(views, sentences).item() == pytest.approx(0.75, abs=1e-6)
    expected, matches = reference_pva(matrix.tolist())
    assert matches == [(0, 0), (1, 1)]
    assert expected == pytest.approx(0.75)


def test_pva_ties_column_order_within_row():
    # Row 0 ties at columns 1 and 2. Column 1 wins, which leaves row 1 with column 0 (0.3)
    # or column 2 (0.6): 0.6 is taken, score (1 + 0.6) / 2 = 0.8.
    # Picking column 2 first would leave 0.3 or 0.4 and give 0.7.
    views = torch.eye(2)[None]
    matrix = torch.tensor([[0.0, 1.0, 1.0], [0.3, 0.4, 0.6]])
    sentences = matrix.T[None]
    assert pva_score(views, sentences).item() == pytest.approx(0.8, abs=1e-6)


def test_pva_more_sentences_than_views():
    # Q = 1: a single pick, the largest entry.
    views = torch.tensor([[[1.0, 0.0]]])
    sentences = torch.tensor([[[0.2, 0.0], [0.7, 0.0], [0.5, 0.0]]])
    assert pva_score(views, sentences).item() == pytest.approx(0.7, abs=1e-6)


def test_pva_more_views_than_sentences():
    # Q = 3, S = 1: one pick, the best view for the single sentence.
    views = torch.tensor([[[0.1, 0.0], [0.0, 1.0], [0.6, 0.0]]])
    sentences = torch.tensor([[[1.0, 0.0]]])
    assert pva_score(views, sentences).item() == pytest.approx(0.6, abs=1e-6)


def test_pva_padding_ignored():
    views = torch.eye(3)[None]
    real = torch.tensor([[0.5, 0.1, 0.0], [0.2, 0.9, 0.0]])
    padding = torch.full((2, 3), 10.0)
    sentences = torch.cat([real, padding])[None]
    mask = torch.tensor([[True, True, False, False]])
    # M over real sentences = [[0.5, 0.2], [0.1, 0.9], [0, 0]]: 0.9, then 0.5.
    assert pva_score(views, sentences, mask).item() == pytest.approx(0.7, abs=1e-6)
    unpadded = pva_score(views, real[None])
    assert torch.equal(pva_score(views, sentences, mask), unpadded)


def test_pva_padding_with_nan_ignored():
    views = torch.eye(2)[None]
    sentences = torch.tensor([[[0.4, 0.3], [float("nan"), float("nan")]]])
    mask = torch.tensor([[True, False]])
    assert pva_score(views, sentences, mask).item() == pytest.approx(0.4, abs=1e-6)


def test_pva_mask_not_a_prefix():
    views = torch.eye(2)[None]
    sentences = torch.tensor([[[9.0, 9.0], [0.4, 0.3], [9.0, 9.0], [0.1, 0.8]]])
    mask = torch.tensor([[False, True, False, True]])
    # M over real sentences = [[0.4, 0.1], [0.3, 0.8]]: 0.8, then 0.4.
    assert pva_score(views, sentences, mask).item() == pytest.approx(0.6, abs=1e-6)


@pytest.mark.parametrize(
    ("n_images", "n_reports", "n_views", "n_slots", "dim"),
    [(3, 4, 2, 5, 4), (2, 5, 6, 3, 8), (4, 4, 4, 4, 3), (1, 3, 1, 7, 5), (5, 2, 8, 1, 6)],
)
def test_pva_matches_reference(n_images, n_reports, n_views, n_slots, dim):
    generator = torch.Generator().manual_seed(n_images * 100 + n_views * 10 + n_slots)
    views = torch.randn(n_images, n_views, dim, generator=generator, dtype=torch.float64)
    sentences = torch.randn(n_reports, n_slots, dim, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, n_slots + 1, (n_reports,), generator=generator)
    mask = torch.arange(n_slots)[None, :] < lengths[:, None]

    scores = pva_score(views, sentences, mask)
    assert scores.shape == (n_images, n_reports)
    for i in range(n_images):
        for r in range(n_reports):
            expected, _ = reference_pva(pair_matrix(views[i], sentences[r], mask[r]))
            assert scores[i, r].item() == pytest.approx(expected, abs=1e-12), (i, r)


def test_pva_matches_reference_with_many_ties():
    # Entries drawn from {0, 0.5, 1} make ties the rule rather than the exception.
    generator = torch.Generator().manual_seed(7)
    views = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    sentences = torch.randint(0, 3, (5, 6, 4), generator=generator).double() / 2
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1, 4:] = False
    scores = pva_score(views, sentences, mask)
    for i in range(3):
        for r in range(5):
            expected, _ = reference_pva(pair_matrix(views[i], sentences[r], mask[r]))
            assert scores[i, r].item() == pytest.approx(expected, abs=1e-12), (i, r)


def test_pva_blocked_equals_unblocked():
    generator = torch.Generator().manual_seed(3)
    views = torch.nn.functional.normalize(torch.randn(23, 5, 8, generator=generator), dim=-1)
    sentences = torch.nn.functional.normalize(torch.randn(17, 6, 8, generator=generator), dim=-1)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (17,), generator=generator)[:, None]
    full = pva_score(views, sentences, mask)
    for block_size in (1, 4, 7, 64):
        blocked = pva_score_blocked(views, sentences, mask, block_size=block_size)
        torch.testing.assert_close(blocked, full, rtol=0, atol=1e-6)
        assert not blocked.requires_grad


def test_pva_gradient_only_at_selected_entries():
    # M = [[0.9, 0.8, 0.0], [0.1, 0.2, 0.3]] is built from identity views, so the gradient
    # of the score with respect to the sentences equals dScore/dM transposed.
    views = torch.eye(2)[None]
    matrix = torch.tensor([[0.9, 0.8, 0.0], [0.1, 0.2, 0.3]])
    sentences = matrix.T[None].clone().requires_grad_(True)
    pva_score(views, sentences).sum().backward()
    gradient = sentences.grad[0].T  # (Q, S), dScore/dM
    expected = torch.zeros(2, 3)
    expected[0, 0] = 0.5  # 0.9 is picked first
    expected[1, 2] = 0.5  # then 0.3, the best of row 1 outside column 0
    torch.testing.assert_close(gradient, expected)


def test_pva_gradient_reaches_views():
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(3, 4, 6, generator=generator, requires_grad=True)
    sentences = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    pva_score(views, sentences, mask).sum().backward()
    assert torch.isfinite(views.grad).all()
    assert views.grad.abs().sum() > 0
    assert torch.equal(sentences.grad[1, 2:], torch.zeros(3, 6))


def test_pva_empty_report_names_index():
    views = torch.randn(2, 3, 4)
    sentences = torch.randn(3, 2, 4)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    with pytest.raises(ValueError, match="report 2 has no sentences"):
        pva_score(views, sentences, mask)


@pytest.mark.parametrize(
    ("views", "sentences", "mask", "message"),
    [
        (torch.randn(2, 4), torch.randn(2, 3, 4), None, "views must have shape"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 5), None, "D=4 but sentences have D=5"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 2, dtype=torch.bool), "sentence_mask must have shape"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3), "must be a bool tensor"),
        (torch.full((1, 1, 2), float("nan")), torch.randn(1, 1, 2), None, "views contains NaN"),
    ],
)
def test_scorers_reject_invalid_inputs(views, sentences, mask, message):
    for scorer in (pva_score, colbert_score, cosine_score):
        with pytest.raises(ValueError, match=message):
            scorer(views, sentences, mask)


def test_colbert_hand_value():
    # M = [[0.9, 0.1, 0.4], [0.2, 0.6, 0.5]] has column maxima 0.9, 0.6 and (masked) 0.5.
    views = torch.eye(2)[None]
    sentences = torch.tensor([[0.9, 0.1, 0.4], [0.2, 0.6, 0.5]]).T[None]
    mask = torch.tensor([[True, True, False]])
    assert colbert_score(views, sentences, mask).item() == pytest.approx(0.75, abs=1e-6)
    assert colbert_score(views, sentences).item() == pytest.approx(2.0 / 3.0, abs=1e-6)


def test_cosine_hand_value():
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sentences = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    # Mean view (0.5, 0.5) normalised against (1, 0): cos 45 degrees.
    assert cosine_score(views, sentences, mask).item() == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_cosine_single_view_is_plain_cosine():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 8, generator=generator)
    reports = torch.randn(3, 1, 8, generator=generator)
    expected = torch.nn.functional.cosine_similarity(images, reports.transpose(0, 1), dim=-1)
    torch.testing.assert_close(cosine_score(images, reports), expected)


def test_blocked_scorers_equal_unblocked():
    generator = torch.Generator().manual_seed(5)
    views = torch.randn(9, 3, 4, generator=generator)
    sentences = torch.randn(11, 5, 4, generator=generator)
    mask = torch.arange(5)[None, :] < torch.randint(1, 6, (11,), generator=generator)[:, None]
    pairs = [(colbert_score, colbert_score_blocked), (cosine_score, cosine_score_blocked)]
    for plain, blocked in pairs:
        torch.testing.assert_close(blocked(views, sentences, mask, block_size=4), plain(views, sentences, mask))


def test_scorer_registry_names_and_signature():
    assert SCORERS.names() == ["colbert", "cosine", "pva"]
    views = torch.randn(3, 2, 4)
    sentences, mask = pad_sentences([torch.randn(2, 4), torch.randn(1, 4)])
    for name in SCORERS:
        scores = SCORERS.get(name)(views, sentences, mask, 2)
        assert scores.shape == (3, 2), name
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        SCORERS.get("pva")(views, sentences, mask, 0)


def test_pad_sentences_shapes_and_mask():
    first, second = torch.randn(3, 4), torch.randn(1, 4)
    padded, mask = pad_sentences([first, second, torch.zeros(0, 4)])
    assert padded.shape == (3, 3, 4)
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert torch.equal(padded[0], first)
    assert torch.equal(padded[1, 0], second[0])
    assert torch.equal(padded[1, 1:], torch.zeros(2, 4))


def test_pad_sentences_rejects_mismatched_dimension():
    with pytest.raises(ValueError, match=r"sentences\[1\] has D=5"):
        pad_sentences([torch.randn(2, 4), torch.randn(2, 5)])
    with pytest.raises(ValueError, match="sentences is empty"):
        pad_sentences([])
