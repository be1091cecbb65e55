"""Waiting out an unreachable ComfyUI inside an activity, rather than failing it for Temporal to retry: the
job says why it waits (a `warning` in its heartbeat) and the worker's log stays quiet (BackendHealth logs one
line when the backend goes down and one when it comes back, instead of a traceback per retry)."""

from __future__ import annotations

import asyncio
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
) -> T:
    """`attempt()` until it returns or fails otherwise than COMFYUI_UNREACHABLE, backing off in between.
    `on_wait(warning)` hears when the wait starts (and each retry), `on_wait(None)` when ComfyUI answers again.
    With `give_up()` true, the unreachable error is raised (the caller's time limit has passed)."""
    delay, warning = _FIRST_DELAY_SECONDS, None
    while True:
        try:
            result = await attempt()
        except ComfyError as error:
            if error.code is not ErrorCode.COMFYUI_UNREACHABLE or give_up():
                raise
            warning = warning or JobWarning(code=error.code, message=error.message, since=datetime.now(timezone.utc))
            on_wait(warning)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_SECONDS)
            continue
        if warning is not None:
            on_wait(None)
        return result
