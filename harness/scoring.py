"""Image-report scores from view embeddings and sentence embeddings.

Every scorer takes the views of ``N_i`` studies, ``views (N_i, Q, D)``, and the padded
sentence embeddings of ``N_r`` reports, ``sentences (N_r, S, D)`` with
``sentence_mask (N_r, S)`` (True marks a real sentence), and returns a score matrix
``(N_i, N_r)``. Entry ``[i, r]`` scores study ``i`` against report ``r``.

The inputs are used as given. The encoder interface returns L2-normalised views and
sentence embeddings, so the similarity matrix ``M = V F^T`` of one pair contains cosine
similarities. Only :func:`cosine_score` normalises, because it averages first.

- :func:`pva_score` (Pairwise View Alignment): a greedy one-to-one matching of views
  to sentences on ``M``, averaged over the matched pairs.
- :func:`colbert_score`: for each sentence the best view, averaged over sentences.
- :func:`cosine_score`: the mean view against the mean sentence.

The plain functions keep gradients and suit training batches. The ``*_blocked``
variants compute large matrices under ``torch.no_grad`` in blocks of
``block_size x block_size`` pairs, so memory is bounded by the block, not by
``N_i * N_r * Q * S``. :data:`SCORERS` maps ``"pva"``, ``"colbert"`` and ``"cosine"``
to the blocked variants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.registry import Registry

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128

Scorer = Callable[[Tensor, Tensor, "Tensor | None", int], Tensor]
SCORERS: Registry[Scorer] = Registry("scorer")


def pad_sentences(sentences: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad per-report sentence embeddings into one tensor and a mask.

    Args:
        sentences: one ``(S_i, D)`` tensor per report. ``S_i`` may be 0. All tensors
            must share ``D``, dtype and device.

    Returns:
        ``padded (N, S_max, D)`` with zeros in the padding and ``mask (N, S_max)``, a
        bool tensor that is True for real sentences.

    Example:
        >>> padded, mask = pad_sentences([torch.ones(2, 4), torch.ones(1, 4)])
        >>> padded.shape, mask.tolist()
        (torch.Size([2, 2, 4]), [[True, True], [True, False]])
    """
    if len(sentences) == 0:
        raise ValueError("sentences is empty. Pass one (S_i, D) tensor per report")
    first = sentences[0]
    for index, item in enumerate(sentences):
        if not isinstance(item, Tensor) or item.dim() != 2:
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(f"sentences[{index}] must be a (S_i, D) tensor, got {shape}")
        if item.shape[1] != first.shape[1]:
            raise ValueError(
                f"sentences[{index}] has D={item.shape[1]} but sentences[0] has "
                f"D={first.shape[1]}. All reports must use the same text encoder"
            )
        if item.dtype != first.dtype or item.device != first.device:
            raise ValueError(
                f"sentences[{index}] is {item.dtype} on {item.device} but sentences[0] is "
                f"{first.dtype} on {first.device}. Convert them to one dtype and device"
            )

    lengths = torch.tensor([item.shape[0] for item in sentences], device=first.device)
    max_length = max(int(lengths.max()), 1)
    padded = first.new_zeros((len(sentences), max_length, first.shape[1]))
    for index, item in enumerate(sentences):
        padded[index, : item.shape[0]] = item
    mask = torch.arange(max_length, device=first.device)[None, :] < lengths[:, None]
    return padded, mask


