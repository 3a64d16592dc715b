"""Tests for converting released (LAVIS-layout) brat weights into checkpoint folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrained.backbones import build_backbone
from pretrained.checkpoint import load_checkpoint
from pretrained.config import get_config
from pretrained.model import build_model
from pretrained.released import (
    RELEASED_MODELS,
    check_backbone,
    convert_released,
    detect_backbone,
    export_released_state_dict,
    infer_config,
    load_released_state_dict,
    model_to_released_key,
    released_to_model_key,
)

REPORTS = ["A 2.5 cm enhancing lesion. No edema.", "Normal study."]


def released_layout_config(**overrides):
    """brat-tiny with the Q-Former text path: 3 layers, cross-attention in layers 0 and 2."""
    settings = dict(
        text_path="qformer", text_encoder="minilm", text_frozen=False, qformer_hidden_size=32,
        qformer_num_heads=4, qformer_intermediate_size=64, qformer_num_layers=3, cross_attention_frequency=2,
        max_position_embeddings=64, text_max_length=64,
    )  # fmt: skip
    settings.update(overrides)
    return get_config("brat-tiny", **settings)


@pytest.fixture(scope="module")
def original():
    model = build_model(released_layout_config(), seed=0)
    # Non-trivial BatchNorm statistics, so that a lost buffer would change the outputs.
    generator = torch.Generator().manual_seed(1)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def released_state(original):
    state = export_released_state_dict(original)
    generator = torch.Generator().manual_seed(2)
    state["Qformer.cls.predictions.bias"] = torch.randn(original.config.vocab_size, generator=generator)
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.bert.embeddings.word_embeddings.weight"].clone()
    state["itm_head.weight"] = torch.randn(2, 32, generator=generator)
    state["itm_head.bias"] = torch.randn(2, generator=generator)
    state["temp"] = torch.tensor(0.1)
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    return state


@pytest.fixture(scope="module")
def released_file(released_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("released") / "weights.bin"
    torch.save(released_state, path)
    return path


@pytest.fixture(scope="module")
def converted(released_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "brat-released"
    return convert_released(released_file, out, num_heads=4, preprocessing="brat-tiny")


def test_key_map_round_trip(original):
    for key in original.state_dict():
        released = model_to_released_key(key)
        assert released_to_model_key(released) == key
    assert released_to_model_key("Qformer.bert.encoder.layer.2.crossattention.self.key.weight") == (
        "qformer.encoder.layer.2.crossattention.attention.key.weight"
    )
    assert released_to_model_key("Qformer.bert.embeddings.LayerNorm.bias") == "qformer.layernorm.bias"
    assert released_to_model_key("Qformer.cls.predictions.bias") is None


def test_infer_config_from_shapes(released_state):
    config = infer_config(released_state, "densenet-tiny", 1, num_heads=4, preprocessing="brat-tiny")
    expected = released_layout_config(name=config.name, vocab_size=30523, text_max_length=64, objective="pva")
    assert config == expected


def test_conversion_lossless(converted, released_state):
    model_state = load_file(str(converted / "model.safetensors"))
    extras = load_file(str(converted / "released_extras.safetensors"))
    assert sorted(extras) == sorted(
        ["Qformer.cls.predictions.bias", "Qformer.cls.predictions.decoder.weight", "itm_head.weight",
         "itm_head.bias", "temp", "Qformer.bert.embeddings.position_ids"]
    )  # fmt: skip
    assert len(model_state) + len(extras) == len(released_state)
    for key, tensor in released_state.items():
        target = released_to_model_key(key)
        landed = extras[key] if key in extras else model_state[target]
        assert torch.equal(landed, tensor), key
    metadata = json.loads((converted / "metadata.json").read_text())
    assert metadata["released_tensors"] == len(released_state)


def test_converted_outputs_equal_original(converted, original):
    loaded = load_checkpoint(converted).eval()
    images = torch.rand(2, 1, 32, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = original(images, REPORTS)
        after = loaded(images, REPORTS)
    for key in ("views", "attention", "sentences", "sentence_mask"):
        assert torch.equal(before[key], after[key]), key


def test_wrong_channel_count_error(released_file, tmp_path):
    with pytest.raises(ValueError, match=r"densenet-tiny with 1 input channel, but --backbone densenet-tiny --in-channels 4"):
        convert_released(released_file, tmp_path / "out", backbone="densenet-tiny", in_channels=4, num_heads=4)
    assert not (tmp_path / "out").exists()


def test_wrong_backbone_error(released_file, tmp_path):
    with pytest.raises(ValueError, match=r"look like densenet-tiny .* --backbone densenet121 --in-channels 1 was given"):
        convert_released(released_file, tmp_path / "out", backbone="densenet121", in_channels=1, num_heads=4)


def test_unknown_key_error(released_state, tmp_path):
    path = tmp_path / "odd.bin"
    torch.save({**released_state, "Qformer.bert.pooler.dense.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r"Qformer.bert.pooler.dense.weight"):
        convert_released(path, tmp_path / "out", num_heads=4, preprocessing="brat-tiny")


def test_missing_model_key_error(released_state, tmp_path):
    path = tmp_path / "short.bin"
    state = dict(released_state)
    state.pop("ln_vision.bias")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \['ln_vision.bias'\]"):
        convert_released(path, tmp_path / "out", num_heads=4, preprocessing="brat-tiny")


def _meta_visual_state(name: str, in_channels: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        backbone = build_backbone(name, in_channels, (32, 256, 256))
    return {f"visual_encoder.{k}": v for k, v in backbone.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "channels"), [("densenet121", 1), ("densenet169", 4), ("resnet50", 1), ("vit", 1)]
)
def test_detect_zoo_backbones(name, channels):
    assert detect_backbone(_meta_visual_state(name, channels)) == (name, channels)


def test_multimodal_mismatch_message():
    state = _meta_visual_state("densenet169", 4)
    with pytest.raises(ValueError) as error:
        check_backbone(state, "densenet121", 1, source="weights.bin")
    assert "weights look like densenet169 with 4 input channels, but --backbone densenet121 --in-channels 1 was given" in str(error.value)


def test_zoo_table():
    assert [(m.backbone, m.in_channels) for m in RELEASED_MODELS] == [
        ("densenet121", 1), ("vit", 1), ("resnet50", 1), ("densenet169", 4)
    ]  # fmt: skip
    multimodal = RELEASED_MODELS[-1]
    assert multimodal.sequences == ("t1c", "t1", "t2", "flair")
    assert multimodal.preprocessing == "brat-v1-multimodal"


def test_cli_convert(released_file, tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "cli-out"
    arguments = ["convert-released", str(released_file), "--out", str(out), "--num-heads", "4"]
    assert main(arguments) == 0
    assert "model digest" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["preprocessing"] == "brat-v1"
    assert main(arguments) == 2  # the folder exists and --overwrite was not given
    assert main([*arguments, "--overwrite", "--backbone", "densenet121"]) == 1
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_vit_monai14_cross_attention_keys_set_aside(tmp_path):
    # MONAI 1.4 saved an unused cross_attn block per ViT TransformerBlock; MONAI 1.6 builds none.
    config = released_layout_config(backbone="vit", qformer_num_layers=2)
    original = build_model(config, seed=0).eval()
    state = export_released_state_dict(original)
    stale = {f"visual_encoder.vit.blocks.{i}.cross_attn.out_proj.weight": torch.full((4, 4), float(i)) for i in range(12)}
    path = tmp_path / "vit.bin"
    torch.save({**state, **stale}, path)

    out = convert_released(path, tmp_path / "vit", backbone="vit", in_channels=1, num_heads=4, preprocessing="brat-tiny")
    extras = load_file(str(out / "released_extras.safetensors"))
    assert sorted(extras) == sorted(stale)
    images = torch.rand(1, 1, 32, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original.encode_image(images).views, load_checkpoint(out).encode_image(images).views)


@pytest.mark.parametrize("content", [b"", b"not a torch file\n"])
def test_unreadable_file_error(tmp_path, content):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)

    with pytest.raises(ValueError, match="not a weights-only torch file"):
        load_released_state_dict(path)


def test_pickled_object_rejected(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "weights.bin"
    torch.save({"payload": _Payload(str(marker))}, path)

    with pytest.raises(ValueError, match="pickled objects are never loaded"):
        load_released_state_dict(path)
    assert not marker.exists()


class _Payload:
    """An object whose unpickling would create a file, to prove it is never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
