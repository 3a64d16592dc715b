"""Tests for report splitting, report tokenisation and the Hugging Face sentence encoder."""

from __future__ import annotations

import pytest
import torch

from pretrained.text import (
    HFSentenceEncoder,
    load_tokenizer,
    pool_sentences,
    split_sentences,
    tokenize_report,
    write_tiny_text_model,
)

REPORT = """FINDINGS:
There is a 2.5 cm enhancing lesion in the left frontal lobe, e.g. near the
precentral gyrus. Mild surrounding edema.
No midline shift.

IMPRESSION: 1. Left frontal enhancing mass, likely metastasis. 2. No hydrocephalus.
1) Small right cerebellar lesion measuring 3.2 x 2.1 cm.
- Dr. Smith was notified at 3 p.m. on the same day."""


@pytest.fixture(scope="module")
def tiny_text_folder(tmp_path_factory):
    return write_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


def test_split_clinical_report():
    assert split_sentences(REPORT) == [
        "There is a 2.5 cm enhancing lesion in the left frontal lobe, e.g. near the precentral gyrus.",
        "Mild surrounding edema.",
        "No midline shift.",
        "Left frontal enhancing mass, likely metastasis.",
        "No hydrocephalus.",
        "Small right cerebellar lesion measuring 3.2 x 2.1 cm.",
        "Dr. Smith was notified at 3 p.m. on the same day.",
    ]


def test_split_keeps_decimals_and_abbreviations():
    sentences = split_sentences("Lesion of 2.5 cm, i.e. larger than before. Vs. prior 1.8 cm.")
    assert sentences[0] == "Lesion of 2.5 cm, i.e. larger than before."
    assert len(sentences) == 2


def test_split_line_breaks():
    # An uppercase line start is a new sentence even without a full stop.
    assert split_sentences("No acute infarct\nNormal ventricles") == ["No acute infarct", "Normal ventricles"]
    # A lowercase line start continues a wrapped line.
    assert split_sentences("Enhancing lesion in the\nleft parietal lobe.") == ["Enhancing lesion in the left parietal lobe."]
    assert split_sentences("First.\r\n\r\nSecond.") == ["First.", "Second."]


def test_split_drops_headers_and_empty_pieces():
    assert split_sentences("FINDINGS:\n\nImpression:\n  \n...\n") == []
    assert split_sentences("") == []
    assert split_sentences("Technique: Axial T1 post contrast.") == ["Axial T1 post contrast."]
    # Sequence labels are not section headers and stay in the sentence.
    assert split_sentences("FLAIR: increased signal.") == ["FLAIR: increased signal."]


def test_tokenize_report_layout():
    tokenizer = load_tokenizer("minilm")
    ids, index, dropped = tokenize_report(tokenizer, ["no edema.", "mass."], max_length=64)
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 2
    assert dropped == 0
    assert len(ids) == len(index)
    first_sep = ids.index(tokenizer.sep_token_id)
    assert set(index[1:first_sep]) == {0}
    assert index[first_sep] == -1
    assert set(index[first_sep + 1 : -1]) == {1}


def test_tokenize_report_truncation():
    tokenizer = load_tokenizer("minilm")
    long = "enhancing lesion " * 20
    ids, index, dropped = tokenize_report(tokenizer, [long, "no edema."], max_length=16)
    assert len(ids) == 16
    assert dropped == 1
    assert max(index) == 0
    _, _, dropped_second = tokenize_report(tokenizer, ["mass.", long], max_length=16)
    assert dropped_second == 1


def test_pool_sentences_means():
    hidden = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    index = torch.tensor([[-1, 0, 0, -1, 1, -1]])
    pooled = pool_sentences(hidden, index, num_sentences=3)
    assert pooled.shape == (1, 3, 2)
    torch.testing.assert_close(pooled[0, 0], hidden[0, 1:3].mean(dim=0))
    torch.testing.assert_close(pooled[0, 1], hidden[0, 4])
    torch.testing.assert_close(pooled[0, 2], torch.zeros(2))


def test_hf_encoder_shapes_and_mask(tiny_text_folder):
    encoder = HFSentenceEncoder(str(tiny_text_folder), frozen=False)
    features, mask = encoder([["no edema.", "mass in the left lobe."], ["normal."], []])
    assert features.shape == (3, 2, 32)
    assert mask.tolist() == [[True, True], [True, False], [False, False]]
    norms = features.norm(dim=-1)
    torch.testing.assert_close(norms[mask], torch.ones(3))
    assert torch.all(features[~mask] == 0)


def test_hf_encoder_frozen_cache(tiny_text_folder):
    encoder = HFSentenceEncoder(str(tiny_text_folder), frozen=True, cache_size=2)
    first, _ = encoder([["no edema.", "mass."]])
    assert not any(p.requires_grad for p in encoder.parameters())
    assert len(encoder._cache) == 2
    second, _ = encoder([["no edema.", "mass."]])
    torch.testing.assert_close(first, second)
    encoder([["a third sentence."]])
    assert len(encoder._cache) == 2
    assert "no edema." not in encoder._cache


def test_hf_encoder_matches_batch_and_single(tiny_text_folder):
    encoder = HFSentenceEncoder(str(tiny_text_folder), frozen=False).eval()
    with torch.no_grad():
        batch, _ = encoder([["no edema.", "a much longer sentence about a mass."]])
        single, _ = encoder([["no edema."]])
    torch.testing.assert_close(batch[0, 0], single[0, 0], atol=1e-5, rtol=1e-5)


def test_missing_text_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        HFSentenceEncoder(str(tmp_path / "absent"), frozen=True)
