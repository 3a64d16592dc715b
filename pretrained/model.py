"""The brat model: 3D backbone -> visual tokens -> Q-Former views; reports -> sentence embeddings.

Image side: the backbone's tokens ``(B, L, D_I)`` go through ``ln_vision``. ``N_Q``
learnable query tokens cross-attend to them in a BLIP-2 Q-Former
(``transformers.Blip2QFormerModel``). It runs with eager attention because only that
implementation returns the cross-attention maps. ``vision_proj`` maps each query output
to the shared space, where it is L2-normalised into one view.

Text side: each report is split into sentences, embedded either by the Q-Former's own
BERT stack (``text_path="qformer"``, as in the released weights) or by a separate Hugging
Face encoder (``text_path="hf"``), then ``text_proj`` and L2 normalisation.

The model contains no loss code; :meth:`BratModel.forward` returns the tensors that
``pretrained.losses`` consumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from harness.encoders import ImageEmbeddings
from pretrained.backbones import build_backbone, token_shape
from pretrained.config import BratConfig, get_config
from pretrained.text import (
    HFSentenceEncoder,
    load_tokenizer,
    pool_sentences,
    split_sentences,
    tokenize_report,
)

logger = logging.getLogger(__name__)

# State-dict prefix of a frozen text encoder; those weights are referenced, not saved.
TEXT_ENCODER_PREFIX = "text_encoder."


def _qformer_config(config: BratConfig, vision_width: int):
    from transformers import Blip2QFormerConfig

    qformer_config = Blip2QFormerConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.qformer_hidden_size,
        num_hidden_layers=config.qformer_num_layers,
        num_attention_heads=config.qformer_num_heads,
        intermediate_size=config.qformer_intermediate_size,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        cross_attention_frequency=config.cross_attention_frequency,
        encoder_hidden_size=vision_width,
        use_qformer_text_input=config.text_path == "qformer",
    )
    # SDPA and other kernels return no attention weights; the maps are part of the output.
    qformer_config._attn_implementation = "eager"
    return qformer_config


class BratModel(nn.Module):
    """brat: multi-view image embeddings aligned with report sentence embeddings."""

    def __init__(self, config: BratConfig) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        self.config = config
        num_tokens, vision_width = token_shape(config.backbone, config.in_channels, config.image_size)
        if num_tokens < config.num_query_tokens:
            raise ValueError(
                f"config {config.name!r}: backbone={config.backbone!r} at image_size={list(config.image_size)} "
                f"gives L={num_tokens} visual tokens, fewer than num_query_tokens={config.num_query_tokens}; "
                "the DPP kernel over the attention maps has rank at most L, so lower num_query_tokens "
                "or use a larger image_size"
            )
        self.num_visual_tokens = num_tokens
        self.vision_width = vision_width

        self.visual_encoder = build_backbone(config.backbone, config.in_channels, config.image_size)
        self.ln_vision = nn.LayerNorm(vision_width)
        qformer_config = _qformer_config(config, vision_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_hidden_size))
        nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
        self.qformer = Blip2QFormerModel(qformer_config)

        self._tokenizer = None
        if config.text_path == "qformer":
            self.text_embeddings = Blip2TextEmbeddings(qformer_config)
            for embedding in (self.text_embeddings.word_embeddings, self.text_embeddings.position_embeddings):
                nn.init.normal_(embedding.weight, std=qformer_config.initializer_range)
            text_width = config.qformer_hidden_size
        else:
            self.text_encoder = HFSentenceEncoder(config.text_encoder, config.text_frozen, config.text_max_length)
            text_width = self.text_encoder.output_dim

        self.vision_proj = nn.Linear(config.qformer_hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)

    # ----------------------------------------------------------------- image side

    def encode_image(self, images: torch.Tensor) -> ImageEmbeddings:
        """Embed preprocessed studies.

        Args:
            images: ``(B, C, D, H, W)`` with ``C = in_channels`` and ``(D, H, W) = image_size``.

        Returns:
            views ``(B, Q, D)`` unit-norm (``Q = 1`` for the ``clip`` objective), pooled
            ``(B, D)`` (normalised mean of the views), attention ``(B, Q, L)`` and tokens
            ``(B, L, D_I)``. The attention is averaged over heads and cross-attention
            layers. Its rows sum to 1 in eval mode, and in training when attention dropout is 0.
        """
        self._check_images(images)
        tokens = self.visual_encoder(images)
        image_embeds = self.ln_vision(tokens)
        queries = self.query_tokens.expand(images.shape[0], -1, -1)
        output = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            output_attentions=True,
        )
        hidden = output.last_hidden_state  # (B, N_Q, H)
        attention = torch.stack(output.cross_attentions).mean(dim=(0, 2))  # (B, N_Q, L)
        if self.config.single_view:
            hidden = hidden.mean(dim=1, keepdim=True)
            attention = attention.mean(dim=1, keepdim=True)
        views = nn.functional.normalize(self.vision_proj(hidden), dim=-1)
        pooled = nn.functional.normalize(views.mean(dim=1), dim=-1)
        return ImageEmbeddings(views=views, pooled=pooled, attention=attention, tokens=tokens)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.config.in_channels, *self.config.image_size)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"model {self.config.name!r} expects images of shape (B, {', '.join(map(str, expected))}) "
                f"from preprocessing {self.config.preprocessing!r}, got {tuple(images.shape)}"
            )

    # ----------------------------------------------------------------- text side

    @property
    def tokenizer(self):
        """The BERT tokenizer of the Q-Former text path (loaded on first use)."""
        if self._tokenizer is None:
            tokenizer = load_tokenizer(self.config.text_encoder)
            if len(tokenizer) > self.config.vocab_size:
                raise ValueError(
                    f"tokenizer {self.config.text_encoder!r} has {len(tokenizer)} tokens but the Q-Former "
                    f"vocab_size is {self.config.vocab_size}; use a tokenizer that matches the word embeddings"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def encode_text(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Split reports into sentences and embed them; see :meth:`encode_sentences`."""
        return self.encode_sentences([split_sentences(report) for report in reports])

    def encode_sentences(self, reports: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed pre-split reports.

        Returns:
            sentences ``(B, S_max, D)`` unit-norm (zero at padding) and mask ``(B, S_max)``;
            for the ``clip`` objective ``S_max = 1`` and the single row is the
            re-normalised mean of the report's sentence embeddings.
        """
        if self.config.text_path == "qformer":
            features, mask = self._qformer_sentence_features(reports)
        else:
            features, mask = self.text_encoder(reports)
        sentences = nn.functional.normalize(self.text_proj(features), dim=-1)
        sentences = sentences * mask.unsqueeze(-1).to(sentences.dtype)
        if self.config.single_view:
            summed = sentences.sum(dim=1, keepdim=True)
            sentences = nn.functional.normalize(summed, dim=-1)
            mask = mask.any(dim=1, keepdim=True)
        return sentences, mask

    def _qformer_sentence_features(self, reports: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: the released weights do not say how a sentence feature is pooled from its
        # tokens (mean over the sentence, or one separator token). This uses the mean.
        device = self.query_tokens.device
        encoded = [tokenize_report(self.tokenizer, s, self.config.text_max_length) for s in reports]
        dropped = sum(item[2] for item in encoded)
        if dropped:
            logger.warning(
                "dropped %d sentences that did not fit in text_max_length=%d tokens",
                dropped,
                self.config.text_max_length,
            )
        length = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(reports), length), self.tokenizer.pad_token_id, dtype=torch.long)
        sentence_index = torch.full((len(reports), length), -1, dtype=torch.long)
        attention_mask = torch.zeros((len(reports), length), dtype=torch.long)
        for row, (ids, index, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            sentence_index[row, : len(index)] = torch.tensor(index)
            attention_mask[row, : len(ids)] = 1
        input_ids, sentence_index, attention_mask = (t.to(device) for t in (input_ids, sentence_index, attention_mask))

        embeddings = self.text_embeddings(input_ids=input_ids)
        hidden = self.qformer(query_embeds=embeddings, query_length=0, attention_mask=attention_mask).last_hidden_state
        sentence_counts = [max(index, default=-1) + 1 for _, index, _ in encoded]
        s_max = max(sentence_counts, default=0)
        features = pool_sentences(hidden, sentence_index, s_max)
        counts = torch.tensor(sentence_counts, device=device).unsqueeze(1)
        mask = torch.arange(s_max, device=device).unsqueeze(0) < counts
        return features, mask

    # ----------------------------------------------------------------- both

    def forward(self, images: torch.Tensor, reports: Sequence[str] | Sequence[Sequence[str]]) -> dict:
        """Embed a batch of studies and their reports for the pretraining loss.

        ``reports`` are report strings, or lists of sentences when the caller has split
        them already.

        Returns:
            dict with ``views`` (B, Q, D), ``pooled`` (B, D), ``attention`` (B, Q, L),
            ``sentences`` (B, S_max, D) and ``sentence_mask`` (B, S_max).
        """
        image = self.encode_image(images)
        if all(isinstance(report, str) for report in reports):
            sentences, mask = self.encode_text(reports)
        else:
            sentences, mask = self.encode_sentences(reports)
        return {
            "views": image.views,
            "pooled": image.pooled,
            "attention": image.attention,
            "sentences": sentences,
            "sentence_mask": mask,
        }

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors a checkpoint stores: everything but a frozen text encoder."""
        state = self.state_dict()
        if self.config.text_path == "hf" and self.config.text_frozen:
            state = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
        return state


def build_model(config_or_name: BratConfig | str, seed: int | None = None) -> BratModel:
    """Build a :class:`BratModel` from a config or a config name.

    With ``seed`` the random initialisation is reproducible and leaves the global RNG state
    untouched. A frozen text encoder keeps its pretrained weights either way.
    """
    config = get_config(config_or_name) if isinstance(config_or_name, str) else config_or_name
    if seed is None:
        return BratModel(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BratModel(config)
