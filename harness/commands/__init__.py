"""Sub-commands of the core package; each module defines ``add_arguments`` and ``run``."""
