"""The activity that keeps the jobs table (a projection of each workflow) and the event log current."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from temporalio import activity

from app.db import session_scope
from app.jobstore import record_job
from app.metrics import count_job_record
from app.models import RecordJobInput


class RecordActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="record_job")
    def record_job(self, record: RecordJobInput) -> None:
        # An upsert of the full snapshot plus keyed events: running it twice leaves the same rows. The job's
        # milestones are counted by the write that first records them, after its commit: a retry counts none.
        with session_scope(self._engine) as session:
            change = record_job(session, record)
        count_job_record(record.job, change)
