"""The workflow modules' bytecode, compiled once when the worker starts.

Temporal's workflow sandbox imports the workflow modules afresh for every workflow instance (every job, every
webhook delivery), to give each its own globals. Without a bytecode cache (`PYTHONDONTWRITEBYTECODE`, as on
the development machine, or a cache never written) each of those imports compiles the source again: about
4 ms of the worker's CPU per job there, a tenth of all it spends. Compiled here, each later import reads the
cache, which Python does whatever `PYTHONDONTWRITEBYTECODE` says.
"""

from __future__ import annotations

import compileall
import logging
from pathlib import Path

import workflows_temporal

log = logging.getLogger(__name__)


def cache_workflow_bytecode() -> None:
    directory = Path(workflows_temporal.__file__).parent
    # quiet=2: a directory the worker may not write (a read-only install) is not an error, only slower.
    if not compileall.compile_dir(directory, quiet=2):
        log.info("could not write the bytecode of %s: each workflow instance compiles it anew", directory)
