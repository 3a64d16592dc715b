"""Preview PNGs of preprocessed studies: three orthogonal slices per channel.

Arrays are in the ``(C, S, A, R)`` layout of the preprocessing specs. The panels are
axial (A up, R to the right), coronal (S up, R to the right) and sagittal (S up, A to
the right), drawn in array space with square panels. This is the neurological
convention, with the patient's right on the right. A segmentation is drawn as a red
outline of its non-zero voxels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from harness.io import atomic_path

logger = logging.getLogger(__name__)

_PANELS = (
    ("axial", 0, ("R", "A")),
    ("coronal", 1, ("R", "S")),
    ("sagittal", 2, ("A", "S")),
)


def slice_centre(volume: np.ndarray, segmentation: np.ndarray | None = None) -> tuple[int, int, int]:
    """Return the ``(s, a, r)`` index to slice at: the segmentation's centre of mass, else the volume centre."""
    shape = volume.shape[-3:]
    if segmentation is not None and np.any(segmentation):
        centre = np.argwhere(segmentation > 0).mean(axis=0)
        return tuple(int(round(c)) for c in centre)  # type: ignore[return-value]
    return tuple(n // 2 for n in shape)  # type: ignore[return-value]


def save_orthogonal_slices(
    volume: np.ndarray,
    path: str | os.PathLike[str],
    segmentation: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Save a PNG with axial, coronal and sagittal slices of each channel (atomic write).

    Args:
        volume: ``(C, S, A, R)`` or ``(S, A, R)`` array.
        path: output ``.png`` file.
        segmentation: optional ``(S, A, R)`` label array on the same grid.
        channel_names: one name per channel for the row labels.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    volume = np.asarray(volume)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, S, A, R) or (S, A, R), got shape {volume.shape}")
    if segmentation is not None and segmentation.shape != volume.shape[1:]:
        raise ValueError(f"segmentation shape {segmentation.shape} differs from the volume's {volume.shape[1:]}")

    centre = slice_centre(volume, segmentation)
    n_channels = volume.shape[0]
    figure = Figure(figsize=(9, 3 * n_channels), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_channels, 3, squeeze=False)
    for channel in range(n_channels):
        name = channel_names[channel] if channel_names else f"channel {channel}"
        _draw_channel(axes[channel], volume[channel], segmentation, centre, name)
    if title:
        figure.suptitle(title)
    figure.tight_layout()

    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    logger.debug("wrote preview %s", path)


def _draw_channel(axes: Any, channel: np.ndarray, segmentation: np.ndarray | None, centre: tuple[int, int, int], name: str) -> None:
    low, high = float(np.min(channel)), float(np.max(channel))
    for ax, (view, axis, (x_label, y_label)) in zip(axes, _PANELS, strict=True):
        image = np.take(channel, centre[axis], axis=axis)
        ax.imshow(image, cmap="gray", origin="lower", aspect="auto", vmin=low, vmax=high if high > low else low + 1)
        if segmentation is not None:
            mask = np.take(segmentation, centre[axis], axis=axis) > 0
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{name}: {view} {centre[axis]}", fontsize=8)
        ax.set_xlabel(f"{x_label} \u2192", fontsize=7)
        ax.set_ylabel(f"{y_label} \u2192", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
