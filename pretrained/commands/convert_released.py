"""``brat-harness convert-released``: released brat weights -> checkpoint folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_BACKBONES = ("densenet121", "densenet169", "resnet50", "vit", "densenet-tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="released state dict (the zoo's weights.bin)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--backbone", choices=_BACKBONES, default=None,
        help="backbone of the file (see docs/released-weights.md); default: read from tensor shapes",
    )  # fmt: skip
    parser.add_argument(
        "--in-channels", type=int, default=None,
        help="input channels of the file: 1 (T1c) or 4 (T1c, T1, T2, FLAIR); default: read from tensor shapes",
    )  # fmt: skip
    parser.add_argument(
        "--num-heads", type=int, default=12, help="Q-Former attention heads (not stored in the file; released code uses 12)"
    )
    parser.add_argument(
        "--tokenizer", default="minilm",
        help="local tokenizer folder for the Q-Former text path, or 'minilm' for the bundled BERT uncased vocabulary",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    from pretrained.checkpoint import model_digest
    from pretrained.released import convert_released

    if args.out.exists() and not args.overwrite:
        logger.error("%s already exists; pass --overwrite to replace it", args.out)
        return 2
    try:
        folder = convert_released(
            args.weights,
            args.out,
            backbone=args.backbone,
            in_channels=args.in_channels,
            num_heads=args.num_heads,
            tokenizer=args.tokenizer,
        )
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 1
    print(f"wrote {folder} (model digest {model_digest(folder)})")
    return 0
