"""``brat-harness adapt ADAPTER --out DIR ...``: convert a dataset's layout into a manifest."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.adapters import ADAPTERS

    adapters = parser.add_subparsers(dest="adapter", metavar="ADAPTER", required=True)
    for name in ADAPTERS.names():
        adapter = ADAPTERS.get(name)
        sub = adapters.add_parser(name, help=adapter.description, description=adapter.description)
        sub.add_argument("--out", required=True, help="output folder for manifest.csv, splits.json and dataset.json")
        adapter.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    from harness.adapters import ADAPTERS

    adapter = ADAPTERS.get(args.adapter)
    result = adapter.build(args.out, **adapter.arguments_from_cli(args))
    info = result.info
    print(f"wrote {result.manifest}: {info['n_studies']} studies, {info['n_subjects']} subjects, per split {info['studies_per_split']}")
    return 0
