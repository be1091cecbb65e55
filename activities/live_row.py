"""The live columns of a job's row (progress, current node, queue position, warning), kept current by the
activity that runs its prompt, so that lists of jobs agree with a job read on its own. Never the job's
status, which is its workflow's alone.

Written in the background, one write at a time, with the latest values: a database that makes a write wait
(SQLite's busy timeout is 30 s) must not hold up the heartbeats that keep the activity alive. Offered as ComfyUI
reports each change (not only with the heartbeat, once a second), since the event streams read progress from
here (api.job_streams); at most one write per LIVE_ROW_WRITE_SECONDS, so that a prompt that reports many
changes a second costs the database that many writes at most.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from sqlalchemy.engine import Engine
from temporalio import activity

from app.db import session_scope
from app.jobstore import write_live_progress
from app.models import LiveProgress

LIVE_ROW_WRITE_SECONDS = 0.1


class LiveRow:
    def __init__(self, engine: Engine, job_id: str, attempt: int) -> None:
        self._engine = engine
        self._job_id = job_id
        self._attempt = attempt
        # What the row holds when an attempt starts (a new attempt's row is reset to it): nothing to write yet.
        self._written: LiveProgress | None = LiveProgress()
        self._wanted: LiveProgress | None = None
        self._writer: asyncio.Task[None] | None = None
        self._last_write = float("-inf")  # monotonic

    def offer(self, live: LiveProgress) -> None:
        """Have `live` written, unless it is what the row already holds; returns at once."""
        self._wanted = live.model_copy(deep=True)
        if self._wanted != self._written and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_wanted())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with suppress(asyncio.CancelledError):
                await self._writer

    async def _write_wanted(self) -> None:
        while self._wanted is not None and self._wanted != self._written:
            # Between any two writes, also when an offer comes after the last write ended.
            await asyncio.sleep(max(0.0, self._last_write + LIVE_ROW_WRITE_SECONDS - time.monotonic()))
            live = self._wanted
            try:
                matched = await asyncio.to_thread(self._write, live)
            except Exception as error:  # the row is a projection: the job goes on, the next heartbeat tries again
                activity.logger.warning("job %s: live progress not written: %s", self._job_id, error)
                return
            if not matched:
                return  # no live row of this attempt (not recorded yet, or the job moved on): nothing to keep
            self._written = live
            self._last_write = time.monotonic()

    def _write(self, live: LiveProgress) -> bool:
        with session_scope(self._engine) as session:
            return write_live_progress(session, self._job_id, self._attempt, live)
