"""``brat-harness preprocess MANIFEST --spec NAME --out DIR``: write preprocessed arrays per study."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="manifest file (.csv, .tsv, .jsonl or .parquet)")
    parser.add_argument("--spec", default="brat-v1", help="preprocessing spec name (default brat-v1)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder; arrays go to DIR/<spec>-<digest>/")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="W",
        help=f"worker processes (default min(2, CPU count) = {min(2, os.cpu_count() or 1)} here)",
    )
    parser.add_argument("--preview", type=int, default=0, metavar="N", help="save slice PNGs of the first N studies")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from harness.manifest import ManifestError
    from harness.preprocessing import preprocess_manifest

    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        result = preprocess_manifest(
            args.manifest, args.spec, args.out, workers=args.workers,
            progress=not args.no_progress, preview=max(0, args.preview),
        )
    except (ManifestError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2

    for message in result["errors"].values():
        print(f"failed: {message}", file=sys.stderr)
    print(
        f"{result['output_dir']}: {result['written']} written, {result['skipped']} skipped (up to date), "
        f"{result['failed']} failed"
    )
    return 1 if result["failed"] else 0
