"""The child processes of `comfyui-gateway dev`: none outlives it.

Every child gets the Linux parent-death signal (`prctl(PR_SET_PDEATHSIG)`), not a pipe to watch: the
Temporal dev server is a Go binary we cannot teach to watch a pipe, and the kernel delivers the signal
however the parent dies, SIGKILL and the OOM killer included, with no code of ours left to run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

_PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: between fork and exec the child must not load a library (the loader's lock
# may be held by another thread of the parent, e.g. the Temporal client's, at the moment of the fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def spawn_dying_with_this_process(args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Popen, and the child is SIGKILLed when this process dies. SIGKILL because once the parent is gone
    nothing is left to stop the parts in order, and every part is built to survive a crash (Temporal's
    SQLite WAL keeps what it committed; a worker's activities are retried by the next worker).

    The kernel sends the signal when the *thread* that forked exits, so only the main thread may spawn."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("spawn_dying_with_this_process must run on the main thread")
    parent = os.getpid()

    def die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal would come
            os.kill(os.getpid(), signal.SIGKILL)

    return subprocess.Popen(args, preexec_fn=die_with_parent, **popen)


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a clean stop), then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"
