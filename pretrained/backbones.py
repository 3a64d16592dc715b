"""3D vision backbones that turn a preprocessed MRI into visual tokens ``(B, L, D_I)``.

Every backbone is a MONAI network kept under the attribute name the released brat
checkpoints use (``densenet``, ``resnet`` or ``vit``), so the state-dict keys are
``visual_encoder.densenet.*`` and so on once the wrapper sits at ``visual_encoder``.

Token layouts follow the released wrappers:

- DenseNet: the ``features`` map ``(B, D_I, d, h, w)`` is averaged over the slice axis
  ``d``, passed through a leaky ReLU (slope 0.01) and flattened to ``(B, h * w, D_I)``.
  At (32, 256, 256) DenseNet-121 gives 64 tokens of width 1024. The unused
  ``class_layers`` stay in the module because the released checkpoints contain them.
- ResNet-50: the last map of ``ResNetFeatures`` ``(B, 2048, d, h, w)`` flattened to
  ``(B, d * h * w, 2048)``; 64 tokens at (32, 256, 256).
- ViT-B/16: patch tokens after the final LayerNorm with the class token dropped;
  512 tokens of width 768 at (32, 256, 256).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: how to build it, its checkpoint attribute and segmentation hints."""

    name: str
    attribute: str
    build: Callable[[int, tuple[int, int, int]], nn.Module]
    recommended_patch_size: tuple[int, int, int]


class VisualEncoder(nn.Module):
    """Base class: ``forward(x (B, C, D, H, W)) -> tokens (B, L, D_I)``."""

    attribute: str = ""

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the backbone's intermediate maps ``(B, C_k, d_k, h_k, w_k)``, fine to coarse."""
        raise NotImplementedError

    @property
    def encoder_key_prefix(self) -> str:
        """State-dict prefix of the backbone weights inside a :class:`~pretrained.model.BratModel`."""
        return f"visual_encoder.{self.attribute}."


class DenseNetTokens(VisualEncoder):
    attribute = "densenet"

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.densenet = densenet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.densenet.features(x)  # (B, D_I, d, h, w)
        features = features.mean(dim=2)
        features = F.leaky_relu(features, negative_slope=0.01)
        return features.flatten(2).transpose(1, 2)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        # One map per resolution: relu0 (stride 2), every dense block but the last (each
        # is followed by a stride-2 transition), and norm5 after the last block.
        children = list(self.densenet.features.named_children())
        blocks = [name for name, _ in children if name.startswith("denseblock")]
        keep = {"relu0", "norm5", *blocks[:-1]}
        maps = []
        for name, module in children:
            x = module(x)
            if name in keep:
                maps.append(x)
        return maps


class ResNetTokens(VisualEncoder):
    attribute = "resnet"

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the released wrapper is documented for (32, 256, 256), where the last map
        # has depth 1; for other depths this flattens all three spatial axes.
        last = self.resnet(x)[-1]
        return last.flatten(2).transpose(1, 2)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.resnet(x))


