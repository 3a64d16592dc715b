"""``brat-harness check MANIFEST``: validate a manifest and its images, print every problem."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="manifest file (.csv, .tsv, .jsonl or .parquet)")
    parser.add_argument(
        "--labels", action="append", default=[], metavar="COL=V1,V2",
        help="allowed values of a label column, e.g. diagnosis=AD,CN (repeatable; "
        "overrides the same column in dataset.json)",
    )
    parser.add_argument("--no-images", action="store_true", help="skip opening the image and segmentation files")
    parser.add_argument("--workers", type=int, default=1, metavar="W", help="processes for the image checks (default 1)")


def parse_labels(items: list[str]) -> dict[str, list[str]]:
    """Parse ``COL=V1,V2`` items into ``{COL: [V1, V2]}``; raise ValueError on a malformed item."""
    labels: dict[str, list[str]] = {}
    for item in items:
        column, sep, values = item.partition("=")
        allowed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not column.strip() or not allowed:
            raise ValueError(f"invalid --labels {item!r}; expected COL=V1,V2, e.g. diagnosis=AD,CN")
        labels[column.strip()] = allowed
    return labels


def run(args: argparse.Namespace) -> int:
    from harness.checks import check_manifest, summarize_manifest
    from harness.manifest import read_manifest

    try:
        labels = parse_labels(args.labels)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2

    problems = check_manifest(args.manifest, labels=labels, check_images=not args.no_images, workers=args.workers)
    if problems:
        for problem in problems:
            print(f"{args.manifest}: {problem}")
        print(f"{args.manifest}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1

    print(f"{args.manifest}: OK; {summarize_manifest(read_manifest(args.manifest))}")
    return 0
