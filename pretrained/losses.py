"""Training losses for brat and its ablations.

Each loss is a small ``nn.Module`` over a pure function:

- :func:`info_nce` and :func:`symmetric_info_nce` with :class:`ContrastiveLoss`: the
  image-report contrastive loss with a learnable temperature.
- :func:`dpp_loss` with :class:`DPPLoss`: the determinantal point process (DPP)
  quality-diversity loss on the Q-Former cross-attention maps.
- :func:`pairwise_repulsion`: the mean off-diagonal cosine similarity of the attention
  maps, used by the ``pairwise-repulsion`` ablation.
- :class:`BratLoss` and :func:`build_loss`: one module per training objective
  (:data:`OBJECTIVES`).

For data-parallel training the trainer gathers views, sentences and masks from all
processes with :func:`gather_features` and passes the global batch together with the
``rows`` this process owns. :class:`BratLoss` then scores only those rows and their
positive reports against the global batch. When every process has the same local batch
size, DDP gradient averaging then gives the gradient of the loss over the global batch.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from harness.scoring import colbert_score, cosine_score, pva_score

logger = logging.getLogger(__name__)

OBJECTIVES = ("pva", "pva-no-qd", "pairwise-repulsion", "colbert", "qformer-mean", "clip")

DPP_EPS = 1e-4
"""Ridge added to the DPP kernel so that ``K`` stays positive definite.

A fully collapsed attention set (all ``Q`` maps equal) gives a rank-1 kernel with
``det K ~ eps**(Q - 1)``. With ``eps = 1e-4`` the loss is then about
``(Q - 1) / Q * 9.2``, which is large but finite, and the Cholesky factorisation in
float64 still succeeds.
"""


def _default_labels(n_rows: int, n_columns: int, device: torch.device) -> Tensor:
    if n_columns < n_rows:
        raise ValueError(
            f"scores has {n_rows} rows but only {n_columns} columns. Pass labels to give "
            "each row's positive column"
        )
    return torch.arange(n_rows, device=device)


def _validate_labels(labels: Tensor, n_rows: int, n_columns: int, name: str = "labels") -> None:
    if labels.shape != (n_rows,):
        raise ValueError(f"{name} must have shape ({n_rows},), got {tuple(labels.shape)}")
    if labels.dtype != torch.long:
        raise ValueError(f"{name} must be a LongTensor (int64), got {labels.dtype}")
    if n_rows and (int(labels.min()) < 0 or int(labels.max()) >= n_columns):
        raise ValueError(
            f"{name} must index columns 0..{n_columns - 1}, got values "
            f"{int(labels.min())}..{int(labels.max())}"
        )


def _inverse_permutation(labels: Tensor, n: int) -> Tensor:
    """Return the inverse of ``labels (n,)``, raising ``ValueError`` unless it is a permutation."""
    _validate_labels(labels, n, n)
    if n and int(torch.bincount(labels, minlength=n).max()) > 1:
        raise ValueError(
            "labels must be a permutation of 0..B-1 (one report per study) for the symmetric loss"
        )
    inverse = torch.empty_like(labels)
    inverse[labels] = torch.arange(n, device=labels.device)
    return inverse


def info_nce(scores: Tensor, temperature: Tensor | float, labels: Tensor | None = None) -> Tensor:
    """Return the InfoNCE (softmax cross-entropy) loss of each row's positive column.

    ``logits = scores / temperature``, and the loss is the mean over rows of the
    cross-entropy with target ``labels[row]``.

    Args:
        scores: ``(N_q, N_c)`` similarity scores.
        temperature: a positive scalar.
        labels: ``(N_q,)`` LongTensor with each row's positive column. Defaults to
            ``arange(N_q)``.

    Returns:
        A scalar tensor.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N_q, N_c), got {tuple(scores.shape)}")
    n_rows, n_columns = scores.shape
    if labels is None:
        labels = _default_labels(n_rows, n_columns, scores.device)
    _validate_labels(labels, n_rows, n_columns)
    return F.cross_entropy(scores / temperature, labels)


