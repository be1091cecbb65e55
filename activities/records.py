"""The activity that keeps the jobs table (a projection of each workflow) and the event log current."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from temporalio import activity

from app.db import session_scope
from app.jobstore import record_job
from app.models import RecordJobInput


class RecordActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="record_job")
    def record_job(self, record: RecordJobInput) -> None:
        # An upsert of the full snapshot plus keyed events: running it twice leaves the same rows.
        with session_scope(self._engine) as session:
            record_job(session, record)
