"""Checkpoint folders: write atomically, load strictly, hash for cache keys.

A checkpoint is a folder with:

- ``config.json``: the :class:`~pretrained.config.BratConfig` (architecture, preprocessing
  name, objective, scorer, text encoder reference) plus the SHA-256 of a referenced
  frozen text encoder;
- ``model.safetensors``: every weight except a frozen text encoder's, which is referenced
  by name or path instead of copied;
- ``preprocessing.json``: the preprocessing spec's fields and digest;
- ``adaptation.json``: the plan for segmentation transfer (input channels and their order,
  spacing, normalisation, encoder key prefix, recommended patch size, feature strides);
- optionally ``metadata.json`` (free-form, not part of the digest), ``released_extras.safetensors``
  (released tensors the harness does not use) and ``text_encoder/`` (config and tokenizer
  of a text encoder that was trained, whose weights are in ``model.safetensors``).

:func:`model_digest` is the SHA-256 of ``config.json`` bytes followed by
``model.safetensors`` bytes, so it changes whenever the architecture or a weight changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.io import write_bytes_atomic, write_json_atomic
from pretrained.config import BratConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"
PREPROCESSING_FILE = "preprocessing.json"
ADAPTATION_FILE = "adaptation.json"
METADATA_FILE = "metadata.json"
EXTRAS_FILE = "released_extras.safetensors"
TRAINED_TEXT_ENCODER_DIR = "text_encoder"

# Keys of config.json that belong to the checkpoint, not to BratConfig.
_CHECKPOINT_KEYS = ("checkpoint_format", "text_encoder_sha256")
CHECKPOINT_FORMAT = 1

# Facts of the named preprocessing specs that the adaptation plan repeats, so that a
# segmentation pipeline can read them without importing the harness.
_PREPROCESSING_FACTS: dict[str, dict[str, Any]] = {
    "brat-v1": {"orientation": "SAR", "spacing_mm": [1.0, 1.0, 1.0], "resize": [32, 256, 256]},
    "brat-v1-multimodal": {"orientation": "SAR", "spacing_mm": [1.0, 1.0, 1.0], "resize": [32, 256, 256]},
    "brat-tiny": {"orientation": "SAR", "spacing_mm": [1.0, 1.0, 1.0], "resize": [32, 128, 128]},
}
_NORMALISATION = "z-score over non-zero voxels per channel, then min-max rescale per channel to [0, 1]"


# --------------------------------------------------------------------------- bytes and digests


def config_bytes(model_or_config, text_encoder_sha256: str | None = None) -> bytes:
    """Return the exact ``config.json`` bytes written for a model or config."""
    config: BratConfig = getattr(model_or_config, "config", model_or_config)
    data = config.to_dict()
    data["checkpoint_format"] = CHECKPOINT_FORMAT
    if config.text_path == "hf" and config.text_frozen:
        data["text_encoder_sha256"] = text_encoder_sha256 or referenced_text_encoder_digest(config.text_encoder)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def weights_bytes(model) -> bytes:
    """Return the exact ``model.safetensors`` bytes written for ``model``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.checkpoint_state_dict().items()}
    return save(state)


@functools.lru_cache(maxsize=8)
def _folder_digest(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode("utf-8") + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def referenced_text_encoder_digest(reference: str) -> str:
    """SHA-256 over the files of a referenced text encoder folder (cached per folder state)."""
    from pretrained.text import resolve_text_folder

    folder = resolve_text_folder(reference)
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file())
    return _folder_digest(str(folder), stamp)


