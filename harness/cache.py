"""Embedding cache: per-study image embeddings and per-report sentence embeddings on disk.

Layout under the cache folder::

    file-digests.json                      sha256 of image files, memoised by (path, size, mtime_ns)
    <model_digest[:16]>/<spec_digest[:12]>/<study_id>-<image_digest[:12]>.safetensors
    <model_digest[:16]>/reports/<text_sha256[:16]>.safetensors

A study entry is keyed by the model digest, the preprocessing spec digest, the study id
and the digest of the study's image files. A changed checkpoint, spec or image file
therefore selects a new entry, and the stale one is not read again. Report entries
depend on the model and the report text only. Every file is written to a temporary name in the
same folder and renamed into place, so a reader (or a second process sharing the cache)
sees either no entry or a complete one. The shared digest index is guarded by a file lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from harness.io import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

DIGEST_INDEX = "file-digests.json"
MISSING_IMAGE = "missing"
_CHUNK = 1 << 20
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Return the hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DigestIndex:
    """File digests memoised by ``(absolute path, size, mtime_ns)`` in a JSON index.

    Re-runs look a file up by its stat instead of hashing gigabytes again. A file that
    changes size or modification time is hashed again. New digests are kept in memory
    and merged into the index file by :meth:`flush` under a file lock: the flush re-reads
    the file inside the lock, so entries that another process wrote are kept.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock")
        self._entries: dict[str, dict] = self._read()
        self._pending: dict[str, dict] = {}
        self.hashed = 0

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            logger.warning("digest index %s is not valid JSON; starting a new one", self.path)
            return {}

    def digest(self, path: str | os.PathLike[str]) -> str:
        """Return the sha256 of the file at ``path``, hashing it only if its stat changed."""
        resolved = str(Path(path).resolve())
        stat = os.stat(resolved)
        entry = self._pending.get(resolved) or self._entries.get(resolved)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        value = sha256_file(resolved)
        self.hashed += 1
        self._pending[resolved] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": value}
        return value

    def flush(self) -> None:
        """Merge new digests into the index file (locked, atomic); a no-op when nothing is new."""
        if not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            merged = self._read()
            merged.update(self._pending)
            write_json_atomic(self.path, merged, indent=None)
        self._entries = merged
        self._pending = {}


@dataclass
class StudyEmbedding:
    """Cached image-side outputs for one study.

    Attributes:
        views: ``(Q, D)`` L2-normalised view embeddings.
        pooled: ``(D,)`` global embedding.
        attention: ``(Q, L)`` attention of each view over the visual tokens, or ``None``.
    """

    views: np.ndarray
    pooled: np.ndarray
    attention: np.ndarray | None = None


@dataclass
class CacheStats:
    """Hit and miss counts of one cache object."""

    study_hits: int = 0
    study_misses: int = 0
    report_hits: int = 0
    report_misses: int = 0


class EmbeddingCache:
    """Per-study and per-report embeddings under one folder (see the module docstring).

    Args:
        root: cache folder; created on first write.
        batch_size: studies per encoder batch when the cache is filled by
            :func:`harness.extract.extract_embeddings`.
        workers: preprocessing worker processes for filling the cache (0 = in-process).
    """

    def __init__(self, root: str | os.PathLike[str], *, batch_size: int = 2, workers: int = 0) -> None:
        self.root = Path(root)
        self.batch_size = batch_size
        self.workers = workers
        self.stats = CacheStats()
        self._digests: DigestIndex | None = None

    @property
    def digests(self) -> DigestIndex:
        if self._digests is None:
            self._digests = DigestIndex(self.root / DIGEST_INDEX)
        return self._digests

    def image_digest(self, images: Mapping[str, str | os.PathLike[str] | None]) -> str:
        """Combine the digests of a study's image files into one hex sha256.

        Args:
            images: sequence name -> file path; ``None`` marks a missing sequence, which
                is part of the key because it becomes a zero channel.
        """
        parts = []
        for sequence in sorted(images):
            path = images[sequence]
            parts.append(f"{sequence}={self.digests.digest(path) if path else MISSING_IMAGE}")
        return sha256_text("\n".join(parts))

    def study_path(self, model_digest: str, spec_digest: str, study_id: str, image_digest: str) -> Path:
        safe_id = _UNSAFE_NAME.sub("_", str(study_id))
        return self.root / model_digest[:16] / spec_digest[:12] / f"{safe_id}-{image_digest[:12]}.safetensors"

    def report_path(self, model_digest: str, text_digest: str) -> Path:
        return self.root / model_digest[:16] / "reports" / f"{text_digest[:16]}.safetensors"

    def load_study(self, model_digest: str, spec_digest: str, study_id: str, image_digest: str) -> StudyEmbedding | None:
        """Return the cached entry, or ``None`` (counted as a miss) if there is none."""
        path = self.study_path(model_digest, spec_digest, study_id, image_digest)
        tensors = _load(path)
        if tensors is None:
            self.stats.study_misses += 1
            return None
        self.stats.study_hits += 1
        return StudyEmbedding(tensors["views"], tensors["pooled"], tensors.get("attention"))

    def save_study(
        self, model_digest: str, spec_digest: str, study_id: str, image_digest: str, entry: StudyEmbedding
    ) -> Path:
        """Write one study's embeddings atomically and return the path."""
        tensors = {"views": entry.views, "pooled": entry.pooled}
        if entry.attention is not None:
            tensors["attention"] = entry.attention
        path = self.study_path(model_digest, spec_digest, study_id, image_digest)
        _save(path, tensors, {"study_id": str(study_id), "model_digest": model_digest, "spec_digest": spec_digest})
        return path

    def load_report(self, model_digest: str, text: str) -> np.ndarray | None:
        """Return the cached ``(S, D)`` sentence embeddings of a report text, or ``None``."""
        tensors = _load(self.report_path(model_digest, sha256_text(text)))
        if tensors is None:
            self.stats.report_misses += 1
            return None
        self.stats.report_hits += 1
        return tensors["sentences"]

    def save_report(self, model_digest: str, text: str, sentences: np.ndarray) -> Path:
        """Write the ``(S, D)`` sentence embeddings of a report text atomically."""
        path = self.report_path(model_digest, sha256_text(text))
        _save(path, {"sentences": sentences}, {"model_digest": model_digest})
        return path

    def entries(self, model_digest: str | None = None) -> list[Path]:
        """List complete study and report entries (temporary files of unfinished writes excluded)."""
        base = self.root / model_digest[:16] if model_digest else self.root
        return sorted(p for p in base.rglob("*.safetensors") if not p.name.startswith("."))

    def flush(self) -> None:
        """Persist new file digests to the shared index."""
        if self._digests is not None:
            self._digests.flush()


def _save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    contiguous = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def _load(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        # Entries are renamed into place only when complete, so this means outside damage.
        logger.warning("ignoring unreadable cache entry %s: %s", path, error)
        return None

