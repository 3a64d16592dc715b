"""Tests for checkpoint folders: round trip, digests, strict loading, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrained import checkpoint as checkpoint_module
from pretrained.checkpoint import (
    load_checkpoint,
    load_state_strict,
    model_digest,
    reconcile_vit_cross_attention,
    save_checkpoint,
)
from pretrained.config import get_config
from pretrained.model import build_model
from pretrained.text import write_tiny_text_model

REPORTS = ["A 2.5 cm enhancing lesion. No edema.", "Normal study."]


@pytest.fixture(scope="module")
def tiny_text_folder(tmp_path_factory):
    return write_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_model(tiny_text_folder):
    return build_model(get_config("brat-tiny", text_encoder=str(tiny_text_folder)), seed=0).eval()


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "brat-tiny", extra={"step": 7})


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 32, 128, 128, generator=torch.Generator().manual_seed(0))


def test_folder_contents(saved):
    names = sorted(path.name for path in saved.iterdir())
    assert names == ["adaptation.json", "config.json", "metadata.json", "model.safetensors", "preprocessing.json"]
    config = json.loads((saved / "config.json").read_text())
    assert (config["preprocessing"], config["objective"], config["scorer"]) == ("brat-tiny", "pva", "pva")
    assert len(config["text_encoder_sha256"]) == 64
    assert json.loads((saved / "metadata.json").read_text()) == {"step": 7}
    assert json.loads((saved / "preprocessing.json").read_text())["name"] == "brat-tiny"


def test_frozen_text_encoder_not_stored(saved):
    keys = load_file(str(saved / "model.safetensors")).keys()
    assert not any(key.startswith("text_encoder.") for key in keys)
    assert "text_proj.weight" in keys
    assert "visual_encoder.densenet.class_layers.out.weight" in keys


def test_adaptation_plan(saved):
    plan = json.loads((saved / "adaptation.json").read_text())
    assert plan["encoder_key_prefix"] == "visual_encoder.densenet.features."
    assert plan["channel_order"] == ["t1c"]
    assert plan["in_channels"] == 1
    assert plan["recommended_patch_size"] == [64, 64, 64]
    assert plan["feature_strides"] == [[2, 2, 2], [4, 4, 4], [8, 8, 8], [16, 16, 16]]
    assert plan["feature_channels"] == [32, 64, 96, 112]


def test_round_trip_identical_outputs(tiny_model, saved, images):
    loaded = load_checkpoint(saved).eval()
    with torch.no_grad():
        before = tiny_model(images, REPORTS)
        after = loaded(images, REPORTS)
    for key in ("views", "pooled", "attention", "sentences", "sentence_mask"):
        assert torch.equal(before[key], after[key]), key


def test_digest_stable_and_matches_memory(tiny_model, saved):
    assert model_digest(saved) == model_digest(saved)
    assert model_digest(saved) == model_digest(tiny_model)
    assert model_digest(load_checkpoint(saved)) == model_digest(saved)


def test_digest_changes_with_weight(tiny_model, saved, tmp_path):
    changed = build_model(tiny_model.config)
    changed.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        changed.vision_proj.bias[0] += 1e-3
    folder = save_checkpoint(changed, tmp_path / "changed")
    assert model_digest(folder) != model_digest(saved)


def test_strict_load_lists_keys(tiny_model, saved, tmp_path):
    state = load_file(str(saved / "model.safetensors"))
    state.pop("ln_vision.bias")
    state["surprise.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['ln_vision.bias'\].*unexpected keys \['surprise.weight'\]"):
        load_state_strict(build_model(tiny_model.config), state, source="test")


def test_strict_load_shape_mismatch(tiny_model, saved):
    state = load_file(str(saved / "model.safetensors"))
    state["vision_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"vision_proj.weight: checkpoint \(3, 3\)"):
        load_state_strict(build_model(tiny_model.config), state, source="test")


def test_save_replaces_existing_folder(tiny_model, tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(tiny_model, folder, extra={"step": 1})
    save_checkpoint(tiny_model, folder, extra={"step": 2})
    assert json.loads((folder / "metadata.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_keeps_old_folder(tiny_model, tmp_path, monkeypatch):
    folder = save_checkpoint(tiny_model, tmp_path / "ckpt", extra={"step": 1})

    def fail(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module, "adaptation_plan", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tiny_model, folder, extra={"step": 2})
    assert json.loads((folder / "metadata.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_trained_text_encoder_round_trip(tiny_text_folder, tmp_path, images):
    config = get_config("brat-tiny", text_encoder=str(tiny_text_folder), text_frozen=False)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.text_encoder.model.embeddings.word_embeddings.weight.mul_(1.5)
    folder = save_checkpoint(model, tmp_path / "trained-text")
    assert (folder / "text_encoder" / "config.json").is_file()
    assert not (folder / "text_encoder" / "model.safetensors").exists()
    assert any(k.startswith("text_encoder.") for k in load_file(str(folder / "model.safetensors")))
    loaded = load_checkpoint(folder).eval()
    with torch.no_grad():
        assert torch.equal(model.encode_text(REPORTS)[0], loaded.encode_text(REPORTS)[0])


def test_pickled_weights_load_weights_only(tiny_model, saved, tmp_path, images):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved / "config.json").read_bytes())
    torch.save(load_file(str(saved / "model.safetensors")), folder / "pytorch_model.bin")
    loaded = load_checkpoint(folder).eval()
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_image(images).views, loaded.encode_image(images).views)


def test_missing_config_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_vit_cross_attention_rule():
    model_keys = {"visual_encoder.vit.blocks.0.norm_cross_attn.weight", "ln_vision.weight"}
    state = {
        "visual_encoder.vit.blocks.0.norm_cross_attn.weight": torch.ones(2),
        "visual_encoder.vit.blocks.0.cross_attn.out_proj.weight": torch.ones(2, 2),
        "ln_vision.weight": torch.ones(2),
    }
    remaining, removed = reconcile_vit_cross_attention(model_keys, state)
    assert sorted(remaining) == sorted(model_keys)
    assert list(removed) == ["visual_encoder.vit.blocks.0.cross_attn.out_proj.weight"]
    # Keys the model has are never set aside, whatever their name.
    _, removed = reconcile_vit_cross_attention(set(state), state)
    assert removed == {}


def test_brat_encoder_loader(saved, images):
    from harness.encoders import Encoder, load_encoder

    encoder = load_encoder("brat", path=str(saved), device="cpu")
    assert isinstance(encoder, Encoder)
    assert encoder.digest == model_digest(saved)
    assert (encoder.name, encoder.preprocessing, encoder.scorer) == ("brat-tiny", "brat-tiny", "pva")
    output = encoder.encode_images(images)
    assert output.views.shape == (2, 16, 64)
    assert output.views.device.type == "cpu"
    reports = encoder.encode_reports(["No edema. Mass.", "Normal."])
    assert [r.shape for r in reports] == [(2, 64), (1, 64)]
    backbone = encoder.segmentation_backbone()
    assert backbone is not encoder.model.visual_encoder
    maps = backbone.feature_maps(torch.rand(1, 1, 64, 64, 64))
    assert [tuple(m.shape[2:]) for m in maps] == [(32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]
