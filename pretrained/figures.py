"""Figures of a pretrained brat model: view attention maps over a study, and an MDS map of view embeddings.

- :func:`plot_attention_maps`: for several views, the cross-attention over the ``L``
  visual tokens, reshaped to the backbone's token grid, upsampled and overlaid on axial
  slices of the preprocessed study.
- :func:`plot_view_mds`: a 2-D metric MDS (scikit-learn) of the view embeddings of many
  studies, coloured by view index. Views that stay apart form separate clusters.

Both write PNG files through :mod:`harness.io` and use matplotlib's ``Agg`` backend.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def token_grid(config) -> tuple[tuple[int, ...], bool]:
    """Return the token grid of a model config's backbone and whether it spans the slice axis.

    DenseNet tokens average the feature map over the slice axis, so their grid is
    ``(h, w)`` in-plane and one map applies to every slice (``False``). ViT and ResNet
    tokens keep ``(d, h, w)`` (``True``). ``prod(grid) == L``.
    """
    import torch

    from pretrained.backbones import build_backbone

    with torch.device("meta"):
        backbone = build_backbone(config.backbone, config.in_channels, config.image_size)
        images = torch.empty(1, config.in_channels, *config.image_size)
        if hasattr(backbone, "densenet"):
            return tuple(int(n) for n in backbone.densenet.features(images).shape[3:]), False
        if hasattr(backbone, "grid"):
            return tuple(int(n) for n in backbone.grid), True
        return tuple(int(n) for n in backbone.feature_maps(images)[-1].shape[2:]), True


def _upsample(grid_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a ``(h, w)`` map to ``shape`` (align_corners=False)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def plot_attention_maps(
    volume: np.ndarray,
    attention: np.ndarray,
    grid: tuple[int, ...],
    spans_slices: bool,
    out_path: str | os.PathLike[str],
    views: Sequence[int] = (0, 1, 2, 3),
    n_slices: int = 4,
    title: str = "",
) -> Path:
    """Draw a views x slices panel of attention maps overlaid on axial slices and save it as PNG.

    Args:
        volume: ``(C, D, H, W)`` preprocessed study; channel 0 is drawn.
        attention: ``(Q, L)`` cross-attention of each view over the visual tokens.
        grid: token grid from :func:`token_grid`, ``(h, w)`` or ``(d, h, w)``.
        spans_slices: True when ``grid`` has a slice axis (see :func:`token_grid`).
        views: view indices to draw (rows).
        n_slices: evenly spaced axial slices to draw (columns), away from both ends.

    Returns:
        ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if int(np.prod(grid)) != attention.shape[1]:
        raise ValueError(f"token grid {grid} has {int(np.prod(grid))} cells but attention has L={attention.shape[1]}")
    depth = volume.shape[1]
    slices = np.linspace(0, depth - 1, n_slices + 2)[1:-1].round().astype(int)
    figure, axes = plt.subplots(len(views), n_slices, figsize=(2.2 * n_slices, 2.2 * len(views)), squeeze=False)
    for row, view in enumerate(views):
        maps = attention[view].reshape(grid)
        for column, z in enumerate(slices):
            grid_map = maps[int(z * grid[0] // depth)] if spans_slices else maps
            overlay = _upsample(grid_map, volume.shape[2:])
            axis = axes[row, column]
            axis.imshow(volume[0, z], cmap="gray", origin="lower")
            axis.imshow(overlay, cmap="inferno", alpha=0.45, origin="lower")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"slice {z}", fontsize=8)
            if column == 0:
                axis.set_ylabel(f"view {view}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, out_path)


def plot_view_mds(views: np.ndarray, out_path: str | os.PathLike[str], seed: int = 0, title: str = "") -> Path:
    """Embed all views of all studies in 2-D with metric MDS and save a scatter plot coloured by view index.

    Args:
        views: ``(N, Q, D)`` unit-norm view embeddings. The MDS uses Euclidean distances,
            which for unit vectors are ``sqrt(2 - 2 cos)``, a monotone function of the cosine.
        seed: ``random_state`` of the MDS.

    Returns:
        ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import MDS

    n_studies, n_views, _ = views.shape
    options = {"n_components": 2, "random_state": seed, "n_init": 1}
    if "init" in inspect.signature(MDS).parameters:  # scikit-learn >= 1.8
        options["init"] = "classical_mds"
    points = MDS(**options).fit_transform(views.reshape(n_studies * n_views, -1).astype(np.float64))
    labels = np.tile(np.arange(n_views), n_studies)

    figure, axis = plt.subplots(figsize=(5, 4.5))
    colours = plt.get_cmap("tab20" if n_views > 10 else "tab10")
    for view in range(n_views):
        chosen = labels == view
        axis.scatter(points[chosen, 0], points[chosen, 1], s=8, color=colours(view % colours.N), label=f"view {view}")
    axis.set_xlabel("MDS 1")
    axis.set_ylabel("MDS 2")
    axis.legend(fontsize=6, markerscale=1.5, ncol=2 if n_views > 8 else 1, loc="best")
    axis.set_title(title or f"view embeddings of {n_studies} studies", fontsize=9)
    return _save(figure, out_path)


def _save(figure, out_path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    from harness.io import atomic_path

    out_path = Path(out_path)
    figure.tight_layout()
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    logger.info("wrote figure %s", out_path)
    return out_path
