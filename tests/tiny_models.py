"""Small real components for the core tests: a tiny encoder, tiny specs and a tiny cohort.

Importing this module registers:

- preprocessing specs ``test-tiny`` and ``test-tiny-b`` (the real MONAI pipeline, resized
  to 8x16x16 and 8x12x12, T1c only), so tests stay fast;
- encoder loader ``tiny`` (:class:`TinyEncoder`), so suites and subprocesses can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from harness.encoders import ENCODER_LOADERS, ImageEmbeddings
from harness.preprocessing import SPECS, PreprocessingSpec, register_spec

TEST_SPEC = PreprocessingSpec("test-tiny", version=1, sequences=("t1c",), pixdim=(2.0, 2.0, 2.0), axcodes="SAR", spatial_size=(8, 16, 16))
TEST_SPEC_B = PreprocessingSpec("test-tiny-b", version=1, sequences=("t1c",), pixdim=(2.0, 2.0, 2.0), axcodes="SAR", spatial_size=(8, 12, 12))
for _spec in (TEST_SPEC, TEST_SPEC_B):
    if _spec.name not in SPECS:
        register_spec(_spec)

# Seconds each encode_images call sleeps, so a test can stop a run between jobs.
SLOW_ENV = "BRAT_TEST_ENCODER_DELAY"


class TinyEncoder(torch.nn.Module):
    """Conv3d tokens, Q learned queries attending over them, and hashed bag-of-words sentences.

    ``text_table`` maps a report text to fixed sentence embeddings, an oracle for
    retrieval tests. Other texts are split into sentences at full stops and embedded as
    signed hashed word counts. ``fail`` makes ``encode_images`` raise.
    """

    def __init__(
        self, name: str = "tiny", seed: int = 0, views: int = 4, dim: int = 16, preprocessing: str = "test-tiny",
        scorer: str = "pva", fail: bool = False, text_table: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv3d(1, 8, kernel_size=3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.3)
            self.conv.bias.zero_()
        self.queries = torch.nn.Parameter(torch.randn(views, 8, generator=generator))
        self.proj = torch.nn.Parameter(torch.randn(8, dim, generator=generator))
        self.name, self.preprocessing, self.scorer, self.fail, self.dim = name, preprocessing, scorer, fail, dim
        self.text_table = {k: np.asarray(v, np.float32) for k, v in (text_table or {}).items()}
        self.images_encoded = 0
        self.reports_encoded = 0
        self.eval()

    @property
    def digest(self) -> str:
        digest = hashlib.sha256(json.dumps([self.name, self.preprocessing, self.scorer, self.dim]).encode())
        for value in self.state_dict().values():
            digest.update(value.numpy().tobytes())
        for text in sorted(self.text_table):
            digest.update(text.encode() + self.text_table[text].tobytes())
        return digest.hexdigest()

    def encode_images(self, batch: torch.Tensor) -> ImageEmbeddings:
        if self.fail:
            raise RuntimeError("TinyEncoder was built with fail=True")
        time.sleep(float(os.environ.get(SLOW_ENV, "0")))
        self.images_encoded += batch.shape[0]
        tokens = F.relu(self.conv(batch[:, :1])).flatten(2).transpose(1, 2)  # (B, L, 8)
        attention = torch.softmax(self.queries @ tokens.transpose(1, 2) / 8**0.5, dim=-1)  # (B, Q, L)
        views = F.normalize((attention @ tokens) @ self.proj, dim=-1)  # (B, Q, D)
        return ImageEmbeddings(views=views, pooled=F.normalize(views.mean(1), dim=-1), attention=attention)

    def encode_reports(self, texts: Sequence[str]) -> list[torch.Tensor]:
        self.reports_encoded += len(texts)
        return [torch.from_numpy(self.text_table[t]) if t in self.text_table else self._bag_of_words(t) for t in texts]

    def _bag_of_words(self, text: str) -> torch.Tensor:
        rows = []
        for sentence in (s for s in text.split(".") if s.strip()):
            vector = torch.zeros(self.dim)
            for word in re.findall(r"\w+", sentence.lower()):
                code = zlib.crc32(word.encode())
                vector[code % self.dim] += 1.0 if code & 1 << 20 else -1.0
            rows.append(F.normalize(vector, dim=0))
        return torch.stack(rows) if rows else torch.zeros((0, self.dim))

    def segmentation_backbone(self) -> torch.nn.Module:
        return self.conv


def load_tiny(**kwargs) -> TinyEncoder:
    return TinyEncoder(**kwargs)


if "tiny" not in ENCODER_LOADERS:
    ENCODER_LOADERS.register("tiny", load_tiny)


def write_volume(path: Path, rng: np.random.Generator, shape=(12, 14, 10)) -> Path:
    """Write a small float32 NIfTI at 2 mm: smooth noise with a bright block at a random place."""
    data = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    corner = [int(rng.integers(0, n - 4)) for n in shape]
    data[corner[0] : corner[0] + 4, corner[1] : corner[1] + 4, corner[2] : corner[2] + 4] += 200.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def make_cohort(folder: Path, n: int = 8, seed: int = 0, test_fraction: float = 1.0) -> Path:
    """Write ``n`` studies (two per subject) with reports and a manifest; return the manifest path.

    The first ``round(n * test_fraction)`` studies (rounded down to whole subjects) are in
    ``test``, the rest in ``train``.
    """
    rng = np.random.default_rng(seed)
    findings = ["frontal lesion", "enhancing mass", "white matter change", "edema", "atrophy", "normal study"]
    n_test = int(round(n * test_fraction))
    n_test -= n_test % 2  # whole subjects: two studies each
    rows = []
    for index in range(n):
        rows.append({
            "study_id": f"study{index:03d}",
            "subject_id": f"subject{index // 2:03d}",
            "split": "test" if index < n_test else "train",
            "t1c": str(write_volume(folder / "images" / f"study{index:03d}_t1c.nii.gz", rng)),
            "report": f"Study {index} shows {findings[index % len(findings)]}. Grade {index % 3} finding {index}.",
        })
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def load_tiny_checkpoint(path: str, **kwargs) -> TinyEncoder:
    """Load a 'checkpoint' written by :func:`pretrain_tiny`: a folder with the encoder's seed."""
    config = json.loads((Path(path) / "config.json").read_text())
    return TinyEncoder(seed=config["seed"], **kwargs)


def pretrain_tiny(config: dict, out_dir: Path) -> Path:
    """A stand-in pretrainer: records its call and writes a checkpoint folder for ``tiny-checkpoint``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"seed": int(config["epochs"]), "manifest": config["manifest"], "cache_dir": config["cache_dir"]}))
    calls = Path(config["manifest"]).parent / "pretrain-calls.txt"
    with open(calls, "a") as handle:
        handle.write(config["name"] + "\n")
    return out_dir


def _register_runner_parts() -> None:
    from harness.runner import PRETRAINERS

    if "tiny-checkpoint" not in ENCODER_LOADERS:
        ENCODER_LOADERS.register("tiny-checkpoint", load_tiny_checkpoint)
    if "tiny" not in PRETRAINERS:
        PRETRAINERS.register("tiny", pretrain_tiny)


_register_runner_parts()
