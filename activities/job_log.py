"""The job's event log as an activity writes it: buffered, so that following a prompt does not wait on the
database for every ComfyUI event. Keys make a flush that is repeated (a retried activity) harmless."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.engine import Engine

from app.db import session_scope
from app.jobstore import add_events
from app.models import JobEventInput
from app.redaction import Redactor

_FLUSH_EVERY_SECONDS = 0.5


class JobLog:
    def __init__(self, engine: Engine, job_id: str, redactor: Redactor | None = None) -> None:
        self._engine = engine
        self._job_id = job_id
        self._redactor = redactor or Redactor([])
        self._pending: list[JobEventInput] = []
        self._flushed_at = time.monotonic()

    def add(self, key: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._pending.append(
            JobEventInput(key=key, at=datetime.now(timezone.utc), kind=kind, message=self._redactor.text(message),
                          data=self._redactor.value(data or {}))
        )

    async def flush(self, *, force: bool = False) -> None:
        if not self._pending or (not force and time.monotonic() - self._flushed_at < _FLUSH_EVERY_SECONDS):
            return
        events, self._pending = self._pending, []
        self._flushed_at = time.monotonic()

        def write() -> None:
            with session_scope(self._engine) as session:
                add_events(session, self._job_id, events)

        await asyncio.to_thread(write)
