"""The ``diffsamp`` command line: a click group whose subcommands live one topic per module.

Commands only parse and validate; the work is done by library functions (``diffsamp.api`` and friends).
"""

from __future__ import annotations

from diffsamp.cli import amed, bench, fid, nll, registry_cmds, rf, sampling, solver, train  # noqa: F401  (each adds its commands)
from diffsamp.cli._common import main

__all__ = ["main"]
