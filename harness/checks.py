"""Validate a manifest and its images, reporting every problem with its row, column and value.

:func:`check_manifest` runs all checks and returns a list of :class:`Problem`;
``brat-harness check`` prints them one per line. :func:`check_split_integrity` is the
split-leak check that every run repeats before it starts (see also
:func:`require_split_integrity`, which raises).

Image checks read only headers, plus the voxel data in slabs of about
``SLAB_BYTES`` through nibabel's lazy ``dataobj``, so memory stays flat for any image
size. They can run in a process pool.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.manifest import (
    DATASET_CARD_NAME,
    IMAGE_COLUMNS,
    REQUIRED_COLUMNS,
    SEGMENTATION_COLUMN,
    ManifestError,
    is_missing,
    present_images,
    read_dataset_card,
    read_manifest,
)

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
AFFINE_ATOL = 1e-3
"""Absolute tolerance (mm) when comparing a segmentation's affine with its image's."""
SLAB_BYTES = 32 * 2**20
_MAX_VALUE_CHARS = 120
_DCM2NIIX_HINT = (
    "convert it to NIfTI first with dcm2niix (e.g. `dcm2niix -z y -o OUT_DIR DICOM_FOLDER`) "
    "and put the .nii.gz path in the manifest"
)


@dataclass(frozen=True)
class Problem:
    """One manifest problem.

    ``row`` is the 1-based data row as a user sees it (the first row after a CSV header
    is row 1), or ``None`` for a problem of the whole manifest.
    """

    row: int | None
    study_id: str | None
    column: str | None
    value: Any
    message: str

    def __str__(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}" + (f" (study_id {self.study_id!r})" if self.study_id else ""))
        if self.column:
            parts.append(f"column {self.column!r}")
        if self.value is not None:
            parts.append(f"value {_short_repr(self.value)}")
        where = ", ".join(parts) if parts else "manifest"
        return f"{where}: {self.message}"


class SplitIntegrityError(ValueError):
    """A subject appears in more than one split."""


def check_manifest(
    path: str | os.PathLike[str],
    labels: Mapping[str, Sequence[Any]] | None = None,
    check_images: bool = True,
    workers: int = 1,
) -> list[Problem]:
    """Run every manifest check and return the problems, manifest-wide ones first, then by row.

    Args:
        path: manifest file (CSV, TSV, JSONL or Parquet).
        labels: allowed values per label column; these override the declarations of
            the same columns in the ``dataset.json`` next to the manifest.
        check_images: open every image and segmentation (header, affine, voxel data).
        workers: processes for the image checks; 1 runs them in this process.
    """
    try:
        df = read_manifest(path)
        card = read_dataset_card(path)
    except ManifestError as error:
        return [Problem(error.row, None, error.column, None, str(error))]

    declared = {str(k): list(v) for k, v in card.get("labels", {}).items()}
    declared.update({str(k): list(v) for k, v in (labels or {}).items()})

    problems = check_columns(df)
    if df.empty:
        problems.append(Problem(None, None, None, None, "the manifest has no studies; add one row per imaging study"))
    problems += check_rows(df)
    problems += check_split_integrity(df)
    problems += check_labels(df, declared)
    if check_images:
        problems += check_image_files(df, workers=workers)
    problems.sort(key=lambda p: (p.row is not None, p.row or 0))
    logger.info("checked %s: %d rows, %d problems", path, len(df), len(problems))
    return problems


def check_columns(df: pd.DataFrame) -> list[Problem]:
    """Report each missing required column."""
    required = ", ".join(REQUIRED_COLUMNS)
    return [
        Problem(None, None, column, None, f"missing required column; a manifest needs the columns {required}")
        for column in REQUIRED_COLUMNS
        if column not in df.columns
    ]


def check_rows(df: pd.DataFrame) -> list[Problem]:
    """Check ids, duplicate study ids, split names, reports and that each row has an image."""
    problems: list[Problem] = []
    first_row_of: dict[str, int] = {}
    allowed_splits = ", ".join(SPLITS)
    for row, record in _rows(df):
        study_id = record.get("study_id")
        for column in ("study_id", "subject_id"):
            if column in record and is_missing(record[column]):
                problems.append(Problem(row, study_id, column, None, f"missing {column}; every row needs one"))

        if not is_missing(study_id):
            if study_id in first_row_of:
                problems.append(Problem(
                    row, study_id, "study_id", study_id,
                    f"duplicate study_id, first used in row {first_row_of[study_id]}; give every study a unique id",
                ))
            else:
                first_row_of[study_id] = row

        if "split" in record:
            split = record["split"]
            if is_missing(split):
                problems.append(Problem(row, study_id, "split", None, f"missing split; use one of {allowed_splits}"))
            elif split not in SPLITS:
                problems.append(Problem(row, study_id, "split", split, f"unknown split; allowed: {allowed_splits}"))

        if "report" in record and is_missing(record["report"]):
            problems.append(Problem(row, study_id, "report", "", "empty report; every study needs its report text"))

        if not present_images(record):
            columns = "/".join(IMAGE_COLUMNS)
            problems.append(Problem(
                row, study_id, columns, None, f"no image path; fill at least one of the columns {', '.join(IMAGE_COLUMNS)}",
            ))
    return problems


def check_split_integrity(df: pd.DataFrame) -> list[Problem]:
    """Return one problem listing every subject that appears in more than one split (or none).

    Rows with a missing subject or split are ignored here; :func:`check_rows` reports them.
    """
    if "subject_id" not in df.columns or "split" not in df.columns:
        return []
    rows_by_subject: dict[str, dict[str, list[int]]] = {}
    for row, record in _rows(df):
        subject, split = record["subject_id"], record["split"]
        if is_missing(subject) or is_missing(split):
            continue
        rows_by_subject.setdefault(subject, {}).setdefault(split, []).append(row)

    leaks = {subject: splits for subject, splits in rows_by_subject.items() if len(splits) > 1}
    if not leaks:
        return []
    described = []
    for subject, splits in leaks.items():
        per_split = "; ".join(f"{split}: {_rows_text(rows)}" for split, rows in splits.items())
        described.append(f"{subject!r} ({per_split})")
    message = (
        f"{len(leaks)} subject(s) in more than one split: {', '.join(described)}; "
        "put all studies of a subject in the same split"
    )
    return [Problem(None, None, "subject_id", None, message)]


def require_split_integrity(df: pd.DataFrame) -> None:
    """Raise :class:`SplitIntegrityError` if any subject appears in more than one split."""
    problems = check_split_integrity(df)
    if problems:
        raise SplitIntegrityError(problems[0].message)


def check_labels(df: pd.DataFrame, declared: Mapping[str, Sequence[Any]]) -> list[Problem]:
    """Report label values outside their declared sets; a missing value is allowed (unlabelled study)."""
    problems: list[Problem] = []
    for column, allowed in declared.items():
        allowed_text = ", ".join(str(v) for v in allowed)
        if column not in df.columns:
            problems.append(Problem(
                None, None, column, None,
                f"label column declared (allowed: {allowed_text}) but missing from the manifest; "
                f"add the column or remove it from {DATASET_CARD_NAME} / --labels",
            ))
            continue
        keys = {_label_key(v) for v in allowed}
        for row, record in _rows(df):
            value = record[column]
            if is_missing(value) or _label_key(value) in keys:
                continue
            problems.append(Problem(
                row, record.get("study_id"), column, value,
                f"label value outside the declared set ({allowed_text}); fix the value or declare it "
                f"in {DATASET_CARD_NAME} / --labels",
            ))
    return problems


def check_image_files(df: pd.DataFrame, workers: int = 1) -> list[Problem]:
    """Open every image and segmentation of the manifest; see :func:`check_study_files`."""
    tasks = []
    for row, record in _rows(df):
        images = present_images(record)
        segmentation = record.get(SEGMENTATION_COLUMN)
        if images or not is_missing(segmentation):
            tasks.append((row, record.get("study_id"), images, None if is_missing(segmentation) else segmentation))

    if workers <= 1 or len(tasks) <= 1:
        results: Iterable[list[Problem]] = (check_study_files(*task) for task in tasks)
        return [p for result in results for p in result]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        chunksize = max(1, len(tasks) // (workers * 4))
        return [p for result in pool.map(_check_task, tasks, chunksize=chunksize) for p in result]


def _check_task(task: tuple[int, str | None, dict[str, str], str | None]) -> list[Problem]:
    return check_study_files(*task)


def check_study_files(
    row: int, study_id: str | None, images: Mapping[str, str], segmentation: str | None
) -> list[Problem]:
    """Check one study's image files and that its segmentation matches the first image's grid."""
    problems: list[Problem] = []
    grids: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    for column, path in images.items():
        grid, messages = inspect_image(path)
        problems += [Problem(row, study_id, column, path, m) for m in messages]
        if grid is not None:
            grids[column] = grid

    if segmentation is None:
        return problems
    grid, messages = inspect_image(segmentation)
    problems += [Problem(row, study_id, SEGMENTATION_COLUMN, segmentation, m) for m in messages]
    reference = next((column for column in IMAGE_COLUMNS if column in grids), None)
    if grid is None or reference is None:
        return problems

    ref_shape, ref_affine = grids[reference]
    shape, affine = grid
    if shape != ref_shape:
        problems.append(Problem(
            row, study_id, SEGMENTATION_COLUMN, segmentation,
            f"segmentation shape {shape} differs from the {reference} image shape {ref_shape}; "
            f"resample the segmentation onto the {reference} grid",
        ))
    elif not np.allclose(affine, ref_affine, atol=AFFINE_ATOL):
        max_diff = float(np.abs(affine - ref_affine).max())
        problems.append(Problem(
            row, study_id, SEGMENTATION_COLUMN, segmentation,
            f"segmentation affine differs from the {reference} image affine by up to {max_diff:.4g} "
            f"(tolerance {AFFINE_ATOL}); resample the segmentation onto the {reference} grid",
        ))
    return problems


def inspect_image(path: str) -> tuple[tuple[tuple[int, ...], np.ndarray] | None, list[str]]:
    """Check one image file and return ``((shape, affine) or None, problem messages)``.

    ``shape`` is the 3D spatial shape; ``None`` is returned when the file cannot be used.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    file = Path(path)
    if file.is_dir():
        return None, [f"is a folder, not a NIfTI file; if it holds a DICOM series, {_DCM2NIIX_HINT}"]
    if not file.exists():
        return None, ["image file not found; fix the path (relative paths resolve against the manifest's folder)"]
    if file.suffix.lower() == ".dcm" or _has_dicom_magic(file):
        return None, [f"is a DICOM file; {_DCM2NIIX_HINT}"]
    try:
        img = nib.load(str(file))
    except (ImageFileError, OSError, ValueError, EOFError) as error:
        return None, [f"unreadable image ({error}); re-export it as NIfTI (.nii.gz)"]

    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        return None, [f"image is not 3D (shape {shape}); a 4D file must hold a single volume"]

    messages = []
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        messages.append("affine has non-finite entries; fix the NIfTI header (sform/qform)")
    elif _is_singular(affine):
        messages.append("affine is singular (zero or collinear voxel axes); fix the NIfTI header (sform/qform, pixdim)")
    messages += _scan_voxels(img)
    grid = None if messages else (shape[:3], affine)
    return grid, messages