def symmetric_info_nce(
    scores: Tensor, temperature: Tensor | float, labels: Tensor | None = None
) -> Tensor:
    """Return the mean of the image-to-report and report-to-image InfoNCE losses.

    Args:
        scores: ``(B, B)`` scores, study ``i`` (row) against report ``j`` (column).
        temperature: a positive scalar. ``logits = scores / temperature``.
        labels: ``(B,)`` permutation giving each study's report column. Defaults to
            ``arange(B)``, the matching pairs on the diagonal.

    Returns:
        A scalar tensor.

    Example:
        >>> scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(symmetric_info_nce(scores, 1.0).item(), 4)  # log(1 + e^-1)
        0.3133
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be square (B, B), got {tuple(scores.shape)}")
    n = scores.shape[0]
    if labels is None:
        labels = torch.arange(n, device=scores.device)
    inverse = _inverse_permutation(labels, n)
    image_to_report = info_nce(scores, temperature, labels)
    report_to_image = info_nce(scores.T, temperature, inverse)
    return (image_to_report + report_to_image) / 2


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over a ``(B, B)`` score matrix with a learnable temperature.

    The temperature is stored as ``log_temperature`` and clamped to
    ``[min_temperature, max_temperature]`` in :attr:`temperature`. The clamp passes no
    gradient while the temperature sits at a bound. ``logits = scores / temperature``.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "temperatures must satisfy 0 < min_temperature <= init_temperature <= "
                f"max_temperature, got {min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    @property
    def temperature(self) -> Tensor:
        """The clamped temperature, a scalar tensor."""
        return self.log_temperature.exp().clamp(self.min_temperature, self.max_temperature)

    def forward(self, scores: Tensor, labels: Tensor | None = None) -> Tensor:
        """Return the symmetric InfoNCE loss of ``scores (B, B)`` (see :func:`symmetric_info_nce`)."""
        return symmetric_info_nce(scores, self.temperature.to(scores.dtype), labels)


def _validate_attention(attention: Tensor) -> None:
    """Raise ``ValueError`` unless ``attention (B, Q, L)`` rows are probability distributions."""
    if attention.dim() != 3:
        raise ValueError(f"attention must have shape (B, Q, L), got {tuple(attention.shape)}")
    if attention.shape[2] < 2:
        raise ValueError(
            f"attention has L={attention.shape[2]} visual tokens, but the entropy quality term "
            "needs L >= 2"
        )
    if not bool(torch.isfinite(attention).all()):
        raise ValueError("attention contains NaN or infinite values")
    if bool((attention < 0).any()):
        raise ValueError(f"attention has negative entries (min {attention.min().item():.3g})")
    low_precision = attention.dtype in (torch.float16, torch.bfloat16)
    tolerance = 1e-2 if low_precision else 1e-3
    row_sums = attention.sum(dim=-1, dtype=torch.float64)
    worst = (row_sums - 1).abs().max().item()
    if worst > tolerance:
        raise ValueError(
            f"attention rows must sum to 1 over the L visual tokens (softmax averaged over "
            f"heads and layers), but a row sum is off by {worst:.3g}"
        )


def attention_quality(attention: Tensor) -> Tensor:
    """Return the normalised entropy ``H(A_i) / log L`` of each attention map, ``(B, Q)``.

    1 for a uniform map and 0 for a map on a single token. Zero entries contribute 0.
    """
    logs = attention.clamp_min(1e-12).log()
    return -(attention * logs).sum(dim=-1) / math.log(attention.shape[-1])


def dpp_loss(attention: Tensor, eps: float = DPP_EPS) -> Tensor:
    """Return the DPP quality-diversity loss of cross-attention maps.

    Per sample, with ``h_i = entropy(A_i) / log L`` and ``S_ij = cos(A_i, A_j)``, the
    kernel is ``K = diag(h) S diag(h) + eps * I`` and the loss is ``-log det(K) / Q``.
    The log-determinant comes from a Cholesky factor in float64,
    ``2 * sum(log(diag(chol(K))))``. The result is averaged over the batch and cast back
    to the input dtype.

    Lower is better: diverse (near-orthogonal) maps that each spread over many tokens
    maximise ``det K``. Q maps in ``R^L`` have rank at most ``L``, so with ``L < Q``
    the determinant is bounded by ``eps`` and the loss stays high. Configurations should
    have ``L >= Q``.

    Args:
        attention: ``(B, Q, L)``, each row a distribution over ``L`` visual tokens,
            already averaged over heads and layers.
        eps: ridge on the kernel diagonal, see :data:`DPP_EPS`.

    Returns:
        A scalar tensor in ``attention.dtype``.
    """
    _validate_attention(attention)
    attention64 = attention.to(torch.float64)
    quality = attention_quality(attention64)  # (B, Q)
    unit = F.normalize(attention64, dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (B, Q, Q)
    n_views = attention.shape[1]
    identity = torch.eye(n_views, dtype=torch.float64, device=attention.device)
    kernel = quality[:, :, None] * similarity * quality[:, None, :] + eps * identity
    cholesky = torch.linalg.cholesky(kernel)
    log_det = 2 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)  # (B,)
    return (-log_det / n_views).mean().to(attention.dtype)


def pairwise_repulsion(attention: Tensor) -> Tensor:
    """Return the mean off-diagonal cosine similarity of the attention maps.

    Args:
        attention: ``(B, Q, L)`` with ``Q >= 2``.

    Returns:
        A scalar: the mean over the batch and over the ``Q * (Q - 1)`` ordered pairs
        ``i != j`` of ``cos(A_i, A_j)``. Lower means more diverse maps.
    """
    if attention.dim() != 3:
        raise ValueError(f"attention must have shape (B, Q, L), got {tuple(attention.shape)}")
    n_views = attention.shape[1]
    if n_views < 2:
        raise ValueError(f"pairwise repulsion needs Q >= 2 attention maps, got Q={n_views}")
    unit = F.normalize(attention, dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=1)
    return (off_diagonal / (n_views * (n_views - 1))).mean()


class DPPLoss(nn.Module):
    """Module form of :func:`dpp_loss`."""

    def __init__(self, eps: float = DPP_EPS) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = eps

    def forward(self, attention: Tensor) -> Tensor:
        return dpp_loss(attention, self.eps)



def _scorer_for(objective: str):
    if objective in ("pva", "pva-no-qd", "pairwise-repulsion"):
        return pva_score
    if objective == "colbert":
        return colbert_score
    return cosine_score  # "qformer-mean" and "clip"


class BratLoss(nn.Module):
    """The brat training loss for one objective: contrastive term plus an optional diversity term.

    Objectives (:data:`OBJECTIVES`):

    - ``pva``: PVA-score contrastive loss + ``dpp_weight * dpp_loss(attention)``.
    - ``pva-no-qd``: PVA-score contrastive loss only. When ``attention`` is passed, the
      DPP loss is still computed without gradient and returned for logging.
    - ``pairwise-repulsion``: PVA-score contrastive loss +
      ``dpp_weight * pairwise_repulsion(attention)``.
    - ``colbert``: ColBERT-score contrastive loss.
    - ``qformer-mean``: contrastive loss on the cosine of the mean view and the mean
      sentence.
    - ``clip``: contrastive loss on one image embedding ``(B, 1, D)`` against one report
      embedding ``(B, 1, D)``.

    Args:
        objective: one of :data:`OBJECTIVES`.
        dpp_weight: weight lambda of the diversity term (the DPP loss for ``pva``, the
            repulsion for ``pairwise-repulsion``). Ignored by the other objectives.
        init_temperature, min_temperature, max_temperature: see :class:`ContrastiveLoss`.
        dpp_eps: kernel ridge of the DPP loss, see :data:`DPP_EPS`.
    """

    def __init__(
        self,
        objective: str = "pva",
        dpp_weight: float = 0.1,
        init_temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        dpp_eps: float = DPP_EPS,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}. Expected one of {', '.join(OBJECTIVES)}")
        if dpp_weight < 0:
            raise ValueError(f"dpp_weight must be >= 0, got {dpp_weight}")
        if dpp_weight and objective not in ("pva", "pairwise-repulsion"):
            logger.info("objective %s has no diversity term, so dpp_weight=%s is ignored", objective, dpp_weight)
            dpp_weight = 0.0
        self.objective = objective
        self.dpp_weight = dpp_weight
        self.contrastive = ContrastiveLoss(init_temperature, min_temperature, max_temperature)
        self.dpp = DPPLoss(dpp_eps)
        self._score = _scorer_for(objective)

    def forward(
        self,
        views: Tensor,
        sentences: Tensor,
        sentence_mask: Tensor | None = None,
        attention: Tensor | None = None,
        labels: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss and its components for a (possibly gathered) batch.

        Args:
            views: ``(N, Q, D)`` views of the global batch. ``Q = 1`` for ``clip``.
            sentences: ``(N, S, D)`` padded sentence embeddings. ``S = 1`` for ``clip``.
            sentence_mask: ``(N, S)`` bool, True for real sentences, or ``None``.
            attention: ``(R, Q, L)`` cross-attention maps of the ``R`` owned rows, in
                the order of ``rows``. Required by ``pva`` (when ``dpp_weight > 0``) and
                ``pairwise-repulsion``.
            labels: ``(N,)`` permutation giving each study's report index. Defaults to
                ``arange(N)``.
            rows: ``(R,)`` indices of the studies this process owns. Defaults to all
                ``N``. Only those rows and their reports are scored against the
                global batch.

        Returns:
            ``loss``, ``contrastive`` and ``temperature`` scalars, plus ``dpp`` or
            ``repulsion`` where the objective has one. Only ``loss`` and its parts carry
            gradients. ``temperature`` is detached.
        """
        self._check_shapes(views, sentences)
        n = views.shape[0]
        if labels is None:
            labels = torch.arange(n, device=views.device)
        temperature = self.contrastive.temperature.to(views.dtype)
        n_owned = n if rows is None else rows.numel()
        if attention is not None and attention.shape[0] != n_owned:
            raise ValueError(
                f"attention has {attention.shape[0]} rows but this process owns {n_owned} "
                "studies. Pass the attention maps of the owned rows, in the order of rows"
            )

        if rows is None:
            scores = self._score(views, sentences, sentence_mask)
            contrastive = symmetric_info_nce(scores, temperature, labels)
        else:
            contrastive = self._owned_rows_info_nce(views, sentences, sentence_mask, labels, rows)

        output = {"contrastive": contrastive, "temperature": temperature.detach()}
        loss = contrastive
        if self.objective == "pva" and (self.dpp_weight > 0 or attention is not None):
            output["dpp"] = self.dpp(self._require_attention(attention))
            loss = loss + self.dpp_weight * output["dpp"]
        elif self.objective == "pva-no-qd" and attention is not None:
            with torch.no_grad():
                output["dpp"] = self.dpp(attention)
        elif self.objective == "pairwise-repulsion":
            output["repulsion"] = pairwise_repulsion(self._require_attention(attention))
            loss = loss + self.dpp_weight * output["repulsion"]
        output["loss"] = loss
        return output

    def _owned_rows_info_nce(
        self,
        views: Tensor,
        sentences: Tensor,
        sentence_mask: Tensor | None,
        labels: Tensor,
        rows: Tensor,
    ) -> Tensor:
        """Return the symmetric InfoNCE restricted to the owned studies and their reports.

        Image to report: owned studies ``(R,)`` against all ``N`` reports. Report to
        image: the owned studies' reports against all ``N`` studies. When the processes
        own disjoint, equal-sized ``rows`` that cover the batch, the mean of this value
        over processes equals the full symmetric loss.
        """
        _inverse_permutation(labels, views.shape[0])
        if rows.dim() != 1 or rows.dtype != torch.long:
            raise ValueError(f"rows must be a 1-D LongTensor, got {rows.dtype} {tuple(rows.shape)}")
        owned_reports = labels[rows]
        report_mask = None if sentence_mask is None else sentence_mask[owned_reports]
        temperature = self.contrastive.temperature.to(views.dtype)

        image_to_report = self._score(views[rows], sentences, sentence_mask)  # (R, N)
        report_to_image = self._score(views, sentences[owned_reports], report_mask).T  # (R, N)
        return (
            info_nce(image_to_report, temperature, owned_reports)
            + info_nce(report_to_image, temperature, rows)
        ) / 2

    def _check_shapes(self, views: Tensor, sentences: Tensor) -> None:
        if views.dim() != 3 or sentences.dim() != 3:
            raise ValueError(
                f"views must be (N, Q, D) and sentences (N, S, D), got {tuple(views.shape)} "
                f"and {tuple(sentences.shape)}"
            )
        if views.shape[0] != sentences.shape[0]:
            raise ValueError(
                f"views has {views.shape[0]} studies and sentences has {sentences.shape[0]} "
                "reports, but the contrastive batch needs exactly one report per study"
            )
        if self.objective == "clip" and (views.shape[1] != 1 or sentences.shape[1] != 1):
            raise ValueError(
                "objective clip expects one image embedding (N, 1, D) and one report embedding "
                f"(N, 1, D), got views {tuple(views.shape)} and sentences {tuple(sentences.shape)}"
            )

    def _require_attention(self, attention: Tensor | None) -> Tensor:
        if attention is None:
            raise ValueError(
                f"objective {self.objective} needs the cross-attention maps. Pass attention "
                "(B, Q, L) from the model"
            )
        return attention


