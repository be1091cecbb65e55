"""Reads and writes of the jobs projection and the job event log.

The jobs table is each job's workflow's projection. The workflow writes a job's state (status, attempts,
outputs, error, timing) at every status change, through `record_job`. The prompt activity keeps the live
columns (progress, current node, queue position, warning) current, throttled, and only while the job is
live on the attempt it runs. The webhook delivery activity keeps the `webhook` column (how the job's webhook
has fared) and nothing else. The one other writer is the worker's reconciler, for a workflow terminated in
Temporal, which can no longer write its own end.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from app.db import as_utc
from app.feed_log import append_feed, live_data
from app.models import LIVE_STATUSES, JobError, JobEventInput, JobState, JobStatus, JobWarning, LiveProgress, OutputRef
from app.models import RecordJobInput, WebhookStatus
from app.tables import BatchRow, JobEventRow, JobRow


@dataclass(frozen=True)
class JobSnapshot:
    """A job as a reader sees it: the workflow's state and, for a live job, its progress."""

    state: JobState
    live: LiveProgress
    webhook: WebhookStatus | None = None


@dataclass(frozen=True)
class RecordedChange:
    """What one write of a job's row changed, so that each of a job's milestones is counted once however often a
    retried record writes it: the first write creates the row, one write first sets its start, one first ends it."""

    created: bool
    started: bool
    ended: bool


def record_job(session: Session, record: RecordJobInput) -> RecordedChange:
    """An upsert of the job's full state plus keyed events: running it twice leaves the same rows. Says which of
    the job's milestones this write was the first to record (a repeat records none)."""
    job = record.job
    row = session.get(JobRow, job.job_id)
    change = RecordedChange(
        created=row is None,
        started=(row is None or row.started_at is None) and job.started_at is not None,
        ended=(row is None or not JobStatus(row.status).is_terminal) and job.status.is_terminal,
    )
    # What the feed of all jobs is told (app.feed_log): a new status, attempt or outputs, not a repeated record.
    told = (row.status, row.attempts, len(row.outputs)) if row is not None else None
    if row is None:
        row = JobRow(job_id=job.job_id, backend=record.backend, status=job.status.value)
    elif job.status is JobStatus.queued and job.attempts > row.attempts:
        # A new attempt starts from nothing; the old attempt's progress must not linger.
        row.progress, row.current_node, row.queue_position, row.warning = 0, None, None, None
    if job.status.is_terminal:
        row.current_node, row.queue_position, row.warning = None, None, None
        row.progress = 100 if job.status is JobStatus.succeeded else row.progress
    row.status = job.status.value
    row.template_id = job.template_id
    row.template_version = job.template_version
    row.owner = job.owner
    row.priority = job.priority
    row.backend_tag = job.backend_tag
    row.seed = job.seed
    row.backend = record.backend
    row.prompt_id = record.prompt_id
    row.attempts = job.attempts
    row.inputs = record.inputs
    row.job_metadata = job.metadata
    row.outputs = [output.model_dump(by_alias=True) for output in job.outputs]
    row.error = _error_json(job.error)
    row.created_at = job.created_at
    row.started_at = job.started_at
    row.completed_at = job.completed_at
    row.execution_time_ms = job.execution_time_ms
    row.cache_key = record.cache_key
    row.cache_hit = job.cache_hit
    row.cached_from = job.cached_from
    row.request_fingerprint = record.request_fingerprint
    row.batch_id = job.batch_id
    row.updated_at = datetime.now(timezone.utc)
    session.add(row)
    _insert_events(session, job.job_id, record.events)
    if told != (row.status, row.attempts, len(row.outputs)):
        session.flush()
        # The live columns as they are now, not as first read: a live write may have committed in between (the
        # feed told 36% then this record's stale 35%). After the flush this transaction holds the row's write
        # lock (SQLite's database lock), so no other write comes between this read and the commit.
        session.refresh(row)
        append_feed(session, row, _feed_events(row, told))
    session.commit()
    return change


