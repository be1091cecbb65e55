"""The live columns of a job's row (progress, current node, queue position, warning), kept current by the
activity that runs its prompt, so that lists of jobs agree with a job read on its own. Never the job's
status, which is its workflow's alone.

Written in the background with the latest values: a database that makes a write wait (SQLite's busy timeout is
30 s) must not hold up the heartbeats that keep the activity alive. Offered as ComfyUI reports each change (not
only with the heartbeat, once a second), since the event streams read progress from here (api.job_streams).
One writer for every prompt the worker follows (LiveRows), writing all the rows that changed in one
transaction at most every LIVE_ROW_WRITE_SECONDS: at a thousand prompts a transaction each was the worker's
largest use of the database, in turns for SQLite's one write lock with the records of new jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.engine import Engine

from app.db import session_scope
from app.jobstore import write_live_progresses
from app.models import LiveProgress

LIVE_ROW_WRITE_SECONDS = 0.1

log = logging.getLogger(__name__)

RowKey = tuple[str, int]  # (job id, attempt)


class LiveRows:
    """The writer of the live rows of the prompts one worker process follows."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._wanted: dict[RowKey, LiveProgress] = {}
        self._rows: dict[RowKey, LiveRow] = {}
        self._writer: asyncio.Task[None] | None = None
        self._last_write = float("-inf")  # monotonic

    def row(self, job_id: str, attempt: int) -> LiveRow:
        return LiveRow(self, (job_id, attempt))

    def _offer(self, row: LiveRow, live: LiveProgress) -> None:
        if live == row.written:  # back to what the row holds: a change still waiting is not written
            self._wanted.pop(row.key, None)
            return
        self._wanted[row.key] = live.model_copy(deep=True)
        self._rows[row.key] = row
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_wanted())

    def _forget(self, row: LiveRow) -> None:
        if self._rows.get(row.key) is row:
            del self._rows[row.key]
            self._wanted.pop(row.key, None)

    async def _write_wanted(self) -> None:
        while self._wanted:
            # Between any two writes, also when an offer comes after the last write ended.
            await asyncio.sleep(max(0.0, self._last_write + LIVE_ROW_WRITE_SECONDS - time.monotonic()))
            lives, self._wanted = self._wanted, {}
            try:
                written = await asyncio.to_thread(self._write, lives)
            except Exception as error:  # the rows are a projection: the jobs go on, the next offers try again
                log.warning("live progress of %d jobs not written: %s", len(lives), error)
                written = set()
            self._last_write = time.monotonic()
            for key in written:
                row = self._rows.get(key)
                if row is not None:
                    row.written = lives[key]
            # A row not written (not recorded yet, or the job moved on) is tried again on its next offer.

    def _write(self, lives: dict[RowKey, LiveProgress]) -> set[RowKey]:
        with session_scope(self._engine) as session:
            return write_live_progresses(session, lives)


class LiveRow:
    """One attempt's live row, written through its worker's LiveRows."""

    def __init__(self, rows: LiveRows, key: RowKey) -> None:
        self._rows = rows
        self.key = key
        # What the row holds when an attempt starts (a new attempt's row is reset to it): nothing to write yet.
        self.written: LiveProgress | None = LiveProgress()

    def offer(self, live: LiveProgress) -> None:
        """Have `live` written, unless it is what the row already holds; returns at once."""
        self._rows._offer(self, live)

    def close(self) -> None:
        """The attempt is over: a write not yet made is not made."""
        self._rows._forget(self)
