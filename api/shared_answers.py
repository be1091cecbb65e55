"""Answers shared between concurrent requests: one call at a time per key, whose answer every caller that
asked meanwhile gets, reused for a short while. However many clients ask at once (a burst of `/models`,
twenty clients polling one job), the gateway asks Temporal or ComfyUI once.

The call runs in a task of its own, shielded from its callers: a client that goes away cancels only its own
wait, never the shared call (a request cancelled inside httpx's connection pool can leak one of its slots
for good; httpcore issue 1093)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_CAPACITY = 10_000


@dataclass
class SharedAnswers(Generic[T]):
    reuse_seconds: float
    # key → (reused until, when its call began, the answer)
    _answers: dict[Hashable, tuple[float, float, T]] = field(default_factory=dict)
    _calls: dict[Hashable, asyncio.Task[T]] = field(default_factory=dict)

    async def get(self, key: Hashable, call: Callable[[], Awaitable[T]], *, fresh: bool = False) -> T:
        """The answer for `key`: one reused, or the call under way, or a new call. `fresh`: a new call, begun
        now, neither an answer reused nor a call under way, which began before whatever the caller must see
        (its own signal, a workflow that has closed); the callers that come after it share it."""
        task = None
        if not fresh:
            answered = self._answers.get(key)
            if answered is not None and answered[0] > time.monotonic():
                return answered[2]
            task = self._calls.get(key)
        if task is None:
            task = asyncio.create_task(self._answer(key, call, time.monotonic()))
            # Its failure reaches the callers; with none left to hear it, it must not be reported as unheard.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._calls[key] = task
        return await asyncio.shield(task)

    async def _answer(self, key: Hashable, call: Callable[[], Awaitable[T]], began: float) -> T:
        try:
            answer = await call()
        finally:
            if self._calls.get(key) is asyncio.current_task():  # not a fresh call begun since
                del self._calls[key]
        now = time.monotonic()
        if len(self._answers) >= _CAPACITY:
            self._answers = {k: entry for k, entry in self._answers.items() if entry[0] > now}
        stored = self._answers.get(key)
        if stored is None or stored[1] <= began:  # an answer begun earlier never replaces one begun later
            self._answers[key] = (now + self.reuse_seconds, began, answer)
        return answer
