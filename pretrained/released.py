"""Conversion of the released brat weights (LAVIS-style state dicts) into checkpoint folders.

The released files are flat ``torch.save`` state dicts with keys ``visual_encoder.*``,
``ln_vision.*``, ``query_tokens``, ``Qformer.bert.*`` (a LAVIS BERT Q-Former),
``Qformer.cls.*`` (masked-LM head), ``vision_proj.*``, ``text_proj.*``, ``itm_head.*`` and
``temp``. No file records its backbone or input channels, so both are read from tensor
shapes and checked against what the caller expects.

Key map (LAVIS -> this package):

===============================================  =================================================
``Qformer.bert.embeddings.word_embeddings.*``    ``text_embeddings.word_embeddings.*``
``Qformer.bert.embeddings.position_embeddings.*`` ``text_embeddings.position_embeddings.*``
``Qformer.bert.embeddings.LayerNorm.*``          ``qformer.layernorm.*`` (both normalise the
                                                 concatenated query and text embeddings)
``Qformer.bert.encoder.layer.N.attention.self.*`` ``qformer.encoder.layer.N.attention.attention.*``
``...layer.N.crossattention.self.*``             ``qformer.encoder.layer.N.crossattention.attention.*``
other ``Qformer.bert.encoder.layer.N.*``         ``qformer.encoder.layer.N.*`` (same names)
``visual_encoder.*``, ``ln_vision.*``,           unchanged
``query_tokens``, ``vision_proj.*``, ``text_proj.*``
``Qformer.cls.*``, ``itm_head.*``, ``temp``,     ``released_extras.safetensors`` (not used by the
``Qformer.bert.embeddings.position_ids``         harness, kept so every tensor lands somewhere)
===============================================  =================================================
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrained.backbones import BACKBONES, DENSENET_BLOCKS
from pretrained.config import MINILM, BratConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleasedModel:
    """One file of the released model zoo (all are CC BY-NC-SA 4.0, on Google Drive only)."""

    name: str
    backbone: str
    in_channels: int
    sequences: tuple[str, ...]
    preprocessing: str
    drive_file_id: str
    in_paper: bool
    note: str = ""


RELEASED_MODELS: tuple[ReleasedModel, ...] = (
    ReleasedModel("brat-DenseNet121", "densenet121", 1, ("t1c",), "brat-v1", "1B7Wgz7pxCBcYhp2Cy20Y3NDgQWlZ7Zf5", True),
    ReleasedModel(
        "brat-ViT-Base", "vit", 1, ("t1c",), "brat-v1", "1nD4zhKS31biZC7-7dfmXeKOOZQ_6c9WB", False,
        "updated ViT-B/16, not the paper's ViT",
    ),
    ReleasedModel("brat-ResNet50", "resnet50", 1, ("t1c",), "brat-v1", "16pUt5T1fvQQUc6fNHMEOklOd_bp1dDDp", True),
    ReleasedModel(
        "brat-Multimodal", "densenet169", 4, ("t1c", "t1", "t2", "flair"), "brat-v1-multimodal",
        "127AK67pytgRCGV9g8R1FLwf0FU5lzblz", False, "not in the paper",
    ),
)  # fmt: skip

MULTIMODAL_SEQUENCES = ("t1c", "t1", "t2", "flair")
PREPROCESSING_IMAGE_SIZE = {"brat-v1": (32, 256, 256), "brat-v1-multimodal": (32, 256, 256), "brat-tiny": (32, 128, 128)}

_UNCHANGED_PREFIXES = ("visual_encoder.", "ln_vision.", "vision_proj.", "text_proj.")
_EXTRA_PREFIXES = ("Qformer.cls.", "itm_head.")
_EXTRA_KEYS = ("temp", "Qformer.bert.embeddings.position_ids")
_RELEASED_LAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_MODEL_LAYER = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.+)$")
_EMBEDDINGS = {
    "Qformer.bert.embeddings.word_embeddings.weight": "text_embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "text_embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
    "Qformer.bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
}
_EMBEDDINGS_INVERSE = {v: k for k, v in _EMBEDDINGS.items()}


# --------------------------------------------------------------------------- key map


def is_extra_key(key: str) -> bool:
    """True for released keys the harness keeps aside (MLM head, ITM head, temperature, position ids)."""
    return key in _EXTRA_KEYS or key.startswith(_EXTRA_PREFIXES)


def released_to_model_key(key: str) -> str | None:
    """Map a released (LAVIS) key to a :class:`BratModel` key; ``None`` if it is not a model key."""
    if key == "query_tokens" or key.startswith(_UNCHANGED_PREFIXES):
        return key
    if key in _EMBEDDINGS:
        return _EMBEDDINGS[key]
    match = _RELEASED_LAYER.match(key)
    if match:
        rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", match[2])
        return f"qformer.encoder.layer.{match[1]}.{rest}"
    return None


def model_to_released_key(key: str) -> str:
    """Inverse of :func:`released_to_model_key` for every key of a Q-Former-text-path model."""
    if key == "query_tokens" or key.startswith(_UNCHANGED_PREFIXES):
        return key
    if key in _EMBEDDINGS_INVERSE:
        return _EMBEDDINGS_INVERSE[key]
    match = _MODEL_LAYER.match(key)
    if match:
        rest = re.sub(r"^(attention|crossattention)\.attention\.", r"\1.self.", match[2])
        return f"Qformer.bert.encoder.layer.{match[1]}.{rest}"
    raise ValueError(f"model key {key!r} has no place in the released layout")


def export_released_state_dict(model) -> dict[str, torch.Tensor]:
    """Return ``model``'s weights under released (LAVIS) key names (no extras)."""
    if model.config.text_path != "qformer":
        raise ValueError(f"config {model.config.name!r}: only text_path='qformer' models have a released layout")
    return {model_to_released_key(k): v for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- reading and detection


def load_released_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a released ``.bin`` file with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a tensor archive
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path}: not a weights-only torch file ({type(error).__name__}: {reason}). Only plain "
            "tensor state dicts saved with torch.save are accepted; pickled objects are never loaded"
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and set(state) == {wrapper}:
            logger.info("%s: unwrapping the %r entry", path, wrapper)
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat key -> tensor state dict, got {type(state).__name__}")
    return state


