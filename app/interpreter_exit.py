"""Ending a process that ran the Temporal SDK without the interpreter's teardown.

The SDK's core (Rust) keeps threads of its own for as long as the process lives; at interpreter exit one of
them can still call into Python while Python finalizes, and the process aborts (temporalio/sdk-python#300):
`Fatal Python error: PyGILState_Release: thread state ... must be current when releasing`, exit 134, after
the command had done its work and printed its answer. `comfyui-gateway health --worker`, run 60 times
against a dev server, aborted 22 times so. Once a command is done there is nothing left for the teardown to
do that the process needs (its children are stopped, its files closed), so it flushes what it wrote and
ends with `os._exit`, which runs no teardown at all.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_code_of(stop: SystemExit) -> int:
    """The exit code `sys.exit(x)` asks for, as the interpreter reads it: None is 0, a message is printed and 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_then_exit(command: Callable[[], object]) -> NoReturn:
    """Run `command`, then end the process at once with its exit code: 0, `sys.exit`'s, 130 for a Ctrl-C that
    reached it, 1 (after the traceback) for an exception."""
    try:
        command()
        code = 0
    except SystemExit as stop:
        code = exit_code_of(stop)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # what the interpreter would print before exiting 1
        traceback.print_exc()
        code = 1
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Flush the log handlers and stdio (os._exit would drop what is buffered), then exit without teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader is gone: nothing more can reach it
            pass
    os._exit(code)
