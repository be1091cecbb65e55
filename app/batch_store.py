"""Reads and writes of the batches table, and a batch's items as the jobs table has them.

A batch's row is its BatchWorkflow's projection: written as it starts, as it continues as new and as it ends
(`record_batch`). Its live counts are its items' own rows (each written by its job's workflow): a batch is never
read from anything but what its workflows wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import case, func, update
from sqlmodel import Session, col, select

from app.batches import BatchState, BatchStatus, BatchTally, RecordBatchInput
from app.db import as_utc
from app.models import LIVE_STATUSES, JobStatus
from app.tables import BatchRow, JobRow


def record_batch(session: Session, record: RecordBatchInput) -> None:
    """An upsert of the batch's full state: running it twice leaves the same row."""
    batch = record.batch
    row = session.get(BatchRow, batch.batch_id)
    if row is None:
        row = BatchRow(batch_id=batch.batch_id, status=batch.status.value, priority=batch.priority, total=batch.total)
    elif BatchStatus(row.status).is_terminal:
        return  # a late write of a run before cannot take back an ended batch
    row.status = batch.status.value
    row.template_id = batch.template_id
    row.owner = batch.owner
    row.priority = batch.priority
    row.batch_metadata = batch.metadata
    row.total = batch.total
    row.started = batch.started
    row.tally = batch.tally.model_dump()
    row.cancel_reason = batch.cancel_reason
    row.created_at = batch.created_at
    row.started_at = batch.started_at
    row.completed_at = batch.completed_at
    row.updated_at = datetime.now(timezone.utc)
    session.add(row)
    session.commit()


def close_ended_batch(session: Session, batch: BatchState) -> bool:
    """End the row of a batch whose workflow Temporal terminated or timed out (`batch`: its final state, as the
    worker's reconciler made it): that workflow can no longer write its own end. A row that has ended stays as it
    is; returns whether this closed it."""
    live = [BatchStatus.queued.value, BatchStatus.running.value]
    result = session.execute(
        update(BatchRow)
        .where(col(BatchRow.batch_id) == batch.batch_id, col(BatchRow.status).in_(live))
        .values(
            status=batch.status.value, started=batch.started, tally=batch.tally.model_dump(),
            cancel_reason=batch.cancel_reason, completed_at=batch.completed_at, updated_at=datetime.now(timezone.utc),
        )
    )
    session.commit()
    return result.rowcount > 0


def batch_state(row: BatchRow) -> BatchState:
    return BatchState(
        batch_id=row.batch_id, status=BatchStatus(row.status), template_id=row.template_id, owner=row.owner,
        priority=row.priority, metadata=row.batch_metadata, total=row.total, started=row.started,
        tally=BatchTally.model_validate(row.tally), created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at), completed_at=as_utc(row.completed_at), cancel_reason=row.cancel_reason,
    )


def get_batch(session: Session, batch_id: str) -> BatchRow | None:
    return session.get(BatchRow, batch_id)


@dataclass(frozen=True)
class ItemRows:
    """A batch's item jobs as their rows say: how many are in each status, and their progress summed (an
    ended item counts 100)."""

    by_status: dict[JobStatus, int]
    progress_sum: int


def item_rows(session: Session, batch_id: str) -> ItemRows:
    done = col(JobRow.status).in_([status.value for status in JobStatus if status.is_terminal])
    rows = session.exec(
        select(JobRow.status, func.count(), func.sum(case((done, 100), else_=JobRow.progress)))
        .where(col(JobRow.batch_id) == batch_id)
        .group_by(JobRow.status)
    ).all()
    return ItemRows({JobStatus(status): count for status, count, _ in rows}, sum(int(total or 0) for *_, total in rows))


def ended_items_tally(session: Session, batch_id: str, total: int) -> tuple[int, BatchTally] | None:
    """How the items of a batch whose workflow ended without its own tally ended, from their rows: (items started,
    their tally). None while an item is still live (its job's workflow has yet to write its end). An item without a
    row never started: it counts as cancelled, as the workflow counts the items a cancel kept from starting."""
    by_status = item_rows(session, batch_id).by_status
    if any(by_status.get(status, 0) for status in LIVE_STATUSES):
        return None
    started = sum(by_status.values())
    succeeded, failed = by_status.get(JobStatus.succeeded, 0), by_status.get(JobStatus.failed, 0)
    return started, BatchTally(succeeded=succeeded, failed=failed, cancelled=max(0, total - succeeded - failed))
