"""Tests for the brat model: configs, backbones, image and text embeddings."""

from __future__ import annotations

import pytest
import torch

from pretrained.backbones import build_backbone, token_shape
from pretrained.config import BratConfig, get_config, list_configs
from pretrained.model import build_model
from pretrained.text import write_tiny_text_model

REPORTS = ["FINDINGS: A 2.5 cm enhancing lesion. No edema.\n1. Mass in the left lobe.", "Normal study."]


@pytest.fixture(scope="module")
def tiny_text_folder(tmp_path_factory):
    return write_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_config(tiny_text_folder) -> BratConfig:
    return get_config("brat-tiny", text_encoder=str(tiny_text_folder))


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    return build_model(tiny_config, seed=0).eval()


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 32, 128, 128, generator=generator)


def qformer_text_config(**overrides) -> BratConfig:
    """brat-tiny with the Q-Former text path and a small BERT-sized vocabulary table."""
    settings = dict(
        text_path="qformer", text_encoder="minilm", text_frozen=False, qformer_hidden_size=32,
        qformer_num_heads=4, qformer_intermediate_size=64, max_position_embeddings=64, text_max_length=64,
    )  # fmt: skip
    settings.update(overrides)
    return get_config("brat-tiny", **settings)


def test_named_configs():
    assert list_configs() == ["brat-densenet121", "brat-tiny"]
    paper = get_config("brat-densenet121")
    assert (paper.backbone, paper.num_query_tokens, paper.embed_dim) == ("densenet121", 32, 256)
    assert (paper.qformer_num_layers, paper.qformer_hidden_size, paper.cross_attention_frequency) == (12, 768, 2)
    assert (paper.preprocessing, paper.text_path, paper.scorer) == ("brat-v1", "qformer", "pva")
    assert get_config("brat-tiny").preprocessing == "brat-tiny"
    with pytest.raises(KeyError, match="brat-tiny"):
        get_config("brat-huge")


def test_config_dict_round_trip():
    config = get_config("brat-tiny", objective="colbert")
    data = config.to_dict()
    assert data["scorer"] == "colbert"
    assert BratConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown config fields"):
        BratConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="does not match objective"):
        BratConfig.from_dict({**data, "scorer": "pva"})


@pytest.mark.parametrize(
    ("objective", "scorer"),
    [("pva", "pva"), ("pva-no-qd", "pva"), ("pairwise-repulsion", "pva"), ("colbert", "colbert"),
     ("qformer-mean", "cosine"), ("clip", "cosine")],
)  # fmt: skip
def test_objective_scorer(objective, scorer):
    assert get_config("brat-tiny", objective=objective).scorer == scorer


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="objective"):
        get_config("brat-tiny", objective="triplet")
    with pytest.raises(ValueError, match="in_channels=4"):
        get_config("brat-tiny", in_channels=4)


def test_too_many_queries_rejected(tiny_config):
    # densenet-tiny gives 64 tokens at (32, 128, 128).
    with pytest.raises(ValueError, match=r"L=64 .*num_query_tokens=65"):
        build_model(tiny_config.replace(num_query_tokens=65))


def test_tiny_forward_shapes(tiny_model, images):
    with torch.no_grad():
        output = tiny_model(images, REPORTS)
    assert output["views"].shape == (2, 16, 64)
    assert output["pooled"].shape == (2, 64)
    assert output["attention"].shape == (2, 16, 64)
    assert output["sentences"].shape == (2, 3, 64)
    assert output["sentence_mask"].tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(output["views"].norm(dim=-1), torch.ones(2, 16))
    torch.testing.assert_close(output["pooled"].norm(dim=-1), torch.ones(2))
    mask = output["sentence_mask"]
    torch.testing.assert_close(output["sentences"].norm(dim=-1)[mask], torch.ones(4))
    assert torch.all(output["sentences"][~mask] == 0)


def test_attention_rows_sum_to_one(tiny_model, images):
    with torch.no_grad():
        embeddings = tiny_model.encode_image(images)
    assert embeddings.tokens.shape == (2, 64, 112)
    assert torch.all(embeddings.attention >= 0)
    torch.testing.assert_close(embeddings.attention.sum(dim=-1), torch.ones(2, 16))


def test_attention_rows_sum_to_one_in_training(tiny_model, images):
    tiny_model.train()
    try:
        embeddings = tiny_model.encode_image(images[:1])
    finally:
        tiny_model.eval()
    torch.testing.assert_close(embeddings.attention.sum(dim=-1), torch.ones(1, 16))