def _feed_events(row: JobRow, told: tuple[str, int, int] | None) -> list[tuple[str, str, dict]]:
    """As a job's own stream tells it (api.job_streams): each stored file its own `output` event, under the
    status the job had before (its end is told after them), then the status's event."""
    data = live_data(row)
    events: list[tuple[str, str, dict]] = []
    if JobStatus(row.status).is_terminal:
        had = told[2] if told is not None and told[1] == row.attempts else 0
        before = told[0] if told is not None else JobStatus.queued.value
        for stored in range(had, len(row.outputs)):
            events.append(("output", before, {**data, "outputs": row.outputs[:stored + 1]}))
        data = {**data, "outputs": row.outputs, "error": row.error}
    events.append((row.status, row.status, data))
    return events


def write_live_progress(session: Session, job_id: str, attempt: int, live: LiveProgress) -> bool:
    """The live columns of a job that is still live on this attempt (or an earlier record of it); a late
    write from an attempt that was superseded, or after the job ended, changes nothing."""
    result = session.execute(
        update(JobRow)
        .where(
            col(JobRow.job_id) == job_id,
            col(JobRow.status).in_([status.value for status in LIVE_STATUSES]),
            col(JobRow.attempts) <= attempt,
        )
        .values(
            progress=live.percent,
            current_node=live.node,
            queue_position=live.queue_position,
            warning=live.warning.model_dump(by_alias=True, mode="json") if live.warning else None,
            updated_at=datetime.now(timezone.utc),
        )
    )
    if result.rowcount:
        row = session.get(JobRow, job_id)
        assert row is not None
        append_feed(session, row, [(row.status, row.status, live_data(row))])
    session.commit()
    return result.rowcount > 0


def record_webhook_attempt(session: Session, job_id: str, status: WebhookStatus, event: JobEventInput) -> None:
    """One delivery attempt of the job's webhook: its row's `webhook` and the attempt in its log (keyed per
    attempt, so a write that is repeated is stored once). Never the job's status."""
    session.execute(
        update(JobRow).where(col(JobRow.job_id) == job_id).values(webhook=status.model_dump(by_alias=True))
    )
    # A batch's webhook (batch.completed) is kept on its batch's row; its attempts go to a log under its id.
    session.execute(
        update(BatchRow).where(col(BatchRow.batch_id) == job_id).values(webhook=status.model_dump(by_alias=True))
    )
    _insert_events(session, job_id, [event])
    session.commit()


def close_ended_job(session: Session, job_id: str, error: JobError, completed_at: datetime, event: JobEventInput) -> bool:
    """End the row of a job whose workflow Temporal terminated or timed out, as `cancelled`: that workflow
    can no longer write its own end. A row that has ended stays as it is."""
    result = session.execute(
        update(JobRow)
        .where(col(JobRow.job_id) == job_id, col(JobRow.status).in_([status.value for status in LIVE_STATUSES]))
        .values(
            status=JobStatus.cancelled.value, error=_error_json(error), completed_at=completed_at,
            current_node=None, queue_position=None, warning=None, updated_at=datetime.now(timezone.utc),
        )
    )
    if result.rowcount:
        _insert_events(session, job_id, [event])
        row = session.get(JobRow, job_id)
        assert row is not None
        append_feed(session, row, [(row.status, row.status,
                                    {**live_data(row), "outputs": row.outputs, "error": row.error})])
    session.commit()
    return result.rowcount > 0


def add_events(session: Session, job_id: str, events: list[JobEventInput]) -> int:
    """The events stored, once each by key; how many of them were new."""
    added = _insert_events(session, job_id, events)
    session.commit()
    return added


def _error_json(error: JobError | None) -> dict | None:
    return error.model_dump(by_alias=True, mode="json") if error else None


