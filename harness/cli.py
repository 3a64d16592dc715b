"""The ``brat-harness`` command line: the one place that wires all four packages together.

Each sub-command lives in its own module with two functions, ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so
``brat-harness --help`` stays fast and a broken optional dependency affects only the
commands that need it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from harness import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "cohort": ("harness.commands.cohort", "generate the synthetic brain-MRI cohort"),
    "check": ("harness.commands.check", "validate a manifest and its images"),
    "preprocess": ("harness.commands.preprocess", "write preprocessed arrays for a manifest"),
    "pretrain": ("pretrained.commands.pretrain", "pretrain a brat model from a YAML config"),
    "convert-released": ("pretrained.commands.convert_released", "convert released brat weights to a checkpoint folder"),
    "extract": ("harness.commands.extract", "write image and report embeddings to the cache"),
    "ls": ("harness.commands.ls", "list registered tasks, models, datasets and preprocessing specs"),
    "validate": ("harness.commands.validate", "check a suite file without running it"),
    "run": ("harness.commands.run", "run a suite and write result records and tables"),
    "table": ("harness.commands.table", "render result records as Markdown, LaTeX or CSV tables"),
    "adapt": ("harness.commands.adapt", "convert a dataset's native layout into a manifest"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brat-harness",
        description="Pretrain and evaluate 3D brain-MRI foundation encoders.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v INFO is the default, -vv DEBUG)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        module.add_arguments(sub_parser)
    return parser


def _load(module_name: str):
    """Import a command module; a module that does not exist yet is skipped (returns None)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def _configure_logging(verbose: int, quiet: bool) -> None:
    if quiet:
        level = logging.WARNING
    elif verbose >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(_load(args._module).run(args) or 0)
    except (OSError, ValueError, KeyError) as error:
        if args.verbose >= 2:
            raise
        # KeyError's str() adds quotes around the message, so print its argument.
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"brat-harness {args.command}: error: {message}", file=sys.stderr)
        print("(run with -vv for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
