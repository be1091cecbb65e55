"""The live columns of a job's row (progress, current node, queue position, warning), kept current by the
activity that runs its prompt, so that lists of jobs agree with a job read on its own. Written at most once
a heartbeat and only when something changed; never the job's status, which is its workflow's alone."""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio import activity

from app.db import session_scope
from app.jobstore import write_live_progress
from app.models import LiveProgress


class LiveRow:
    def __init__(self, engine: Engine, job_id: str, attempt: int) -> None:
        self._engine = engine
        self._job_id = job_id
        self._attempt = attempt
        self._written: LiveProgress | None = None

    async def write(self, live: LiveProgress) -> None:
        if live == self._written:
            return
        try:
            await asyncio.to_thread(self._write, live)
        except SQLAlchemyError as error:  # the row is a projection: the job goes on, the next beat tries again
            activity.logger.warning("job %s: live progress not written: %s", self._job_id, error)
            return
        self._written = live

    def _write(self, live: LiveProgress) -> None:
        with session_scope(self._engine) as session:
            write_live_progress(session, self._job_id, self._attempt, live)
