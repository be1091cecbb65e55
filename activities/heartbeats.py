"""Heartbeats while an activity works, whatever it is waiting on: a ComfyUI call that takes its time, or a
backend that does not answer, must not look like a dead worker to Temporal.

Checked every second; sent when there is news, or when nothing new has been said for a quarter of the
activity's heartbeat timeout (a keepalive well within it). Each heartbeat costs the worker CPU (its details
serialized, handed to the SDK's core), and the time spent, which changes every second, is no news: a worker
following a thousand prompts heartbeated each of them every second before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import Any

from temporalio import activity

HEARTBEAT_CHECK_SECONDS = 1.0
# With nothing new, a heartbeat at least this often: a share of the heartbeat timeout, at most the cap.
KEEPALIVE_SHARE = 0.25
KEEPALIVE_MAX_SECONDS = 10.0


def keepalive_seconds(heartbeat_timeout: timedelta | None) -> float:
    if heartbeat_timeout is None:
        return KEEPALIVE_MAX_SECONDS
    return min(KEEPALIVE_MAX_SECONDS, heartbeat_timeout.total_seconds() * KEEPALIVE_SHARE)


@asynccontextmanager
async def heartbeating(details: Callable[[], Any], also: Callable[[], None] | None = None,
                       news: Callable[[], object] | None = None) -> AsyncIterator[None]:
    """Heartbeat `details()` for the duration of the block: every second, or, given `news` (what a heartbeat
    says that counts as new), when `news()` changes and as a keepalive. `also()`, which must not block, runs
    after each heartbeat."""
    keepalive = keepalive_seconds(activity.info().heartbeat_timeout)

    async def beat() -> None:
        said: object = object()
        said_at = float("-inf")
        while True:
            now = news() if news is not None else None
            if news is None or now != said or time.monotonic() - said_at >= keepalive:
                activity.heartbeat(details())
                said, said_at = now, time.monotonic()
                if also is not None:
                    also()
            await asyncio.sleep(HEARTBEAT_CHECK_SECONDS)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