def _validate_inputs(
    views: Tensor, sentences: Tensor, sentence_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Check shapes and values and return ``(sentences, mask)`` with padding zeroed.

    Raises ``ValueError`` naming the argument, or the report index for a report without
    sentences.
    """
    if views.dim() != 3:
        raise ValueError(f"views must have shape (N_i, Q, D), got {tuple(views.shape)}")
    if sentences.dim() != 3:
        raise ValueError(f"sentences must have shape (N_r, S, D), got {tuple(sentences.shape)}")
    if views.shape[2] != sentences.shape[2]:
        raise ValueError(
            f"views have D={views.shape[2]} but sentences have D={sentences.shape[2]}. "
            "Both must be projected to the same embedding size"
        )
    if views.shape[1] == 0:
        raise ValueError("views has Q=0 views per study, but at least one view is required")

    if sentence_mask is None:
        sentence_mask = torch.ones(sentences.shape[:2], dtype=torch.bool, device=sentences.device)
    if sentence_mask.shape != sentences.shape[:2]:
        raise ValueError(
            f"sentence_mask must have shape (N_r, S) = {tuple(sentences.shape[:2])}, "
            f"got {tuple(sentence_mask.shape)}"
        )
    if sentence_mask.dtype != torch.bool:
        raise ValueError(f"sentence_mask must be a bool tensor, got {sentence_mask.dtype}")

    empty = (~sentence_mask.any(dim=1)).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"report {int(empty[0])} has no sentences (sentence_mask row {int(empty[0])} is "
            f"all False, {empty.numel()} such reports in total). Drop empty reports before scoring"
        )
    if not bool(torch.isfinite(views).all()):
        raise ValueError("views contains NaN or infinite values")
    sentences = torch.where(sentence_mask[..., None], sentences, sentences.new_zeros(()))
    if not bool(torch.isfinite(sentences).all()):
        raise ValueError("sentences contains NaN or infinite values in unmasked rows")
    return sentences, sentence_mask


def _similarity_pairs(views: Tensor, sentences: Tensor) -> Tensor:
    """Return the similarity matrix of every study-report pair, ``(N_i, N_r, Q, S)``."""
    return torch.einsum("iqd,rsd->irqs", views, sentences)


def _pva_greedy(similarity: Tensor, sentence_mask: Tensor) -> Tensor:
    """Run the greedy PVA matching on ``similarity (N_i, N_r, Q, S)`` and return ``(N_i, N_r)``.

    Each step takes, for every pair at once, the maximum over the ``Q * S`` entries whose
    row and column are still free. The docstring of ``torch.max(input, dim)`` (torch 2.14)
    states that it returns the index of the first maximal value, and the tie tests in
    ``tests/test_scoring.py`` confirm it on CPU. The flat index is ``q * S + s``, so ties
    go to the lowest view row, then the lowest sentence column.
    NOTE: the first-index rule on CUDA is taken from the same docstring and not tested here.

    When ``similarity`` requires grad, the matching runs on a detached copy and the
    recorded values are gathered from ``similarity``, so gradients reach only the selected
    entries. Otherwise the matching runs in place to save one copy.
    """
    n_images, n_reports, n_views, n_slots = similarity.shape
    n_sentences = sentence_mask.sum(dim=1)
    n_matches = n_sentences.clamp(max=n_views)
    track_grad = similarity.requires_grad

    if track_grad:
        work = similarity.detach().clone(memory_format=torch.contiguous_format)
    else:
        work = similarity.contiguous()
    work.masked_fill_(~sentence_mask[None, :, None, :], float("-inf"))
    work = work.view(n_images * n_reports, n_views, n_slots)
    flat_work = work.view(n_images * n_reports, n_views * n_slots)
    flat_similarity = similarity.reshape(n_images * n_reports, n_views * n_slots)
    pair_index = torch.arange(n_images * n_reports, device=similarity.device)
    active_steps = n_matches.repeat(n_images)

    total = similarity.new_zeros(n_images * n_reports)
    for step in range(min(n_views, n_slots)):
        best, flat_index = flat_work.max(dim=1)
        if track_grad:
            best = flat_similarity.gather(1, flat_index[:, None]).squeeze(1)
        # Pairs whose report has fewer than `step + 1` sentences have run out of
        # columns. Their maximum is -inf and must not enter the sum.
        total = total + torch.where(step < active_steps, best, best.new_zeros(()))
        work[pair_index, flat_index // n_slots, :] = float("-inf")
        work[pair_index, :, flat_index % n_slots] = float("-inf")

    return total.view(n_images, n_reports) / n_matches.to(total.dtype)


def pva_score(views: Tensor, sentences: Tensor, sentence_mask: Tensor | None = None) -> Tensor:
    """Score every study against every report with Pairwise View Alignment (PVA).

    For one pair, ``M = V F^T`` is ``(Q, S_valid)``. PVA repeats ``min(Q, S_valid)``
    times: take the largest entry of ``M`` whose row and column are both unused (ties go
    to the lowest row, then the lowest column), record it, and mark its row and column
    used. The score is the mean of the recorded entries.

    All pairs run together and the loop runs over the ``min(Q, S)`` greedy steps only.
    Gradients flow into the selected entries of ``M``. Memory is
    ``O(N_i * N_r * Q * S)``, so use :func:`pva_score_blocked` for large matrices.

    Args:
        views: ``(N_i, Q, D)`` view embeddings.
        sentences: ``(N_r, S, D)`` sentence embeddings, padded.
        sentence_mask: ``(N_r, S)`` bool, True for real sentences. ``None`` means no
            padding.

    Returns:
        ``(N_i, N_r)`` scores.

    Raises:
        ValueError: on a shape mismatch, on NaN or infinite embeddings, or when a report
            has no sentences (the error names the report index).

    Example:
        >>> views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> sentences = torch.tensor([[[0.9, 0.1], [0.8, 0.2]]])
        >>> pva_score(views, sentences)  # picks 0.9, then 0.2 from the unused row/column
        tensor([[0.5500]])
    """
    sentences, sentence_mask = _validate_inputs(views, sentences, sentence_mask)
    similarity = _similarity_pairs(views, sentences)
    return _pva_greedy(similarity, sentence_mask)


def colbert_score(views: Tensor, sentences: Tensor, sentence_mask: Tensor | None = None) -> Tensor:
    """Score pairs ColBERT-style: the mean over real sentences of the max over views.

    Args:
        views: ``(N_i, Q, D)``.
        sentences: ``(N_r, S, D)``, padded.
        sentence_mask: ``(N_r, S)`` bool, True for real sentences. ``None`` means no
            padding.

    Returns:
        ``(N_i, N_r)`` scores. Gradients flow through the maximal views.
    """
    sentences, sentence_mask = _validate_inputs(views, sentences, sentence_mask)
    best_view = _similarity_pairs(views, sentences).amax(dim=2)  # (N_i, N_r, S)
    weights = sentence_mask.to(best_view.dtype)
    return (best_view * weights).sum(dim=2) / weights.sum(dim=1)


def _mean_embeddings(
    views: Tensor, sentences: Tensor, sentence_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Return the L2-normalised mean view ``(N_i, D)`` and mean real sentence ``(N_r, D)``."""
    weights = sentence_mask.to(sentences.dtype)[..., None]
    mean_sentence = (sentences * weights).sum(dim=1) / weights.sum(dim=1)
    return F.normalize(views.mean(dim=1), dim=-1), F.normalize(mean_sentence, dim=-1)


def cosine_score(views: Tensor, sentences: Tensor, sentence_mask: Tensor | None = None) -> Tensor:
    """Score pairs by the cosine of the mean view and the mean of the real sentences.

    Both means are re-normalised to unit length before the dot product, so a study with
    ``Q = 1`` and a report with ``S = 1`` give the plain cosine similarity (the
    single-embedding CLIP case).

    Args:
        views: ``(N_i, Q, D)``.
        sentences: ``(N_r, S, D)``, padded.
        sentence_mask: ``(N_r, S)`` bool, True for real sentences. ``None`` means no
            padding.

    Returns:
        ``(N_i, N_r)`` scores in ``[-1, 1]``.
    """
    sentences, sentence_mask = _validate_inputs(views, sentences, sentence_mask)
    image_embedding, report_embedding = _mean_embeddings(views, sentences, sentence_mask)
    return image_embedding @ report_embedding.T


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _score_in_blocks(
    pair_scorer: Callable[[Tensor, Tensor, Tensor], Tensor],
    views: Tensor,
    sentences: Tensor,
    sentence_mask: Tensor,
    block_size: int,
) -> Tensor:
    """Fill ``(N_i, N_r)`` block by block with ``pair_scorer`` under ``torch.no_grad``."""
    n_images, n_reports = views.shape[0], sentences.shape[0]
    scores = views.new_empty((n_images, n_reports))
    with torch.no_grad():
        for row in range(0, n_images, block_size):
            for column in range(0, n_reports, block_size):
                scores[row : row + block_size, column : column + block_size] = pair_scorer(
                    views[row : row + block_size],
                    sentences[column : column + block_size],
                    sentence_mask[column : column + block_size],
                )
    return scores


def pva_score_blocked(
    views: Tensor,
    sentences: Tensor,
    sentence_mask: Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Compute :func:`pva_score` for large inputs, ``block_size x block_size`` pairs at a time.

    Peak extra memory is about ``block_size**2 * Q * S`` elements of the input dtype
    (one similarity block, matched in place). No gradients are tracked. Each pair's
    result is the same as in the unblocked call. Only the floating-point rounding of the
    similarity matmul may depend on the block shape.

    Args:
        views: ``(N_i, Q, D)``.
        sentences: ``(N_r, S, D)``, padded.
        sentence_mask: ``(N_r, S)`` bool or ``None``.
        block_size: studies and reports per block side.

    Returns:
        ``(N_i, N_r)`` scores.
    """
    _check_block_size(block_size)
    sentences, sentence_mask = _validate_inputs(views, sentences, sentence_mask)

    def score_block(block_views: Tensor, block_sentences: Tensor, block_mask: Tensor) -> Tensor:
        return _pva_greedy(_similarity_pairs(block_views, block_sentences), block_mask)

    return _score_in_blocks(score_block, views, sentences, sentence_mask, block_size)


def colbert_score_blocked(
    views: Tensor,
    sentences: Tensor,
    sentence_mask: Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Compute :func:`colbert_score` in blocks of pairs, without gradients. Returns ``(N_i, N_r)``."""
    _check_block_size(block_size)
    sentences, sentence_mask = _validate_inputs(views, sentences, sentence_mask)

    def score_block(block_views: Tensor, block_sentences: Tensor, block_mask: Tensor) -> Tensor:
        best_view = _similarity_pairs(block_views, block_sentences).amax(dim=2)
        weights = block_mask.to(best_view.dtype)
        return (best_view * weights).sum(dim=2) / weights.sum(dim=1)

    return _score_in_blocks(score_block, views, sentences, sentence_mask, block_size)


def cosine_score_blocked(
    views: Tensor,
    sentences: Tensor,
    sentence_mask: Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Compute :func:`cosine_score` without gradients. Returns ``(N_i, N_r)``.

    The mean embeddings are ``(N, D)``, so a single matmul is already bounded by the
    output size. ``block_size`` is validated and otherwise unused, and exists so that
    every scorer in :data:`SCORERS` has the same signature.
    """
    _check_block_size(block_size)
    sentences, sentence_mask = _validate_inputs(views, sentences, sentence_mask)
    with torch.no_grad():
        image_embedding, report_embedding = _mean_embeddings(views, sentences, sentence_mask)
        return image_embedding @ report_embedding.T


SCORERS.register("pva", pva_score_blocked)
SCORERS.register("colbert", colbert_score_blocked)
SCORERS.register("cosine", cosine_score_blocked)
