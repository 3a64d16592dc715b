"""``brat-harness pretrain CONFIG.yaml``: pretrain a brat model (one process, or data-parallel under torchrun).

Data-parallel: ``torchrun --nproc-per-node 2 -m harness.cli pretrain CONFIG.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pretraining YAML file (keys documented in pretrained/train.py)")
    parser.add_argument("--out", type=Path, default=None, help="output folder; replaces the config's 'output' key")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in the output folder from its last checkpoint (starts a new run if there is none)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pretrained.data import TrainingDataError
    from pretrained.train import train
    from pretrained.train_config import PretrainConfigError, load_pretrain_config

    try:
        config = load_pretrain_config(args.config, output=args.out)
        checkpoint = train(config, resume=args.resume)
    except (PretrainConfigError, TrainingDataError, FileExistsError) as error:
        logger.error("%s", error)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {checkpoint}")
    return 0
