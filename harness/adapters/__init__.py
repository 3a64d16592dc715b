"""Dataset adapters: turn a dataset's native layout into a manifest the harness reads.

Every adapter writes, into an output folder:

- ``manifest.csv``: one row per imaging study with ``study_id``, ``subject_id``,
  ``split``, one absolute image path column per sequence (``t1c``, ``t1``, ``t2``,
  ``flair``, or ``ct``), ``report`` and any extra label columns;
- ``splits.json`` when the adapter assigned splits: subject ids per split, with the seed
  and fractions that produced them;
- ``dataset.json``: where the data came from, the sha256 of the manifest and of
  ``splits.json``, counts, and the rows that were skipped.

Splits are always assigned per subject, so no subject appears in two splits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.io import atomic_path, write_json_atomic
from harness.registry import Registry

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
SPLITS_FILE = "splits.json"
DATASET_FILE = "dataset.json"
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class AdapterResult:
    """Output of an adapter: the manifest rows and the files written."""

    frame: pd.DataFrame
    manifest: Path
    dataset_json: Path
    splits: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Adapter(ABC):
    """Converts one dataset layout into a manifest (see the package docstring)."""

    name: str = ""
    description: str = ""
    #: Keyword arguments of :meth:`build` that are paths (suites resolve them against their folder).
    path_arguments: tuple[str, ...] = ()

    @abstractmethod
    def build(self, out_dir: str | Path, **kwargs: Any) -> AdapterResult:
        """Write the manifest and its companion files into ``out_dir``."""

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the adapter's command-line options (the ``adapt`` command uses them)."""

    @abstractmethod
    def arguments_from_cli(self, args: argparse.Namespace) -> dict[str, Any]:
        """Turn parsed command-line options into :meth:`build` keyword arguments."""


ADAPTERS: Registry[Adapter] = Registry("dataset adapter")


def parse_fractions(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """Parse ``"train=0.8,val=0.1,test=0.1"`` (or a mapping) into split fractions that sum to 1."""
    if text is None:
        return dict(DEFAULT_FRACTIONS)
    if isinstance(text, Mapping):
        fractions = {str(k): float(v) for k, v in text.items()}
    else:
        fractions = {}
        for part in str(text).split(","):
            name, _, value = part.partition("=")
            try:
                fractions[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"invalid split fraction {part!r}; expected NAME=FRACTION, e.g. train=0.8,val=0.1,test=0.1") from None
    if any(value < 0 for value in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be non-negative and sum to 1")
    return fractions


def assign_splits(subjects: Iterable[str], fractions: Mapping[str, float], seed: int) -> dict[str, list[str]]:
    """Shuffle the distinct subjects with ``seed`` and cut them into splits by ``fractions``.

    Each split with a positive fraction gets at least one subject when there are enough
    subjects; rounding differences go to the largest split. Returns split -> sorted
    subject ids.
    """
    unique = sorted({str(subject) for subject in subjects})
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    names = list(fractions)
    counts = [int(round(fractions[name] * len(unique))) for name in names]
    if len(unique) >= sum(fractions[name] > 0 for name in names):
        counts = [max(count, 1) if fractions[name] > 0 else count for name, count in zip(names, counts, strict=True)]
    largest = max(range(len(names)), key=lambda i: fractions[names[i]])
    while sum(counts) > len(unique):
        counts[counts.index(max(counts))] -= 1
    counts[largest] += len(unique) - sum(counts)
    splits, start = {}, 0
    for name, count in zip(names, counts, strict=True):
        splits[name] = sorted(shuffled[start : start + count])
        start += count
    return splits


def write_splits(out_dir: Path, splits: Mapping[str, Sequence[str]], seed: int, fractions: Mapping[str, float]) -> tuple[Path, str]:
    """Write ``splits.json`` atomically; return its path and sha256."""
    path = out_dir / SPLITS_FILE
    write_json_atomic(path, {"unit": "subject", "seed": seed, "fractions": dict(fractions), "splits": {k: list(v) for k, v in splits.items()}})
    return path, _sha256(path)


def read_splits(path: str | Path) -> dict[str, list[str]]:
    """Read the split -> subject ids mapping of a ``splits.json`` file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    splits = data.get("splits", data)
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: expected a 'splits' mapping of split name -> subject ids")
    return {str(name): [str(s) for s in subjects] for name, subjects in splits.items()}


def split_of_subjects(splits: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Invert split -> subjects; a subject listed in two splits raises ``ValueError`` naming it."""
    owner: dict[str, str] = {}
    for name, subjects in splits.items():
        for subject in subjects:
            if subject in owner and owner[subject] != name:
                raise ValueError(f"subject {subject!r} is in splits {owner[subject]!r} and {name!r}; a subject must be in one split only")
            owner[subject] = name
    return owner


def write_manifest(out_dir: Path, frame: pd.DataFrame, info: Mapping[str, Any], splits_path: Path | None) -> AdapterResult:
    """Write ``manifest.csv`` and ``dataset.json`` (with the manifest and splits digests)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_FILE
    with atomic_path(manifest) as tmp:
        frame.to_csv(tmp, index=False)
    dataset_info = dict(info)
    dataset_info.update(
        manifest=MANIFEST_FILE,
        manifest_sha256=_sha256(manifest),
        n_studies=int(len(frame)),
        n_subjects=int(frame["subject_id"].nunique()),
        studies_per_split={str(k): int(v) for k, v in frame["split"].value_counts().sort_index().items()},
    )
    if splits_path is not None:
        dataset_info["splits"] = {"file": splits_path.name, "sha256": _sha256(splits_path)}
    dataset_json = out_dir / DATASET_FILE
    write_json_atomic(dataset_json, dataset_info)
    logger.info("wrote manifest %s: %d studies, %d subjects", manifest, len(frame), frame["subject_id"].nunique())
    return AdapterResult(frame=frame, manifest=manifest, dataset_json=dataset_json, splits=splits_path, info=dataset_info)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _register_builtin() -> None:
    from harness.adapters.bimcv_r import BimcvRAdapter
    from harness.adapters.generic import GenericAdapter

    for adapter in (GenericAdapter(), BimcvRAdapter()):
        if adapter.name not in ADAPTERS:
            ADAPTERS.register(adapter.name, adapter)


_register_builtin()
