"""The processing-interrupted flag behind POST /interrupt (ComfyUI's
comfy.model_management.interrupt_current_processing / throw_exception_if_processing_interrupted)."""

from __future__ import annotations

import threading
import time

# ComfyUI's test node polls the flag at least every 50 ms, which is the interrupt latency the
# recordings show; every wait in the simulator uses the same slice.
POLL_INTERVAL_S = 0.05


class InterruptProcessingException(Exception):
    """Raised inside a running node when the interrupt flag is set; ends the prompt as interrupted."""


class InterruptFlag:
    """Set by POST /interrupt from the HTTP side, checked by the worker thread; the executor clears
    it when a prompt starts, so an interrupt sent while idle does not hit the next prompt."""

    def __init__(self, poll_interval: float | None = POLL_INTERVAL_S) -> None:
        # None: a sleep waits on the flag itself (it still wakes at once when set) instead of checking it
        # every 50 ms; for the parallel lanes of a benchmark, whose hundreds of sleeping threads would
        # otherwise wake 20 times a second each.
        self._event = threading.Event()
        self._poll_interval = poll_interval

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise InterruptProcessingException()

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, raising InterruptProcessingException within 50 ms of an interrupt."""
        end = time.monotonic() + max(0.0, seconds)
        while True:
            self.raise_if_set()
            left = end - time.monotonic()
            if left <= 0:
                return
            self._event.wait(left if self._poll_interval is None else min(self._poll_interval, left))
