"""A heartbeat every second while an activity works, whatever it is waiting on: a ComfyUI call that takes
its time, or a backend that does not answer, must not look like a dead worker to Temporal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from temporalio import activity

HEARTBEAT_EVERY_SECONDS = 1.0


@asynccontextmanager
async def heartbeating(details: Callable[[], Any], also: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Heartbeat `details()` every second for the duration of the block; `also()`, which must not block,
    runs after each one."""

    async def beat() -> None:
        while True:
            activity.heartbeat(details())
            if also is not None:
                also()
            await asyncio.sleep(HEARTBEAT_EVERY_SECONDS)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
