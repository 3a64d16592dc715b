"""``BratEncoder``: a brat model behind the harness's :class:`~harness.encoders.Encoder` interface."""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence

import torch

from harness.encoders import ImageEmbeddings

logger = logging.getLogger(__name__)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device``, or CUDA when available and the CPU otherwise."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BratEncoder:
    """Wrap a :class:`~pretrained.model.BratModel` for evaluation.

    The model runs in eval mode under ``torch.no_grad``. Outputs come back on the CPU as
    float32, so the embedding cache and the tasks get no device tensors.
    """

    def __init__(self, model, digest: str, name: str | None = None, device: str | torch.device | None = None) -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.digest = digest
        self.name = name or model.config.name
        self.preprocessing = model.config.preprocessing
        self.scorer = model.config.scorer

    @torch.no_grad()
    def encode_images(self, batch: torch.Tensor) -> ImageEmbeddings:
        """Embed a ``(B, C, D, H, W)`` batch; views ``(B, Q, D)``, attention ``(B, Q, L)``."""
        output = self.model.encode_image(batch.to(self.device, dtype=torch.float32))
        return ImageEmbeddings(
            views=output.views.float().cpu(),
            pooled=output.pooled.float().cpu(),
            attention=output.attention.float().cpu(),
            tokens=output.tokens.float().cpu(),
        )

    @torch.no_grad()
    def encode_reports(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Embed each report as ``(S_i, D)`` unit-norm sentence embeddings (``S_i = 1`` for ``clip``)."""
        if not texts:
            return []
        sentences, mask = self.model.encode_text(list(texts))
        sentences, mask = sentences.float().cpu(), mask.cpu()
        return [sentences[i][mask[i]] for i in range(len(texts))]

    def segmentation_backbone(self) -> torch.nn.Module:
        """Return a CPU copy of the vision backbone (``visual_encoder``) with its weights.

        The copy's ``feature_maps(x)`` gives the intermediate maps; ``adaptation.json`` of a
        checkpoint lists their strides and channels.
        """
        return copy.deepcopy(self.model.visual_encoder).cpu()


def load_brat(path: str, device: str | None = None, name: str | None = None) -> BratEncoder:
    """Encoder loader ``brat``: a checkpoint folder."""
    from pretrained.checkpoint import load_checkpoint, model_digest

    model = load_checkpoint(path)
    return BratEncoder(model, digest=model_digest(path), name=name, device=device)


def random_digest(config, seed: int) -> str:
    """Digest of a random initialisation: SHA-256 of the config bytes and the seed."""
    from pretrained.checkpoint import config_bytes

    digest = hashlib.sha256(config_bytes(config))
    digest.update(f"random-init seed={seed} torch={torch.__version__}".encode())
    return digest.hexdigest()


def load_brat_random(
    config: str = "brat-tiny", seed: int = 0, device: str | None = None, name: str | None = None, **overrides
) -> BratEncoder:
    """Encoder loader ``brat-random``: a seeded random initialisation, the floor of every table.

    ``overrides`` replace config fields, for example ``text_encoder=`` a local folder.
    """
    from pretrained.config import get_config
    from pretrained.model import build_model

    brat_config = get_config(config, **overrides)
    model = build_model(brat_config, seed=seed)
    label = name or f"{brat_config.name}-random-seed{seed}"
    return BratEncoder(model, digest=random_digest(brat_config, seed), name=label, device=device)
