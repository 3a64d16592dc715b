"""Time one training step of the brat-tiny vision backbone on the CPU.

Usage:
    python benchmarks/bench_backbone.py [--batch-size 16] [--repeats 3] [--threads 2]

Measures forward plus backward (sum of the tokens as the loss) on random (B, 1, 32, 128,
128) input for: MONAI's 7x7x7 stem against the 3x3x3 stem that ``densenet-tiny`` uses,
the block configurations (2, 2, 2) and (2, 4, 4), and the default against the
channels-last memory layout that the trainer uses on the CPU. Each row is the mean of
``--repeats`` steps after one warm-up step. Prints a Markdown table and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from pretrained.backbones import DenseNetTokens, _densenet

VARIANTS = [
    # (label, block configuration, stem kernel, channels last)
    ("(2, 2, 2), 7x7x7 stem", (2, 2, 2), 7, False),
    ("(2, 2, 2), 3x3x3 stem", (2, 2, 2), 3, False),
    ("(2, 4, 4), 3x3x3 stem (densenet-tiny)", (2, 4, 4), 3, False),
    ("(2, 4, 4), 3x3x3 stem, channels last (densenet-tiny in training)", (2, 4, 4), 3, True),
]


def step_seconds(backbone: nn.Module, images: torch.Tensor, repeats: int) -> float:
    def step() -> None:
        backbone.zero_grad(set_to_none=True)
        backbone(images).sum().backward()

    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, 32, 128, 128)
    load_before = os.getloadavg()[0]
    print(f"| backbone (growth 16, 32 initial features) | parameters | seconds per step (batch {args.batch_size}) |")
    print("| --- | --- | --- |")
    for label, blocks, stem, channels_last in VARIANTS:
        backbone: DenseNetTokens = _densenet(blocks, 16, 32, stem_kernel=stem)(1, (32, 128, 128))
        batch = images
        if channels_last:
            backbone.to(memory_format=torch.channels_last_3d)
            batch = images.contiguous(memory_format=torch.channels_last_3d)
        seconds = step_seconds(backbone, batch, args.repeats)
        parameters = sum(p.numel() for p in backbone.parameters())
        print(f"| {label} | {parameters:,} | {seconds:.2f} |", flush=True)
    print(f"threads {args.threads}; load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
