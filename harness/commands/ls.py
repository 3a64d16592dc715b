"""``brat-harness ls``: list what is registered and the suites that ship with the package."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parents[2] / "suites"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what",
        nargs="?",
        choices=("all", "tasks", "encoders", "preprocessing", "configs", "adapters", "suites"),
        default="all",
        help="which list to print (default: all)",
    )


def collect() -> dict[str, list[str]]:
    """Return section -> sorted names of registered tasks, loaders, specs, configs, adapters and suites."""
    from harness.adapters import ADAPTERS
    from harness.encoders import ENCODER_LOADERS
    from harness.plugins import load_plugins
    from harness.tasks import TASKS

    load_plugins()
    return {
        "tasks": TASKS.names(),
        "encoders": ENCODER_LOADERS.names(),
        "preprocessing": _names("harness.preprocessing", ("SPECS", "list_specs")),
        "configs": _names("pretrained.config", ("list_configs",)),
        "adapters": [f"{name}: {ADAPTERS.get(name).description}" for name in ADAPTERS.names()],
        "suites": sorted(str(path.relative_to(SUITES_DIR.parent)) for path in SUITES_DIR.glob("*.yaml")),
    }


def _names(module_name: str, attributes: tuple[str, ...]) -> list[str]:
    """Names from the first of ``attributes`` the module has: a registry, or a function returning names or named objects."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return []
    for attribute in attributes:
        value = getattr(module, attribute, None)
        if value is None:
            continue
        if hasattr(value, "names"):
            items = value.names()
        elif callable(value):
            items = value()
        else:
            items = value
        return sorted(str(getattr(item, "name", item)) for item in items)
    return []


def run(args: argparse.Namespace) -> int:
    sections = collect()
    for section, names in sections.items():
        if args.what not in ("all", section):
            continue
        print(f"{section}:")
        for name in names or ["(none)"]:
            print(f"  {name}")
    return 0