def model_digest(folder_or_model) -> str:
    """SHA-256 of ``config.json`` + ``model.safetensors`` bytes, for a folder or a model in memory.

    A model in memory hashes the bytes :func:`save_checkpoint` would write, so a model and
    its saved checkpoint have the same digest.
    """
    if isinstance(folder_or_model, (str, os.PathLike)):
        folder = Path(folder_or_model)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            weights = folder / PICKLED_WEIGHTS_FILE
        parts = [(folder / CONFIG_FILE).read_bytes(), weights.read_bytes()]
    else:
        parts = [config_bytes(folder_or_model), weights_bytes(folder_or_model)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


# --------------------------------------------------------------------------- side files


def preprocessing_record(name: str) -> dict[str, Any]:
    """Return the preprocessing spec's fields and digest, or the name alone if no spec is known."""
    try:
        from harness.preprocessing import get_spec
    except ImportError:
        # NOTE: without harness.preprocessing only the spec name is recorded.
        logger.warning("harness.preprocessing is not available; preprocessing.json records the name %r only", name)
        return {"name": name}
    spec = get_spec(name)
    if hasattr(spec, "to_dict"):
        record = dict(spec.to_dict())
    elif hasattr(spec, "__dataclass_fields__"):
        import dataclasses

        record = dataclasses.asdict(spec)
    else:
        record = {"name": name}
    record.setdefault("name", name)
    digest = getattr(spec, "digest", None)
    if digest is not None:
        record["digest"] = digest
    return json.loads(json.dumps(record, default=str))


def adaptation_plan(config: BratConfig) -> dict[str, Any]:
    """Return the plan for transferring the vision backbone to a segmentation network."""
    from pretrained.backbones import feature_geometry, get_backbone_spec

    spec = get_backbone_spec(config.backbone)
    patch = spec.recommended_patch_size
    strides, channels = feature_geometry(config.backbone, config.in_channels, patch)
    facts = _PREPROCESSING_FACTS.get(config.preprocessing, {})
    return {
        "backbone": config.backbone,
        "in_channels": config.in_channels,
        "channel_order": list(config.sequences),
        "missing_sequence": "all-zero channel",
        "target_spacing_mm": facts.get("spacing_mm"),
        "orientation": facts.get("orientation"),
        "pretraining_input_size": list(config.image_size),
        "normalisation": _NORMALISATION,
        "preprocessing": config.preprocessing,
        "encoder_key_prefix": f"visual_encoder.{spec.attribute}." + ("features." if spec.attribute == "densenet" else ""),
        "recommended_patch_size": list(patch),
        "feature_strides": strides,
        "feature_channels": channels,
    }


# --------------------------------------------------------------------------- save


def _write_folder_atomic(folder: Path, write) -> None:
    """Call ``write(tmp_folder)`` and move the result onto ``folder`` in one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = None
    try:
        write(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old / folder.name, folder)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    model,
    folder: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as a checkpoint folder, replacing ``folder`` atomically.

    Args:
        model: a :class:`~pretrained.model.BratModel`.
        folder: destination; an existing folder is replaced only once the new one is complete.
        extra: JSON-ready metadata (training step, source file, ...) for ``metadata.json``.
        extra_tensors: tensors kept beside the model, such as released keys the harness
            does not use; written to ``released_extras.safetensors``.

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save

    folder = Path(folder)
    config = model.config
    trained_text_encoder = config.text_path == "hf" and not config.text_frozen

    def write(tmp: Path) -> None:
        saved_config = config.replace(text_encoder=TRAINED_TEXT_ENCODER_DIR) if trained_text_encoder else config
        write_bytes_atomic(tmp / CONFIG_FILE, config_bytes(saved_config))
        write_bytes_atomic(tmp / WEIGHTS_FILE, weights_bytes(model))
        write_json_atomic(tmp / PREPROCESSING_FILE, preprocessing_record(config.preprocessing))
        write_json_atomic(tmp / ADAPTATION_FILE, adaptation_plan(config))
        if extra:
            write_json_atomic(tmp / METADATA_FILE, extra)
        if extra_tensors:
            tensors = {k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}
            write_bytes_atomic(tmp / EXTRAS_FILE, save(tensors))
        if trained_text_encoder:
            # Config and tokenizer only: the trained weights are in model.safetensors.
            encoder = model.text_encoder
            encoder.model.config.save_pretrained(tmp / TRAINED_TEXT_ENCODER_DIR)
            encoder.tokenizer.save_pretrained(tmp / TRAINED_TEXT_ENCODER_DIR)

    _write_folder_atomic(folder, write)
    logger.info("saved checkpoint %s (config %s)", folder, config.name)
    return folder


# --------------------------------------------------------------------------- load

# MONAI 1.4 builds an unused ``cross_attn`` block in every ViT TransformerBlock and 1.6
# builds none, so these keys are the one place where checkpoints and models of the two
# versions differ. The blocks are never called (``with_cross_attention=False``).
_VIT_CROSS_ATTENTION = re.compile(r"^visual_encoder\.vit\.blocks\.\d+\.cross_attn\.")


def reconcile_vit_cross_attention(
    model_keys: set[str], state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Apply the MONAI version rule for ViT ``cross_attn`` keys.

    Keys under ``visual_encoder.vit.blocks.N.cross_attn.`` that the installed MONAI does not
    create are moved out of ``state`` and returned as the second value, so the caller can
    keep them. Such keys that the model has but ``state`` lacks keep their initial values
    (they are unused). Every other key is left to the strict check.
    """
    remaining = dict(state)
    removed = {k: remaining.pop(k) for k in list(remaining) if _VIT_CROSS_ATTENTION.match(k) and k not in model_keys}
    if removed:
        logger.info("set aside %d unused ViT cross_attn tensors (written by another MONAI version)", len(removed))
    return remaining, removed


def load_state_strict(model, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error.

    A frozen text encoder is not part of a checkpoint, so its keys are exempt. The ViT
    ``cross_attn`` keys follow :func:`reconcile_vit_cross_attention`, and the tensors it
    sets aside are returned.
    """
    expected = model.checkpoint_state_dict()
    state, set_aside = reconcile_vit_cross_attention(set(expected), state)
    missing = sorted(k for k in expected if k not in state and not _VIT_CROSS_ATTENTION.match(k))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source}: weights do not match config {model.config.name!r}: "
            f"{len(missing)} missing keys {missing[:20]}, {len(unexpected)} unexpected keys {unexpected[:20]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:20]}; check that the config (backbone, "
            "in_channels, Q-Former sizes) belongs to these weights"
        )
    result = model.load_state_dict(state, strict=False)
    # Only a frozen text encoder and unused ViT cross_attn tensors may be absent here.
    leftover = [k for k in result.missing_keys if not (k.startswith("text_encoder.") or _VIT_CROSS_ATTENTION.match(k))]
    if leftover or result.unexpected_keys:
        raise ValueError(f"{source}: load_state_dict left keys unmatched: {leftover + result.unexpected_keys}")
    return set_aside



def read_config(folder: str | os.PathLike[str]) -> tuple[BratConfig, dict[str, Any]]:
    """Read ``config.json``; returns the config and the checkpoint-level fields."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a brat checkpoint folder needs config.json and model.safetensors")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    checkpoint_fields = {key: data.pop(key) for key in _CHECKPOINT_KEYS if key in data}
    config = BratConfig.from_dict(data, source=str(path))
    if config.text_path == "hf" and not config.text_frozen and config.text_encoder == TRAINED_TEXT_ENCODER_DIR:
        config = config.replace(text_encoder=str(Path(folder) / TRAINED_TEXT_ENCODER_DIR))
    return config, checkpoint_fields


def read_weights(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (or a pickled ``pytorch_model.bin`` with ``weights_only=True``)."""
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_FILE))
    if (folder / PICKLED_WEIGHTS_FILE).is_file():
        return torch.load(folder / PICKLED_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_FILE} nor {PICKLED_WEIGHTS_FILE} found")


def load_checkpoint(folder: str | os.PathLike[str], device: str | torch.device = "cpu"):
    """Build the model described by ``config.json`` and load its weights strictly.

    The model is returned in eval mode on ``device``; call ``.train()`` to continue training.

    Raises:
        ValueError: listing missing and unexpected keys, or mismatched shapes.
    """
    from pretrained.model import BratModel

    folder = Path(folder)
    config, checkpoint_fields = read_config(folder)
    expected_text_digest = checkpoint_fields.get("text_encoder_sha256")
    if expected_text_digest is not None:
        actual = referenced_text_encoder_digest(config.text_encoder)
        if actual != expected_text_digest:
            logger.warning(
                "%s: the referenced text encoder %r has changed since the checkpoint was saved "
                "(sha256 %s, saved %s); sentence embeddings will differ",
                folder, config.text_encoder, actual[:12], expected_text_digest[:12],
            )
    model = BratModel(config)
    load_state_strict(model, read_weights(folder), source=str(folder))
    model.to(device).eval()
    logger.info("loaded checkpoint %s (config %s)", folder, config.name)
    return model