def summarize_manifest(df: pd.DataFrame) -> str:
    """Return a one-line summary: studies, subjects, studies per split and per sequence."""
    parts = [f"{len(df)} studies"]
    if "subject_id" in df.columns:
        parts.append(f"{df['subject_id'].nunique()} subjects")
    if "split" in df.columns:
        counts = df["split"].value_counts()
        parts.append("splits " + ", ".join(f"{s} {int(counts[s])}" for s in counts.index))
    sequences = [(c, int(df[c].notna().sum())) for c in IMAGE_COLUMNS if c in df.columns]
    parts.append("sequences " + (", ".join(f"{c} {n}" for c, n in sequences if n) or "none"))
    if SEGMENTATION_COLUMN in df.columns:
        parts.append(f"segmentations {int(df[SEGMENTATION_COLUMN].notna().sum())}")
    return "; ".join(parts)


# -- helpers -----------------------------------------------------------------------------


def _rows(df: pd.DataFrame) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based data row, record)`` pairs."""
    yield from enumerate(df.to_dict(orient="records"), start=1)


def _rows_text(rows: list[int]) -> str:
    return ("row " if len(rows) == 1 else "rows ") + ", ".join(str(r) for r in rows)


def _label_key(value: Any) -> str:
    """Compare labels as text, so 1, 1.0 and "1" match."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return str(value).lower()
    return str(value).strip()


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _has_dicom_magic(path: Path) -> bool:
    """Return True for files with the DICOM preamble marker ``DICM`` at byte 128."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_singular(affine: np.ndarray) -> bool:
    """Return True when the 3x3 part is degenerate relative to its column lengths."""
    linear = affine[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if np.any(norms == 0):
        return True
    return abs(np.linalg.det(linear)) / float(np.prod(norms)) < 1e-6


def _scan_voxels(img: Any) -> list[str]:
    """Read the voxel data in slabs along the third axis and report NaN, infinite or unreadable data."""
    import zlib

    shape = img.shape
    slab = max(1, SLAB_BYTES // max(1, shape[0] * shape[1] * 8))
    n_nan = n_inf = 0
    try:
        for start in range(0, shape[2], slab):
            block = np.asarray(img.dataobj[:, :, start : start + slab])
            if block.dtype.kind in "fc":
                n_nan += int(np.isnan(block).sum())
                n_inf += int(np.isinf(block).sum())
    except (OSError, EOFError, ValueError, zlib.error) as error:
        return [f"voxel data cannot be read ({error}); the file may be truncated, re-export it"]
    messages = []
    if n_nan or n_inf:
        messages.append(
            f"{n_nan} NaN and {n_inf} infinite voxels; replace them (e.g. with 0) and save the image again"
        )
    return messages


__all__ = [
    "SPLITS",
    "Problem",
    "SplitIntegrityError",
    "check_columns",
    "check_image_files",
    "check_labels",
    "check_manifest",
    "check_rows",
    "check_split_integrity",
    "check_study_files",
    "inspect_image",
    "require_split_integrity",
    "summarize_manifest",
]
