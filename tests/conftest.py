"""Shared fixtures: small NIfTI files written into ``tmp_path``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    """Write ``data`` as NIfTI-1 at ``path`` (identity affine by default) and return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def write_nifti(tmp_path: Path) -> Callable[..., str]:
    """Return ``write(name, data, affine=None) -> path`` that saves under ``tmp_path``."""

    def write(name: str, data: np.ndarray, affine: np.ndarray | None = None) -> str:
        return save_nifti(tmp_path / name, data, affine)

    return write