def _densenet_blocks(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    layers: dict[int, int] = {}
    for key in state:
        match = re.match(r"^visual_encoder\.densenet\.features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if match:
            block, layer = int(match[1]), int(match[2])
            layers[block] = max(layers.get(block, 0), layer)
    return tuple(layers[b] for b in sorted(layers))


def _resnet_name(state: dict[str, torch.Tensor]) -> str:
    blocks: dict[int, int] = {}
    for key in state:
        match = re.match(r"^visual_encoder\.resnet\.layer(\d)\.(\d+)\.", key)
        if match:
            blocks[int(match[1])] = max(blocks.get(int(match[1]), 0), int(match[2]) + 1)
    layout = tuple(blocks[i] for i in sorted(blocks))
    bottleneck = any(".conv3." in key for key in state if key.startswith("visual_encoder.resnet."))
    if layout == (3, 4, 6, 3) and bottleneck:
        return "resnet50"
    return f"a resnet with blocks per stage {layout}"


def detect_backbone(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Return ``(backbone, in_channels)`` read from tensor shapes and key names.

    An unrecognised architecture comes back as a description (not a key of ``BACKBONES``).
    """
    if "visual_encoder.densenet.features.conv0.weight" in state:
        in_channels = int(state["visual_encoder.densenet.features.conv0.weight"].shape[1])
        blocks = _densenet_blocks(state)
        return DENSENET_BLOCKS.get(blocks, f"a densenet with block configuration {blocks}"), in_channels
    if "visual_encoder.resnet.conv1.weight" in state:
        return _resnet_name(state), int(state["visual_encoder.resnet.conv1.weight"].shape[1])
    if "visual_encoder.vit.patch_embedding.patch_embeddings.weight" in state:
        weight = state["visual_encoder.vit.patch_embedding.patch_embeddings.weight"]
        return "vit", int(weight.shape[1])
    raise ValueError(
        "no vision backbone keys found (expected visual_encoder.densenet.*, visual_encoder.resnet.* "
        "or visual_encoder.vit.*); is this a brat state dict?"
    )


def check_backbone(
    state: dict[str, torch.Tensor], backbone: str | None, in_channels: int | None, source: str = "weights"
) -> tuple[str, int]:
    """Return the detected ``(backbone, in_channels)``; raise if it differs from the request."""
    detected, detected_channels = detect_backbone(state)
    requested = backbone if backbone is not None else detected
    requested_channels = in_channels if in_channels is not None else detected_channels
    if (detected, detected_channels) != (requested, requested_channels):
        raise ValueError(
            f"{source}: weights look like {detected} with {detected_channels} input channel{'' if detected_channels == 1 else 's'}, but "
            f"--backbone {requested} --in-channels {requested_channels} was given; "
            f"pass --backbone {detected} --in-channels {detected_channels} or check the file against RELEASED_MODELS"
        )
    if detected not in BACKBONES:
        raise ValueError(f"{source}: weights look like {detected}, which no backbone in {sorted(BACKBONES)} builds")
    return detected, detected_channels


# --------------------------------------------------------------------------- config inference


def _qformer_layout(state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    layers = {int(m[1]) for k in state if (m := _RELEASED_LAYER.match(k))}
    if not layers:
        raise ValueError(f"{source}: no Qformer.bert.encoder.layer.* keys found")
    num_layers = max(layers) + 1
    cross = sorted({int(m[1]) for k in state if (m := _RELEASED_LAYER.match(k)) and m[2].startswith("crossattention.")})
    frequency = cross[1] - cross[0] if len(cross) > 1 else num_layers
    if not cross or cross != list(range(0, num_layers, frequency)):
        raise ValueError(
            f"{source}: cross-attention layers {cross} of {num_layers} do not follow the BLIP-2 pattern "
            "(every k-th layer starting at 0)"
        )
    return num_layers, frequency


def infer_config(
    state: dict[str, torch.Tensor],
    backbone: str,
    in_channels: int,
    *,
    num_heads: int = 12,
    preprocessing: str | None = None,
    tokenizer: str = MINILM,
    name: str | None = None,
    source: str = "weights",
) -> BratConfig:
    """Read the Q-Former and projection sizes from tensor shapes.

    ``num_heads`` is not recoverable from shapes, and the released loader fixes it at 12.
    The tokenizer is unknown too. ``"minilm"`` (BERT uncased WordPiece, 30522 tokens) is
    the default because the released vocabulary (30523 rows: BERT plus one BLIP-2 token)
    fits it.
    """
    num_layers, frequency = _qformer_layout(state, source)
    vocab_size, hidden = state["Qformer.bert.embeddings.word_embeddings.weight"].shape
    preprocessing = preprocessing or ("brat-v1" if in_channels == 1 else "brat-v1-multimodal")
    sequences = ("t1c",) if in_channels == 1 else MULTIMODAL_SEQUENCES[:in_channels]
    return BratConfig(
        name=name or f"brat-released-{backbone}",
        backbone=backbone,
        in_channels=in_channels,
        image_size=PREPROCESSING_IMAGE_SIZE.get(preprocessing, (32, 256, 256)),
        sequences=sequences,
        preprocessing=preprocessing,
        num_query_tokens=int(state["query_tokens"].shape[1]),
        qformer_hidden_size=int(hidden),
        qformer_num_layers=num_layers,
        qformer_num_heads=num_heads,
        qformer_intermediate_size=int(state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]),
        cross_attention_frequency=frequency,
        vocab_size=int(vocab_size),
        max_position_embeddings=int(state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0]),
        embed_dim=int(state["vision_proj.weight"].shape[0]),
        text_path="qformer",
        text_encoder=tokenizer,
        text_max_length=int(state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0]),
        objective="pva",
    )


# --------------------------------------------------------------------------- conversion


def split_released_state(
    state: dict[str, torch.Tensor], source: str = "weights"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a released state dict into model tensors (renamed) and extras (original names)."""
    model_state: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if is_extra_key(key):
            extras[key] = tensor
            continue
        target = released_to_model_key(key)
        if target is None:
            unknown.append(key)
        else:
            model_state[target] = tensor
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys have no place in the model or the extras: {sorted(unknown)[:20]}")
    return model_state, extras


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_every_tensor_lands(model, released: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> int:
    """Check that each released tensor equals its model tensor or its kept extra; return the count."""
    model_state = model.state_dict()
    for key, tensor in released.items():
        target = released_to_model_key(key)
        if target is not None and target in model_state:
            landed = model_state[target]
        else:
            landed = extras.get(key)
        if landed is None or not torch.equal(landed.cpu(), tensor):
            raise ValueError(f"released tensor {key!r} did not land unchanged (model key {target!r})")
    return len(released)


def convert_released(
    weights: str | Path,
    out: str | Path,
    *,
    backbone: str | None = None,
    in_channels: int | None = None,
    num_heads: int = 12,
    preprocessing: str | None = None,
    tokenizer: str = MINILM,
) -> Path:
    """Convert a released brat ``.bin`` file into a checkpoint folder at ``out``.

    ``backbone`` and ``in_channels`` default to what the tensor shapes show; when given,
    a mismatch with the shapes is an error that names both.
    """
    from pretrained.checkpoint import load_state_strict, save_checkpoint
    from pretrained.model import BratModel

    weights = Path(weights)
    source = str(weights)
    state = load_released_state_dict(weights)
    backbone, in_channels = check_backbone(state, backbone, in_channels, source)
    config = infer_config(
        state, backbone, in_channels, num_heads=num_heads, preprocessing=preprocessing, tokenizer=tokenizer, source=source
    )
    model_state, extras = split_released_state(state, source)

    model = BratModel(config)
    extras.update(load_state_strict(model, model_state, source))
    count = verify_every_tensor_lands(model, state, extras)

    metadata = {
        "source_file": weights.name,
        "source_sha256": _file_sha256(weights),
        "released_tensors": count,
        "extras_tensors": len(extras),
        "released_models": [m.name for m in RELEASED_MODELS if (m.backbone, m.in_channels) == (backbone, in_channels)],
        "licence": "CC BY-NC-SA 4.0 (released brat weights)",
    }
    save_checkpoint(model, out, extra=metadata, extra_tensors=extras)
    logger.info("converted %s (%d tensors, %d kept as extras) to %s", weights.name, count, len(extras), out)
    return Path(out)
