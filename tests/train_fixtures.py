"""A tiny cohort, spec and model config for the pretraining tests (real NIfTI, MONAI and torch).

Importing this module registers the preprocessing spec ``test-train`` (T1c, 2 mm,
resized to 16x48x48), which gives the ``densenet-tiny`` backbone a 3x3 token grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from harness.preprocessing import SPECS, PreprocessingSpec, register_spec

TRAIN_SPEC = PreprocessingSpec(
    "test-train", version=1, sequences=("t1c",), pixdim=(2.0, 2.0, 2.0), axcodes="SAR", spatial_size=(16, 48, 48)
)
if TRAIN_SPEC.name not in SPECS:
    register_spec(TRAIN_SPEC)

# Lesion corner (voxel index) and the report sentence that describes it.
LOCATIONS = (
    ((2, 2, 4), "There is an enhancing lesion in the right frontal lobe."),
    ((14, 2, 4), "There is an enhancing lesion in the left frontal lobe."),
    ((2, 14, 8), "There is an enhancing lesion in the right occipital lobe."),
    ((14, 14, 8), "There is an enhancing lesion in the left occipital lobe."),
)
SPLITS = {"train": 16, "val": 8, "test": 4}


def write_training_cohort(folder: Path, seed: int = 0) -> Path:
    """Write 28 small T1c studies (one per subject) with a bright lesion the report locates; return the manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    index = 0
    for split, count in SPLITS.items():
        for _ in range(count):
            corner, sentence = LOCATIONS[index % len(LOCATIONS)]
            data = rng.normal(100.0, 10.0, size=(22, 22, 16)).astype(np.float32)
            x, y, z = corner
            data[x : x + 6, y : y + 6, z : z + 5] += 250.0
            path = folder / "images" / f"s{index:03d}_t1c.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
            size = 10 + index % 7
            rows.append({
                "study_id": f"s{index:03d}", "subject_id": f"p{index:03d}", "split": split, "t1c": str(path),
                "report": f"FINDINGS: {sentence} It measures {size} mm. No midline shift.",
            })  # fmt: skip
            index += 1
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def model_overrides(text_folder: Path) -> dict[str, Any]:
    """brat-tiny shrunk to the 16x48x48 test spec: 4 queries, a one-layer 32-wide Q-Former, no dropout."""
    return {
        "image_size": [16, 48, 48], "preprocessing": "test-train", "num_query_tokens": 4,
        "qformer_hidden_size": 32, "qformer_num_layers": 1, "qformer_num_heads": 2,
        "qformer_intermediate_size": 64, "embed_dim": 16, "text_encoder": str(text_folder),
        "hidden_dropout_prob": 0.0,
    }  # fmt: skip


def base_config(manifest: Path, output: Path, cache_dir: Path, text_folder: Path, **changes: Any) -> dict[str, Any]:
    """A pretraining config mapping for the test cohort: 2 epochs of 4 steps each."""
    config = {
        "name": "test", "model": "brat-tiny", "model_overrides": model_overrides(text_folder), "objective": "pva",
        "manifest": str(manifest), "output": str(output), "cache_dir": str(cache_dir), "preprocess_workers": 1,
        "seed": 0, "epochs": 2, "batch_size": 4, "eval_batch_size": 8,
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01}, "scheduler": {"warmup_steps": 1},
        "checkpoint_every": 2, "log_every": 1, "num_workers": 0, "threads": 1, "device": "cpu", "progress": False,
    }  # fmt: skip
    config.update(changes)
    return config
