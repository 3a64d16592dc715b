"""Discovery of the packages that register tasks, encoder loaders and commands.

The core never imports ``tasks`` or ``pretrained`` by name. Each of them declares an
entry point in the ``brat_harness.plugins`` group whose module registers its objects on
import; :func:`load_plugins` imports them once.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "brat_harness.plugins"
_loaded = False


def load_plugins() -> None:
    """Import every module registered under the ``brat_harness.plugins`` entry-point group."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        logger.debug("loading plugin %s from %s", entry.name, entry.value)
        importlib.import_module(entry.value)
