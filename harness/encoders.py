"""The encoder interface that every evaluated model implements, and the registry of loaders.

Any model the harness evaluates (a brat checkpoint, the released brat weights after
conversion, an ablation, a random initialisation) is wrapped as an :class:`Encoder`.
Tasks use only this interface, so they never import a model package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from harness.registry import Registry


@dataclass
class ImageEmbeddings:
    """Image-side outputs of an encoder for one batch.

    Attributes:
        views: ``(B, Q, D)`` view embeddings, projected into the shared space and
            L2-normalised; single-view models have ``Q = 1``.
        pooled: ``(B, D)`` one global embedding per study (used by linear probes).
        attention: ``(B, Q, L)`` cross-attention of each view over the ``L`` visual
            tokens, averaged over heads and layers, or ``None``.
        tokens: ``(B, L, D_I)`` visual tokens of the backbone, or ``None``.
    """

    views: torch.Tensor
    pooled: torch.Tensor
    attention: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


@runtime_checkable
class Encoder(Protocol):
    """Interface between a model and the harness tasks.

    Attributes:
        name: display name used in tables.
        digest: content hash of the weights and architecture config; it is part of
            every embedding-cache key, so it must change whenever outputs can change.
        preprocessing: name of the preprocessing spec the model expects (``brat-v1``, ...).
        scorer: name of the image-report scorer in :mod:`harness.scoring`
            (``pva``, ``colbert`` or ``cosine``).
    """

    name: str
    digest: str
    preprocessing: str
    scorer: str

    def encode_images(self, batch: torch.Tensor) -> ImageEmbeddings:
        """Embed a ``(B, C, D, H, W)`` float batch of preprocessed studies."""
        ...

    def encode_reports(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Embed each report as ``(S_i, D)`` L2-normalised sentence embeddings."""
        ...

    def segmentation_backbone(self) -> torch.nn.Module:
        """Return the vision backbone (with its weights) for segmentation transfer."""
        ...


# A loader takes keyword arguments from a suite's model entry (for example ``path=`` or
# ``config=``) and returns an Encoder.
EncoderLoader = Callable[..., Encoder]
ENCODER_LOADERS: Registry[EncoderLoader] = Registry("encoder loader")

# Optional cheap checks of a model entry's arguments, keyed like ENCODER_LOADERS: each
# returns one message per invalid argument without loading any weights, so that
# ``brat-harness validate`` can catch a typo before a run.
EncoderArgumentCheck = Callable[..., list[str]]
ENCODER_ARGUMENT_CHECKS: Registry[EncoderArgumentCheck] = Registry("encoder argument check")


def load_encoder(kind: str, **kwargs: Any) -> Encoder:
    """Build an encoder with the loader registered as ``kind``."""
    from harness.plugins import load_plugins

    load_plugins()
    return ENCODER_LOADERS.get(kind)(**kwargs)
