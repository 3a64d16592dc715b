"""Training data for brat pretraining: preprocessed studies, split reports and cached sentence features.

Studies are preprocessed once with :func:`harness.preprocessing.preprocess_manifest` into
``.npy`` arrays, which :class:`PretrainingDataset` opens with memory mapping, so an epoch
does no MONAI work. Reports are split into sentences once. When the model's text encoder
is frozen, :class:`SentenceFeatureCache` embeds every sentence once and keeps the
features on disk, and batches carry those features instead of text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from harness.checks import require_split_integrity
from harness.manifest import is_missing, read_manifest
from harness.preprocessing import get_spec, output_folder, preprocess_manifest, study_filename

logger = logging.getLogger(__name__)

SENTENCE_FEATURES_DIR = "sentence-features"
SENTENCE_BATCH_SIZE = 256


class TrainingDataError(ValueError):
    """A manifest split that cannot be used for training; the message names the file and split."""


@dataclass(frozen=True)
class StudyRecord:
    """One usable study of a split: its preprocessed array and its report split into sentences."""

    study_id: str
    array_path: Path
    sentences: tuple[str, ...]


def preprocess_for_training(
    manifest: str | os.PathLike[str], spec_name: str, cache_dir: str | os.PathLike[str], workers: int, progress: bool
) -> tuple[Path, dict[str, str]]:
    """Preprocess every study of ``manifest`` into ``cache_dir`` (up-to-date studies are skipped).

    Returns the folder of ``.npy`` arrays and ``{study_id: error}`` for studies that failed.
    """
    result = preprocess_manifest(manifest, spec_name, cache_dir, workers=workers, progress=progress)
    if result["failed"]:
        logger.warning(
            "%d studies failed preprocessing and are left out of training (ids and errors at DEBUG level)",
            result["failed"],
        )
        for study_id, error in result["errors"].items():
            logger.debug("preprocessing failed for %r: %s", study_id, error)
    return Path(result["output_dir"]), dict(result["errors"])


def load_split_records(
    manifest: str | os.PathLike[str], split: str, array_folder: str | os.PathLike[str]
) -> list[StudyRecord]:
    """Return the studies of ``split`` that have a preprocessed array and at least one report sentence.

    The manifest's split integrity (no subject in two splits) is checked first. Studies
    without an array (failed preprocessing) or without sentences are left out with a
    warning that gives their count.

    Raises:
        TrainingDataError: the split has no usable study.
    """
    from pretrained.text import split_sentences

    df = read_manifest(manifest)
    require_split_integrity(df)
    if "split" not in df.columns:
        raise TrainingDataError(f"{manifest}: missing column 'split'; every study needs train, val or test")
    rows = df[df["split"] == split]
    records, no_array, no_sentences = [], 0, 0
    for record in rows.to_dict(orient="records"):
        study_id = str(record["study_id"])
        path = Path(array_folder) / f"{study_filename(study_id)}.npy"
        if not path.is_file():
            no_array += 1
            continue
        report = "" if is_missing(record.get("report")) else str(record["report"])
        sentences = tuple(split_sentences(report))
        if not sentences:
            no_sentences += 1
            logger.debug("study %r has an empty report", study_id)
            continue
        records.append(StudyRecord(study_id, path, sentences))

    if no_array or no_sentences:
        logger.warning(
            "split %r: left out %d studies without a preprocessed array and %d with an empty report",
            split, no_array, no_sentences,
        )  # fmt: skip
    if not records:
        splits = sorted(str(s) for s in df["split"].dropna().unique())
        raise TrainingDataError(
            f"{manifest}: split {split!r} has no usable study ({len(rows)} rows, {no_array} without a "
            f"preprocessed array, {no_sentences} with an empty report); splits in the file: {splits}"
        )
    logger.info("split %r: %d studies", split, len(records))
    return records


def array_folder_for(cache_dir: str | os.PathLike[str], spec_name: str) -> Path:
    """Return the folder where :func:`preprocess_for_training` writes arrays of ``spec_name``."""
    return output_folder(cache_dir, get_spec(spec_name))


class SentenceFeatureCache:
    """Sentence features of a frozen text encoder, computed once per sentence and kept on disk.

    The file name carries the SHA-256 of the encoder's files and the token limit, so a
    changed encoder never reuses old features. Entries are keyed by the SHA-256 of the
    sentence text, so the file contains no report text.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], encoder_digest: str, max_length: int) -> None:
        self.path = Path(cache_dir) / SENTENCE_FEATURES_DIR / f"{encoder_digest[:16]}-len{max_length}.safetensors"
        self._features: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            from safetensors.torch import load_file

            self._features = load_file(str(self.path))
            logger.info("loaded %d cached sentence features from %s", len(self._features), self.path)

    @staticmethod
    def key(sentence: str) -> str:
        return hashlib.sha256(sentence.encode("utf-8")).hexdigest()

    def update(self, sentences: Sequence[str], text_encoder: torch.nn.Module) -> int:
        """Embed the sentences not yet cached with ``text_encoder`` and rewrite the file. Returns the number of sentences embedded."""
        missing = list(dict.fromkeys(s for s in sentences if self.key(s) not in self._features))
        if not missing:
            return 0
        with torch.no_grad():
            for start in range(0, len(missing), SENTENCE_BATCH_SIZE):
                chunk = missing[start : start + SENTENCE_BATCH_SIZE]
                features, _ = text_encoder([[sentence] for sentence in chunk])  # (n, 1, H)
                for sentence, vector in zip(chunk, features[:, 0].float().cpu(), strict=True):
                    self._features[self.key(sentence)] = vector.contiguous()
        self._write()
        logger.info("embedded %d new sentences; %d cached in %s", len(missing), len(self._features), self.path)
        return len(missing)

    def _write(self) -> None:
        from safetensors.torch import save

        from harness.io import write_bytes_atomic

        write_bytes_atomic(self.path, save(self._features))

    def features(self, sentences: Sequence[str]) -> torch.Tensor:
        """Return the cached features ``(S, H)`` of one report's sentences."""
        try:
            return torch.stack([self._features[self.key(s)] for s in sentences])
        except KeyError:
            raise KeyError(
                f"a sentence is missing from {self.path}; call update() with every report before training"
            ) from None