def _insert_events(session: Session, job_id: str, events: list[JobEventInput]) -> int:
    """The events not stored before (their keys are new), as many as were stored now."""
    if not events:
        return 0
    rows = [
        {"job_id": job_id, "event_key": e.key, "at": e.at, "kind": e.kind, "message": e.message, "data": e.data}
        for e in events
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(JobEventRow).values(rows).on_conflict_do_nothing(index_elements=["job_id", "event_key"])
    return session.execute(statement).rowcount


def job_snapshot(row: JobRow) -> JobSnapshot:
    state = JobState(
        job_id=row.job_id,
        status=JobStatus(row.status),
        template_id=row.template_id,
        template_version=row.template_version,
        seed=row.seed,
        attempts=row.attempts,
        outputs=[OutputRef.model_validate(output) for output in row.outputs],
        error=JobError.model_validate(row.error) if row.error else None,
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at),
        completed_at=as_utc(row.completed_at),
        execution_time_ms=row.execution_time_ms,
        metadata=row.job_metadata,
        cache_hit=row.cache_hit,
        cached_from=row.cached_from,
        owner=row.owner,
        backend=row.backend or None,
        priority=row.priority,
        backend_tag=row.backend_tag,
        batch_id=row.batch_id,
    )
    live = LiveProgress(
        percent=row.progress, node=row.current_node, queue_position=row.queue_position,
        warning=JobWarning.model_validate(row.warning) if row.warning else None,
    )
    webhook = WebhookStatus.model_validate(row.webhook) if row.webhook else None
    return JobSnapshot(state, live, webhook)


def get_job(session: Session, job_id: str) -> JobRow | None:
    return session.get(JobRow, job_id)


def get_job_snapshot(session: Session, job_id: str) -> JobSnapshot | None:
    row = get_job(session, job_id)
    return job_snapshot(row) if row is not None else None


def request_fingerprint_of(session: Session, job_id: str) -> tuple[JobSnapshot, str | None] | None:
    """The job with this id and the fingerprint of the request that made it, if it has a row."""
    row = get_job(session, job_id)
    return (job_snapshot(row), row.request_fingerprint) if row is not None else None


def cached_results(
    session: Session, cache_key: str, owner: str, completed_after: datetime, limit: int = 3
) -> list[JobSnapshot]:
    """The latest succeeded jobs of `owner` with this cache key that ran (not hits themselves) and completed after
    `completed_after`, newest first: a hit reuses a result for the TTL after it was made, not after its last hit.
    Only the owner's own: a hit names its source (its log, its outputs' storage keys), and another's job must
    stay unprobeable (jobs from before owners were recorded are no one's)."""
    rows = session.exec(
        select(JobRow)
        .where(
            col(JobRow.cache_key) == cache_key,
            col(JobRow.owner) == owner,
            col(JobRow.status) == JobStatus.succeeded.value,
            col(JobRow.cached_from).is_(None),
            col(JobRow.completed_at) > completed_after,
        )
        .order_by(col(JobRow.completed_at).desc())
        .limit(limit)
    ).all()
    return [job_snapshot(row) for row in rows]


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    template_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    owner: str | None = None
    batch_id: str | None = None
    limit: int = 50
    offset: int = 0


def list_jobs(session: Session, job_filter: JobFilter) -> tuple[list[JobSnapshot], int]:
    conditions = []
    if job_filter.status:
        conditions.append(col(JobRow.status) == job_filter.status.value)
    if job_filter.template_id:
        conditions.append(col(JobRow.template_id) == job_filter.template_id)
    if job_filter.owner:
        conditions.append(col(JobRow.owner) == job_filter.owner)
    if job_filter.batch_id:
        conditions.append(col(JobRow.batch_id) == job_filter.batch_id)
    if job_filter.created_after:
        conditions.append(col(JobRow.created_at) > job_filter.created_after)
    if job_filter.created_before:
        conditions.append(col(JobRow.created_at) < job_filter.created_before)
    count = session.exec(select(func.count()).select_from(JobRow).where(*conditions)).one()
    rows = session.exec(
        select(JobRow)
        .where(*conditions)
        .order_by(col(JobRow.created_at).desc(), col(JobRow.job_id))
        .offset(job_filter.offset)
        .limit(job_filter.limit)
    ).all()
    return [job_snapshot(row) for row in rows], count


def count_unfinished_jobs(session: Session, owner: str) -> int:
    """How many of `owner`'s jobs are queued or running (jobs from before owners were recorded count for no one)."""
    live = [status.value for status in LIVE_STATUSES]
    query = select(func.count()).select_from(JobRow).where(col(JobRow.owner) == owner, col(JobRow.status).in_(live))
    return session.exec(query).one()


def list_events(session: Session, job_id: str) -> list[JobEventRow]:
    return list(
        session.exec(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(col(JobEventRow.at), col(JobEventRow.id))
        ).all()
    )
