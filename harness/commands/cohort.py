"""``brat-harness cohort``: write the deterministic synthetic brain-MRI cohort."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_SEQUENCES = "t1c,t1,t2,flair"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of studies (imaging sessions) to write")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed; equal --n, --seed and --sequences give identical files (default 0)")
    parser.add_argument("--out", required=True, help="output folder; a rerun into it skips studies already complete")
    parser.add_argument(
        "--sequences",
        default=DEFAULT_SEQUENCES,
        help=f"comma-separated sequences to write, from {DEFAULT_SEQUENCES} (default: all four)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: min(2, number of CPUs))"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args: argparse.Namespace) -> int:
    from harness.cohort import check_sequences, generate_cohort

    try:
        sequences = check_sequences(args.sequences.split(","))
    except ValueError as error:
        logger.error("--sequences %r: %s", args.sequences, error)
        return 2
    if args.n < 1:
        logger.error("--n must be at least 1, got %d", args.n)
        return 2
    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    if workers < 1:
        logger.error("--workers must be at least 1, got %d", workers)
        return 2
    try:
        manifest = generate_cohort(args.out, args.n, seed=args.seed, sequences=sequences, workers=workers, progress=not args.no_progress)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    print(manifest)
    return 0