def test_presplit_sentences_match_text(tiny_model):
    with torch.no_grad():
        from_text, mask_text = tiny_model.encode_text(["No edema. Mass."])
        from_split, mask_split = tiny_model.encode_sentences([["No edema.", "Mass."]])
    torch.testing.assert_close(from_text, from_split)
    assert torch.equal(mask_text, mask_split)


def test_wrong_image_shape_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 128, 128\).*brat-tiny"):
        tiny_model.encode_image(torch.zeros(1, 1, 32, 64, 64))


def test_clip_objective_single_view(tiny_config, images):
    model = build_model(tiny_config.replace(objective="clip"), seed=0).eval()
    with torch.no_grad():
        output = model(images, REPORTS)
    assert output["views"].shape == (2, 1, 64)
    assert output["attention"].shape == (2, 1, 64)
    assert output["sentences"].shape == (2, 1, 64)
    assert output["sentence_mask"].tolist() == [[True], [True]]
    torch.testing.assert_close(output["sentences"].norm(dim=-1), torch.ones(2, 1))
    torch.testing.assert_close(output["attention"].sum(dim=-1), torch.ones(2, 1))


def test_seed_reproducible(tiny_config):
    first = build_model(tiny_config, seed=3)
    second = build_model(tiny_config, seed=3)
    other = build_model(tiny_config, seed=4)
    assert torch.equal(first.query_tokens, second.query_tokens)
    assert not torch.equal(first.query_tokens, other.query_tokens)


def test_qformer_text_path(images):
    model = build_model(qformer_text_config(), seed=0).eval()
    with torch.no_grad():
        sentences, mask = model.encode_text(REPORTS + [""])
    assert sentences.shape == (3, 3, 64)
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    torch.testing.assert_close(sentences.norm(dim=-1)[mask], torch.ones(4))
    # Sentence embeddings depend on the surrounding report (one token sequence per report).
    with torch.no_grad():
        alone, _ = model.encode_text(["A 2.5 cm enhancing lesion."])
    assert not torch.allclose(alone[0, 0], sentences[0, 0])


def test_qformer_text_tokenizer_larger_than_vocab():
    model = build_model(qformer_text_config(vocab_size=1000), seed=0)
    with pytest.raises(ValueError, match="vocab_size is 1000"):
        model.encode_text(["No edema."])


def test_densenet121_token_shape():
    assert token_shape("densenet121", 1, (32, 256, 256)) == (64, 1024)
    assert token_shape("densenet169", 4, (32, 256, 256)) == (64, 1664)
    assert token_shape("densenet-tiny", 1, (32, 128, 128)) == (64, 112)


def test_densenet_tiny_has_small_stem():
    backbone = build_backbone("densenet-tiny", 1, (32, 128, 128))
    stem = backbone.densenet.features.conv0
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3, 3), (2, 2, 2), (1, 1, 1))
    assert build_backbone("densenet121", 1, (32, 256, 256)).densenet.features.conv0.kernel_size == (7, 7, 7)


@pytest.mark.slow
def test_densenet121_real_forward():
    backbone = build_backbone("densenet121", 1, (32, 256, 256)).eval()
    with torch.no_grad():
        tokens = backbone(torch.rand(1, 1, 32, 256, 256))
    assert tokens.shape == (1, 64, 1024)
    assert torch.isfinite(tokens).all()


def test_resnet_and_vit_token_shapes():
    assert token_shape("resnet50", 1, (32, 256, 256)) == (64, 2048)
    assert token_shape("vit", 1, (32, 256, 256)) == (512, 768)


def test_densenet_tokens_follow_released_layout():
    backbone = build_backbone("densenet-tiny", 1, (32, 128, 128)).eval()
    x = torch.rand(1, 1, 32, 128, 128)
    with torch.no_grad():
        tokens = backbone(x)
        features = backbone.densenet.features(x)
    expected = torch.nn.functional.leaky_relu(features.mean(dim=2), 0.01).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected)
    assert "densenet.class_layers.out.weight" in backbone.state_dict()


def test_random_encoder_loader(tiny_text_folder):
    from harness.encoders import Encoder, load_encoder

    settings = dict(config="brat-tiny", device="cpu", text_encoder=str(tiny_text_folder))
    first = load_encoder("brat-random", seed=0, **settings)
    again = load_encoder("brat-random", seed=0, **settings)
    other = load_encoder("brat-random", seed=1, **settings)
    assert isinstance(first, Encoder)
    assert first.digest == again.digest
    assert first.digest != other.digest
    assert (first.preprocessing, first.scorer) == ("brat-tiny", "pva")
    reports = first.encode_reports(["No edema. Mass.", "Normal."])
    assert [r.shape for r in reports] == [(2, 64), (1, 64)]
