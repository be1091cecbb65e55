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
    _answers: dict[Hashable, tuple[float, T]] = field(default_factory=dict)
    _calls: dict[Hashable, asyncio.Task[T]] = field(default_factory=dict)

    async def get(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        answered = self._answers.get(key)
        if answered is not None and answered[0] > time.monotonic():
            return answered[1]
        task = self._calls.get(key)
        if task is None:
            task = asyncio.create_task(self._answer(key, call))
            # Its failure reaches the callers; with none left to hear it, it must not be reported as unheard.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._calls[key] = task
        return await asyncio.shield(task)

    def forget(self, key: Hashable) -> None:
        self._answers.pop(key, None)

    async def _answer(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        try:
            answer = await call()
        finally:
            self._calls.pop(key, None)
        now = time.monotonic()
        if len(self._answers) >= _CAPACITY:
            self._answers = {k: entry for k, entry in self._answers.items() if entry[0] > now}
        self._answers[key] = (now + self.reuse_seconds, answer)
        return answer
