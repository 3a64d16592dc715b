"""``brat-harness table``: render a run's result records as Markdown, LaTeX or CSV."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder (with results.jsonl) or a results.jsonl file")
    parser.add_argument("--format", choices=("md", "latex", "csv"), default="md", help="output format (default: md)")
    parser.add_argument("--metrics", nargs="+", default=None, help="metrics to show, in order (default: all)")
    parser.add_argument("--reference", default=None, metavar="NAME", help="published numbers to add, e.g. brat_mskbrain, or a YAML path")
    parser.add_argument("--output", default=None, help="write the table to this file instead of printing it")
    parser.add_argument("--figure", default=None, metavar="PATH", help="also write a forest plot of the first metric as PATH.png and PATH.pdf")


def run(args: argparse.Namespace) -> int:
    from harness.io import write_text_atomic
    from harness.results import read_records
    from reports.tables import build_table, load_reference, render

    records = read_records(args.run_dir)
    if not records:
        raise ValueError(f"{args.run_dir}: the results file contains no records; run or resume the suite first")
    reference = load_reference(args.reference) if args.reference else None
    table = build_table(records, args.metrics, reference)
    text = render(table, args.format)
    if args.output:
        write_text_atomic(args.output, text)
        logger.info("wrote %s", args.output)
    else:
        print(text, end="")
    if args.figure:
        from reports.figures import forest_plot

        metric = args.metrics[0] if args.metrics else None
        for path in forest_plot(records, Path(args.figure), metric, reference):
            logger.info("wrote %s", path)
    return 0
