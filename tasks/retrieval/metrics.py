"""Retrieval metrics on an image-report score matrix.

Scores are ``(N_q, N_c)``, one row per query and one column per candidate, with
exactly one true candidate per query. Ranks start at 1 and ties count against the
model: the rank of the true item is the number of candidates that score at least as
high as it, itself included. A constant score matrix therefore ranks every true item
last, and a scorer cannot gain recall by returning ties.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


def _validate_scores(scores: Tensor, name: str = "scores") -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N_q, N_c), got {shape}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{name} is empty, shape {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        count = int(torch.isnan(scores).sum())
        raise ValueError(f"{name} contains {count} NaN values. Fix the scorer before ranking")


def _resolve_positives(positives: Tensor | None, n_queries: int, n_candidates: int) -> Tensor:
    if positives is None:
        if n_candidates < n_queries:
            raise ValueError(
                f"scores has {n_queries} queries but {n_candidates} candidates. Pass positives "
                "to give each query's true column"
            )
        return torch.arange(n_queries)
    positives = torch.as_tensor(positives)
    if positives.shape != (n_queries,) or positives.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positives must be an integer tensor of shape ({n_queries},), got "
            f"{positives.dtype} {tuple(positives.shape)}"
        )
    if int(positives.min()) < 0 or int(positives.max()) >= n_candidates:
        raise ValueError(
            f"positives must index columns 0..{n_candidates - 1}, got values "
            f"{int(positives.min())}..{int(positives.max())}"
        )
    return positives.long()


def retrieval_ranks(scores: Tensor, positives: Tensor | None = None) -> Tensor:
    """Return the rank (1 = best) of each query's true candidate.

    Args:
        scores: ``(N_q, N_c)`` scores, higher is better.
        positives: ``(N_q,)`` column of each query's true candidate. Defaults to
            ``arange(N_q)``, the diagonal.

    Returns:
        ``(N_q,)`` LongTensor. ``rank[i]`` is the number of candidates whose score is
        ``>= scores[i, positives[i]]``.

    Example:
        >>> retrieval_ranks(torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
        tensor([1, 2])
    """
    _validate_scores(scores)
    positives = _resolve_positives(positives, *scores.shape).to(scores.device)
    true_scores = scores.gather(1, positives[:, None])
    return (scores >= true_scores).sum(dim=1).cpu()


def _as_rank_array(ranks: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    array = ranks.cpu().numpy() if isinstance(ranks, Tensor) else np.asarray(ranks)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {array.shape}")
    if array.min() < 1:
        raise ValueError(f"ranks start at 1, got minimum {array.min()}")
    return array


def recall_at_k(ranks: Tensor | np.ndarray | Sequence[int], k: int) -> float:
    """Return the fraction of queries whose true item ranks in the top ``k``.

    Example:
        >>> recall_at_k([1, 3, 7], 5)
        0.6666666666666666
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return float(np.mean(_as_rank_array(ranks) <= k))


def median_rank(ranks: Tensor | np.ndarray | Sequence[int]) -> float:
    """Return the median rank (MdR). With an even count it is the mean of the two middle ranks."""
    return float(np.median(_as_rank_array(ranks)))


def mean_rank(ranks: Tensor | np.ndarray | Sequence[int]) -> float:
    """Return the mean rank (MnR)."""
    return float(np.mean(_as_rank_array(ranks)))


@dataclass
class RetrievalMetrics:
    """Summary metrics and per-query values of both retrieval directions.

    ``values`` maps names such as ``i2t/R@5`` and ``t2i/MdR`` to floats. ``per_query``
    maps ``i2t/rank``, ``i2t/hit@5`` and the ``t2i`` equivalents to ``(N_q,)`` arrays
    aligned to the studies (rows of ``scores``), for bootstrapping over subjects.
    """

    values: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, np.ndarray] = field(default_factory=dict)


def _direction_metrics(
    prefix: str, ranks: Tensor, ks: Sequence[int], result: RetrievalMetrics
) -> None:
    rank_array = ranks.numpy()
    result.per_query[f"{prefix}/rank"] = rank_array
    for k in ks:
        result.values[f"{prefix}/R@{k}"] = recall_at_k(rank_array, k)
        result.per_query[f"{prefix}/hit@{k}"] = (rank_array <= k).astype(np.float64)
    result.values[f"{prefix}/MdR"] = median_rank(rank_array)
    result.values[f"{prefix}/MnR"] = mean_rank(rank_array)


def retrieval_metrics(
    scores: Tensor, positives: Tensor | None = None, ks: Sequence[int] = DEFAULT_KS
) -> RetrievalMetrics:
    """Compute recall@k, median rank and mean rank for both retrieval directions.

    Image to text (``i2t``): each study (row) retrieves among all reports (columns).
    Text to image (``t2i``): the report of study ``i`` (column ``positives[i]``)
    retrieves among all studies, and its true item is row ``i``. Reports that are no
    study's positive are candidates for ``i2t`` only.

    Args:
        scores: ``(N_q, N_c)`` study-by-report scores.
        positives: ``(N_q,)`` distinct report columns, one per study. Defaults to the
            diagonal.
        ks: cut-offs for recall@k.

    Returns:
        :class:`RetrievalMetrics` with values ``{i2t,t2i}/R@k``, ``/MdR``, ``/MnR`` and
        per-query ``/rank`` and ``/hit@k`` arrays aligned to the studies.

    Example:
        >>> result = retrieval_metrics(torch.eye(3), ks=(1,))
        >>> result.values["i2t/R@1"], result.values["t2i/MdR"]
        (1.0, 1.0)
    """
    _validate_scores(scores)
    n_queries, n_candidates = scores.shape
    positives = _resolve_positives(positives, n_queries, n_candidates)
    if torch.unique(positives).numel() != n_queries:
        raise ValueError(
            "positives must be distinct: each study needs its own report for text-to-image "
            "retrieval"
        )
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks must contain positive ints, got {k!r}")

    result = RetrievalMetrics()
    _direction_metrics("i2t", retrieval_ranks(scores, positives), ks, result)
    report_queries = scores[:, positives.to(scores.device)].T  # (N_q reports, N_q studies)
    _direction_metrics("t2i", retrieval_ranks(report_queries), ks, result)
    logger.debug("retrieval metrics over %d studies and %d reports", n_queries, n_candidates)
    return result