def build_loss(
    objective: str,
    dpp_weight: float = 0.1,
    init_temperature: float = 0.07,
    min_temperature: float = 0.001,
    max_temperature: float = 0.5,
    dpp_eps: float = DPP_EPS,
) -> BratLoss:
    """Build the :class:`BratLoss` of a named objective from :data:`OBJECTIVES`.

    NOTE: the default ``dpp_weight = 0.1`` is a starting value chosen here. The brat
    paper (arXiv 2512.18679) does not state the weight of its DPP term.
    """
    return BratLoss(
        objective,
        dpp_weight=dpp_weight,
        init_temperature=init_temperature,
        min_temperature=min_temperature,
        max_temperature=max_temperature,
        dpp_eps=dpp_eps,
    )


def _pad_to(tensor: Tensor, batch_size: int, n_sentences: int | None) -> Tensor:
    """Zero-pad dim 0 to ``batch_size`` and, if given, dim 1 to ``n_sentences``."""
    padding = [0, 0] * tensor.dim()
    # F.pad lists (left, right) pairs from the last dimension backwards.
    padding[-1] = batch_size - tensor.shape[0]
    if n_sentences is not None:
        padding[-3] = n_sentences - tensor.shape[1]
    return F.pad(tensor, padding)


def gather_features(
    views: Tensor, sentences: Tensor, sentence_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All-gather a local batch across data-parallel processes, keeping gradients.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward pass returns to
    each process the summed gradient of its own rows. Processes may have different local
    batch sizes and sentence counts: tensors are padded for the collective and trimmed
    afterwards. Without an initialised process group this returns the inputs unchanged.

    Args:
        views: ``(B, Q, D)`` local views.
        sentences: ``(B, S, D)`` local padded sentence embeddings.
        sentence_mask: ``(B, S)`` bool.

    Returns:
        ``(views (N, Q, D), sentences (N, S_max, D), sentence_mask (N, S_max), rows (B,))``
        where ``N`` is the global batch, in rank order, and ``rows`` are the indices of this
        process's studies in it. Pass ``rows`` to :meth:`BratLoss.forward`.
    """
    local_rows = torch.arange(views.shape[0], device=views.device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return views, sentences, sentence_mask, local_rows
    import torch.distributed.nn.functional as dist_nn

    world_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.tensor([views.shape[0], sentences.shape[1]], device=views.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    batch_sizes = [int(size[0]) for size in all_sizes]
    max_batch = max(batch_sizes)
    max_sentences = max(int(size[1]) for size in all_sizes)

    gathered_views = dist_nn.all_gather(_pad_to(views, max_batch, None))
    gathered_sentences = dist_nn.all_gather(_pad_to(sentences, max_batch, max_sentences))
    padded_mask = _pad_to(sentence_mask.to(torch.uint8), max_batch, max_sentences)
    gathered_masks = [torch.empty_like(padded_mask) for _ in range(world_size)]
    dist.all_gather(gathered_masks, padded_mask)

    def concatenate(parts) -> Tensor:
        return torch.cat([part[:size] for part, size in zip(parts, batch_sizes, strict=True)])

    offset = sum(batch_sizes[:rank])
    return (
        concatenate(gathered_views),
        concatenate(gathered_sentences),
        concatenate(gathered_masks).bool(),
        local_rows + offset,
    )
