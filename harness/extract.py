"""Streaming embedding extraction: manifest rows -> preprocessing workers -> encoder -> cache.

Only the studies missing from the cache are preprocessed. A torch ``DataLoader`` runs
``load_study`` in worker processes, so the encoder is fed while the next volumes are
being resampled. Each batch is encoded and written to the cache as it arrives, so memory
use is one batch of volumes (times the loader's prefetch) however many studies there are.
The returned embeddings for N studies are small and are kept in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from harness.cache import EmbeddingCache, StudyEmbedding
from harness.encoders import Encoder
from harness.manifest import is_missing

logger = logging.getLogger(__name__)

LoadStudy = Callable[[Mapping[str, Any], Any], np.ndarray]


@dataclass
class EmbeddingSet:
    """Embeddings of N studies, in the order of the rows they were extracted for.

    Attributes:
        study_ids: N study ids.
        views: ``(N, Q, D)`` view embeddings.
        pooled: ``(N, D)`` global embeddings.
        attention: ``(N, Q, L)`` view attention over visual tokens, or ``None`` when the
            encoder does not return it.
        sentences: N arrays of ``(S_i, D)`` report sentence embeddings (empty if reports
            were not requested).
    """

    study_ids: list[str]
    views: np.ndarray
    pooled: np.ndarray
    attention: np.ndarray | None
    sentences: list[np.ndarray]


class _StudyVolumes(Dataset):
    """Preprocessed volumes of the studies at ``positions``; runs inside loader workers."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], positions: Sequence[int], spec: Any, load_study: LoadStudy):
        self.rows = rows
        self.positions = list(positions)
        self.spec = spec
        self.load_study = load_study

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        position = self.positions[index]
        volume = self.load_study(self.rows[position], self.spec)
        return position, torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))


def image_paths(row: Mapping[str, Any], sequences: Sequence[str]) -> dict[str, str | None]:
    """Return sequence -> image path for one manifest row; empty or NaN cells become ``None``."""
    paths: dict[str, str | None] = {}
    for sequence in sequences:
        value = row.get(sequence)
        paths[sequence] = None if is_missing(value) else str(value)
    return paths


def extract_embeddings(
    encoder: Encoder,
    rows: Sequence[Mapping[str, Any]],
    cache: EmbeddingCache,
    *,
    spec: Any = None,
    load_study: LoadStudy | None = None,
    reports: bool = True,
    progress: bool = True,
) -> EmbeddingSet:
    """Return image (and report) embeddings for manifest rows, computing only cache misses.

    Args:
        encoder: any :class:`harness.encoders.Encoder`.
        rows: manifest rows as mappings with ``study_id``, image paths by sequence and
            ``report``.
        cache: the embedding cache; its ``batch_size`` and ``workers`` set the loader.
        spec: preprocessing spec (``name``, ``digest``, ``sequences``); defaults to
            ``harness.preprocessing.get_spec(encoder.preprocessing)``.
        load_study: ``(row, spec) -> (C, D, H, W)`` float32 volume; defaults to
            ``harness.preprocessing.load_study``.
        reports: also embed the ``report`` text of every row.
        progress: show a tqdm progress bar while encoding.
    """
    if spec is None or load_study is None:
        from harness import preprocessing

        spec = spec if spec is not None else preprocessing.get_spec(encoder.preprocessing)
        load_study = load_study if load_study is not None else preprocessing.load_study
    rows = [dict(row) for row in rows]

    keys = [cache.image_digest(image_paths(row, spec.sequences)) for row in rows]
    found: dict[int, StudyEmbedding] = {}
    for position, (row, key) in enumerate(zip(rows, keys, strict=True)):
        entry = cache.load_study(encoder.digest, spec.digest, row["study_id"], key)
        if entry is not None:
            found[position] = entry
    misses = [position for position in range(len(rows)) if position not in found]
    found.update(_encode_studies(encoder, rows, misses, keys, cache, spec, load_study, progress))
    cache.flush()
    logger.info("image embeddings for %s: %d from cache, %d computed", encoder.name, len(rows) - len(misses), len(misses))

    sentences = embed_reports(encoder, [str(row.get("report", "")) for row in rows], cache) if reports else []
    entries = [found[position] for position in range(len(rows))]
    return EmbeddingSet(
        study_ids=[str(row["study_id"]) for row in rows],
        views=np.stack([entry.views for entry in entries]) if entries else np.zeros((0, 0, 0), np.float32),
        pooled=np.stack([entry.pooled for entry in entries]) if entries else np.zeros((0, 0), np.float32),
        attention=_stack_optional([entry.attention for entry in entries]),
        sentences=sentences,
    )


def _encode_studies(
    encoder: Encoder,
    rows: list[dict],
    misses: list[int],
    keys: list[str],
    cache: EmbeddingCache,
    spec: Any,
    load_study: LoadStudy,
    progress: bool,
) -> dict[int, StudyEmbedding]:
    """Encode the studies at ``misses`` batch by batch and write each to the cache as it comes."""
    if not misses:
        return {}
    loader = DataLoader(
        _StudyVolumes(rows, misses, spec, load_study),
        batch_size=max(1, cache.batch_size),
        num_workers=max(0, cache.workers),
        shuffle=False,
    )
    device = getattr(encoder, "device", None)
    computed: dict[int, StudyEmbedding] = {}
    with tqdm(total=len(misses), unit="study", desc=f"encode {encoder.name}", disable=not progress) as bar:
        for positions, volumes in loader:
            if device is not None:
                volumes = volumes.to(device)
            with torch.inference_mode():
                output = encoder.encode_images(volumes)
            views = output.views.float().cpu().numpy()
            pooled = output.pooled.float().cpu().numpy()
            attention = None if output.attention is None else output.attention.float().cpu().numpy()
            for index, position in enumerate(positions.tolist()):
                entry = StudyEmbedding(views[index], pooled[index], None if attention is None else attention[index])
                cache.save_study(encoder.digest, spec.digest, rows[position]["study_id"], keys[position], entry)
                computed[position] = entry
            bar.update(len(positions))
    return computed


def embed_reports(encoder: Encoder, texts: Sequence[str], cache: EmbeddingCache) -> list[np.ndarray]:
    """Return ``(S_i, D)`` sentence embeddings per text; each distinct text is encoded once."""
    by_text: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for text in dict.fromkeys(texts):
        cached = cache.load_report(encoder.digest, text)
        if cached is None:
            missing.append(text)
        else:
            by_text[text] = cached
    chunk = max(1, cache.batch_size) * 8
    for start in range(0, len(missing), chunk):
        batch = missing[start : start + chunk]
        with torch.inference_mode():
            encoded = encoder.encode_reports(batch)
        for text, sentences in zip(batch, encoded, strict=True):
            array = sentences.float().cpu().numpy()
            cache.save_report(encoder.digest, text, array)
            by_text[text] = array
    logger.info("report embeddings for %s: %d from cache, %d computed", encoder.name, len(by_text) - len(missing), len(missing))
    return [by_text[text] for text in texts]


def _stack_optional(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    if not arrays or any(array is None for array in arrays):
        return None
    return np.stack(arrays)
