"""``brat-harness run``: run a suite, write result records and tables, print the table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="suite YAML file")
    parser.add_argument("--out", required=True, help="run folder; rerunning into it resumes and skips finished jobs")
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help="run jobs in-process (local) or as Ray tasks (ray)")
    parser.add_argument("--cache", default=None, help="embedding cache folder shared between runs (default: RUN_DIR/cache)")
    parser.add_argument("--batch-size", type=int, default=2, help="studies per encoder batch (default: 2)")
    parser.add_argument("--workers", type=int, default=0, help="preprocessing worker processes per extraction (default: 0 = in-process)")
    parser.add_argument("--reference", default=None, metavar="NAME", help="published numbers to add to the tables, e.g. brat_mskbrain")


def write_tables(run_dir: Path, records, reference_name: str | None = None) -> str:
    """Write ``table.md``, ``table.tex`` and ``table.csv`` into ``run_dir``; return the Markdown."""
    from harness.io import write_text_atomic
    from reports.tables import build_table, load_reference, render

    reference = load_reference(reference_name) if reference_name else None
    table = build_table(records, reference=reference)
    for fmt, name in (("md", "table.md"), ("latex", "table.tex"), ("csv", "table.csv")):
        write_text_atomic(run_dir / name, render(table, fmt))
    return render(table, "md")


def run(args: argparse.Namespace) -> int:
    from harness.runner import run_suite
    from harness.suite import SuiteError

    try:
        summary = run_suite(args.suite, args.out, executor=args.executor, cache_dir=args.cache, batch_size=args.batch_size, workers=args.workers)
    except SuiteError as error:
        print(f"invalid suite: {error}", file=sys.stderr)
        return 2
    if summary.records:
        print(write_tables(summary.run_dir, summary.records, args.reference))
    if summary.failed:
        print(f"{len(summary.failed)} job(s) failed (details in RUN_DIR/jobs/<hash>/error.json):", file=sys.stderr)
        for outcome in summary.failed:
            print(f"  - {outcome.job.kind} {outcome.job.name} [{outcome.job.hash[:12] or 'not run'}]: {outcome.error}", file=sys.stderr)
        return 1
    return 0
