"""Waiting out an unreachable ComfyUI inside an activity, rather than failing it for Temporal to retry: the
job says why it waits (a `warning` in its heartbeat) and the worker's log stays quiet (BackendHealth logs one
line when the backend goes down and one when it comes back, instead of a traceback per retry)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TypeVar

from app.comfy.errors import ComfyError
from app.errors import ErrorCode
from app.models import JobWarning

T = TypeVar("T")

_FIRST_DELAY_SECONDS = 0.5
_MAX_DELAY_SECONDS = 5.0


async def while_unreachable(
    attempt: Callable[[], Awaitable[T]],
    *,
    on_wait: Callable[[JobWarning | None], None],
    give_up: Callable[[], bool] = lambda: False,
    max_wait: float | None = None,
) -> T:
    """`attempt()` until it returns or fails otherwise than COMFYUI_UNREACHABLE, backing off in between.
    `on_wait(warning)` hears when the wait starts (and each retry), `on_wait(None)` when ComfyUI answers again.
    The unreachable error itself is raised only to give up: when `give_up()` is true (the caller's time limit
    has passed) or the wait has lasted `max_wait` seconds."""
    delay, warning, waiting_since = _FIRST_DELAY_SECONDS, None, None
    while True:
        try:
            result = await attempt()
        except ComfyError as error:
            if error.code is not ErrorCode.COMFYUI_UNREACHABLE:
                raise
            waiting_since = waiting_since or time.monotonic()
            if give_up() or (max_wait is not None and time.monotonic() - waiting_since > max_wait):
                raise
            warning = warning or JobWarning(code=error.code, message=error.message, since=datetime.now(timezone.utc))
            on_wait(warning)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_SECONDS)
            continue
        if warning is not None:
            on_wait(None)
        return result