class ViTTokens(VisualEncoder):
    attribute = "vit"

    def __init__(self, vit: nn.Module, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.vit = vit
        self.grid = grid

    def _hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.vit.patch_embedding(x)
        cls_token = self.vit.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        states = []
        for block in self.vit.blocks:
            x = block(x)
            states.append(x)
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._hidden_states(x)[-1]
        return self.vit.norm(last)[:, 1:, :]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Blocks 3, 6, 9 and 12 (UNETR's choice), reshaped to the patch grid at stride 16.
        states = self._hidden_states(x)
        picks = [states[i] for i in range(2, len(states), 3)]
        return [s[:, 1:, :].transpose(1, 2).reshape(s.shape[0], s.shape[-1], *self.grid) for s in picks]


def _densenet(block_config: tuple[int, ...], growth_rate: int, init_features: int, bn_size: int = 4, stem_kernel: int = 7):
    """Return a builder of a MONAI DenseNet whose first convolution has a ``stem_kernel`` cube kernel.

    MONAI fixes a 7x7x7 stem. For a small network that stem at full resolution costs as
    much as all later layers, so ``densenet-tiny`` uses 3x3x3, which cuts the CPU time of a
    backbone training step by a third or more (``benchmarks/bench_backbone.py``).
    """

    def build(in_channels: int, image_size: tuple[int, int, int]) -> nn.Module:
        from monai.networks.nets import DenseNet

        network = DenseNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=block_config,
            bn_size=bn_size,
        )
        if stem_kernel != 7:
            stem = nn.Conv3d(in_channels, init_features, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False)
            nn.init.kaiming_normal_(stem.weight)  # MONAI's initialisation of its convolutions
            network.features.conv0 = stem
        return DenseNetTokens(network)

    return build


def _resnet50(in_channels: int, image_size: tuple[int, int, int]) -> nn.Module:
    from monai.networks.nets import ResNetFeatures

    return ResNetTokens(ResNetFeatures("resnet50", pretrained=False, spatial_dims=3, in_channels=in_channels))


def _vit(in_channels: int, image_size: tuple[int, int, int]) -> nn.Module:
    from monai.networks.nets import ViT

    patch = 16
    if any(size % patch for size in image_size):
        raise ValueError(f"backbone 'vit': image_size {image_size} must be divisible by the patch size {patch}")
    vit = ViT(
        in_channels=in_channels,
        img_size=image_size,
        patch_size=patch,
        proj_type="conv",
        pos_embed_type="sincos",
        classification=True,
    )
    del vit.classification_head
    return ViTTokens(vit, tuple(size // patch for size in image_size))


# Block configurations are MONAI's DenseNet-121 and DenseNet-169 (growth 32, 64 initial
# features). densenet-tiny keeps three short blocks, so its total stride is 16, and a
# 3x3x3 stem.
BACKBONES: dict[str, BackboneSpec] = {
    "densenet121": BackboneSpec("densenet121", "densenet", _densenet((6, 12, 24, 16), 32, 64), (128, 128, 128)),
    "densenet169": BackboneSpec("densenet169", "densenet", _densenet((6, 12, 32, 32), 32, 64), (128, 128, 128)),
    "densenet-tiny": BackboneSpec("densenet-tiny", "densenet", _densenet((2, 4, 4), 16, 32, stem_kernel=3), (64, 64, 64)),
    "resnet50": BackboneSpec("resnet50", "resnet", _resnet50, (128, 128, 128)),
    "vit": BackboneSpec("vit", "vit", _vit, (128, 128, 128)),
}

# DenseNet block configuration -> backbone name, used to recognise released weights.
DENSENET_BLOCKS: dict[tuple[int, ...], str] = {
    (6, 12, 24, 16): "densenet121",
    (6, 12, 32, 32): "densenet169",
    (2, 4, 4): "densenet-tiny",
}


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}") from None


def build_backbone(name: str, in_channels: int, image_size: tuple[int, int, int]) -> VisualEncoder:
    """Build the named backbone with fresh weights (nothing is downloaded)."""
    return get_backbone_spec(name).build(in_channels, tuple(image_size))


@functools.lru_cache(maxsize=32)
def token_shape(name: str, in_channels: int, image_size: tuple[int, int, int]) -> tuple[int, int]:
    """Return ``(L, D_I)`` for the named backbone at ``image_size``.

    The backbone runs on the ``meta`` device, so no memory is allocated and nothing is
    computed; only shapes propagate.
    """
    with torch.device("meta"):
        backbone = build_backbone(name, in_channels, image_size)
        tokens = backbone(torch.empty(1, in_channels, *image_size))
    return int(tokens.shape[1]), int(tokens.shape[2])


@functools.lru_cache(maxsize=32)
def feature_geometry(
    name: str, in_channels: int, patch_size: tuple[int, int, int]
) -> tuple[list[list[int]], list[int]]:
    """Return per-map strides ``[[sd, sh, sw], ...]`` and channel counts at ``patch_size``."""
    with torch.device("meta"):
        backbone = build_backbone(name, in_channels, patch_size)
        maps = backbone.feature_maps(torch.empty(1, in_channels, *patch_size))
    strides = [[patch_size[i] // int(m.shape[2 + i]) for i in range(3)] for m in maps]
    return strides, [int(m.shape[1]) for m in maps]
