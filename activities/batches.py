"""The activity that keeps the batches table (a projection of each BatchWorkflow) current."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from temporalio import activity

from app.batch_store import record_batch
from app.batches import RecordBatchInput
from app.db import session_scope


class BatchActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="record_batch")
    def record_batch(self, record: RecordBatchInput) -> None:
        # An upsert of the full state: running it twice leaves the same row.
        with session_scope(self._engine) as session:
            record_batch(session, record)
