"""Whether a backend answers, asked about once a second by the worker that places jobs on it: a backend that
stops answering gets no new jobs within a second or two, and one that answers again is used again. The
gateway's own calls feed the same BackendHealth in between."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError

PROBE_EVERY_SECONDS = 1.0


async def probe_backend(client: ComfyClient, changed: Callable[[], None],
                        every: float = PROBE_EVERY_SECONDS) -> None:
    """GET /system_stats every `every` seconds until cancelled; `changed()` when the answer changes. The
    client's BackendHealth records each answer (and logs an outage once)."""
    health = client.health
    assert health is not None
    while True:
        was = health.reachable
        try:
            await client.system_stats()
        except ComfyError:
            pass  # recorded by the client's health
        if health.reachable != was:
            changed()
        await asyncio.sleep(every)