class PretrainingDataset(Dataset):
    """Preprocessed studies with their reports.

    Item ``i`` is a dict with ``index`` (int), ``image`` (float32 ``(C, D, H, W)``, read
    through a memory map) and either ``features`` (``(S_i, H)`` cached sentence features)
    or ``sentences`` (tuple of strings).
    """

    def __init__(self, records: Sequence[StudyRecord], feature_cache: SentenceFeatureCache | None = None) -> None:
        self.records = list(records)
        self.features = None
        if feature_cache is not None:
            self.features = [feature_cache.features(record.sentences) for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        array = np.load(record.array_path, mmap_mode="r")
        item: dict[str, Any] = {"index": index, "image": torch.from_numpy(np.array(array, dtype=np.float32))}
        if self.features is not None:
            item["features"] = self.features[index]
        else:
            item["sentences"] = record.sentences
        return item


def collate_studies(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch.

    Returns a dict with ``index`` ``(B,)``, ``images`` ``(B, C, D, H, W)`` and either
    ``features`` ``(B, S_max, H)`` with ``sentence_mask`` ``(B, S_max)`` (zero padding), or
    ``sentences`` (list of ``B`` sentence tuples).
    """
    batch: dict[str, Any] = {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "images": torch.stack([item["image"] for item in items]),
    }
    if "features" in items[0]:
        counts = [item["features"].shape[0] for item in items]
        width = items[0]["features"].shape[1]
        features = torch.zeros(len(items), max(counts), width)
        mask = torch.zeros(len(items), max(counts), dtype=torch.bool)
        for row, (item, count) in enumerate(zip(items, counts, strict=True)):
            features[row, :count] = item["features"]
            mask[row, :count] = True
        batch["features"], batch["sentence_mask"] = features, mask
    else:
        batch["sentences"] = [item["sentences"] for item in items]
    return batch


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from the seed torch gave that worker.

    torch derives each worker's seed from the DataLoader's ``generator``, so a seeded
    generator makes every worker's random streams reproducible.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
