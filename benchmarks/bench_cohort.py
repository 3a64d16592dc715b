"""Time synthetic cohort generation and measure its size on disk.

Usage: python benchmarks/bench_cohort.py [--n 200] [--workers 2] [--out DIR] [--keep]

Prints studies per minute, MB per study and the size extrapolated to a 600-study cohort.
The load average is printed too, because other processes on the machine slow the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from harness.cohort import SEQUENCES, generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of studies (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--sequences", default=",".join(SEQUENCES), help="comma-separated sequences (default all four)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output folder")
    args = parser.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    generate_cohort(out, args.n, seed=args.seed, sequences=args.sequences.split(","), workers=args.workers, progress=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    study_bytes = sum(path.stat().st_size for path in (out / "studies").rglob("*") if path.is_file())
    megabytes_per_study = study_bytes / args.n / 1e6
    print(f"studies: {args.n}, sequences: {args.sequences}, workers: {args.workers}, CPUs: {os.cpu_count()}")
    print(f"elapsed: {elapsed:.1f} s, {args.n / elapsed * 60:.1f} studies/min")
    print(f"disk: {study_bytes / 1e6:.1f} MB, {megabytes_per_study:.2f} MB/study, 600 studies ~ {megabytes_per_study * 600 / 1e3:.2f} GB")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    if args.out is None and not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
