"""Measure embedding-extraction throughput with and without preprocessing worker processes.

For each worker count the script extracts image and report embeddings for the first N
studies of a manifest into a fresh cache folder, so every study is preprocessed and
encoded, and prints studies per second. The encoder is a random ``brat-tiny``
initialisation: its cost matches a trained brat-tiny checkpoint.

Usage:
    python benchmarks/bench_extract.py --manifest COHORT/manifest.csv [--n 40] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest with t1c images (a synthetic cohort works)")
    parser.add_argument("--n", type=int, default=40, help="studies to extract (default 40)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=4, help="studies per encoder batch (default 4)")
    args = parser.parse_args()

    from harness.cache import EmbeddingCache
    from harness.encoders import load_encoder
    from harness.extract import extract_embeddings
    from harness.manifest import read_manifest

    rows = read_manifest(args.manifest).head(args.n).to_dict("records")
    encoder = load_encoder("brat-random", config="brat-tiny", seed=0)
    print(f"{len(rows)} studies from {args.manifest}; CPUs {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")

    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="bench-extract-") as folder:
            cache = EmbeddingCache(folder, batch_size=args.batch_size, workers=workers)
            started = time.perf_counter()
            extract_embeddings(encoder, rows, cache, progress=False)
            elapsed = time.perf_counter() - started
        print(f"workers {workers}: {elapsed:.1f} s, {len(rows) / elapsed:.2f} studies/s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
