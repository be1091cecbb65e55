"""The child processes of `comfyui-gateway dev`: none outlives it, and a part that exits is restarted.

Every child gets the Linux parent-death signal (`prctl(PR_SET_PDEATHSIG)`), not a pipe to watch: the
Temporal dev server is a Go binary we cannot teach to watch a pipe, and the kernel delivers the signal
however the parent dies, SIGKILL and the OOM killer included, with no code of ours left to run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("comfyui_gateway")

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


class RestartBackoff:
    """Seconds to wait before restarting a part: 1, 2, 4, ... up to 30 while it keeps dying soon after
    it starts, and 1 again once it has run for a minute (a crash then is news, not a crash loop)."""

    FIRST = 1.0
    LONGEST = 30.0
    RAN_FINE_AFTER = 60.0

    def __init__(self) -> None:
        self._next = self.FIRST

    def delay_after_exit(self, ran_for: float) -> float:
        if ran_for >= self.RAN_FINE_AFTER:
            self._next = self.FIRST
        delay = self._next
        self._next = min(self._next * 2, self.LONGEST)
        return delay


class PartMisconfigured(RuntimeError):
    """A part exited with 78 (EX_CONFIG): its configuration is wrong (e.g. PORT is taken), and starting it
    again would fail the same way."""


class RestartingPart:
    """A part of the gateway in a child process of its own, started again with backoff whenever it exits,
    unless it exits with 78 (EX_CONFIG): a configuration error is not transient (PartMisconfigured).

    The part gets a process group of its own so that a Ctrl-C in the terminal reaches only the supervisor,
    which then stops the parts in order instead of having them all exit at once (and be restarted)."""

    def __init__(self, name: str, args: Sequence[str]) -> None:
        self.name = name
        self._args = args
        self._backoff = RestartBackoff()
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._restart_at: float | None = None

    def start(self) -> None:
        self._process = spawn_dying_with_this_process(self._args, process_group=0)
        self._started_at = time.monotonic()
        self._restart_at = None

    def keep_running(self) -> None:
        """Called over and over by the supervisor: notices an exit, and restarts once its delay is over."""
        assert self._process is not None, "start() first"
        now = time.monotonic()
        if self._restart_at is None and self._process.poll() is not None:
            if self._process.returncode == os.EX_CONFIG:
                raise PartMisconfigured(f"{self.name} {describe_exit(self._process.returncode)} (EX_CONFIG: its "
                                        "configuration is wrong, as it said above); not restarting it")
            delay = self._backoff.delay_after_exit(ran_for=now - self._started_at)
            self._restart_at = now + delay
            log.error("%s %s; restarting it in %g s", self.name, describe_exit(self._process.returncode), delay)
        if self._restart_at is not None and now >= self._restart_at:
            self.start()
            log.info("%s restarted (pid %d)", self.name, self._process.pid)

    def stop(self, timeout: float) -> None:
        if self._process is not None:
            stop(self._process, timeout)
