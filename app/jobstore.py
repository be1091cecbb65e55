"""Reads and writes of the jobs projection and the job event log (used by activities and the API)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from app.db import as_utc
from app.models import JobError, JobEventInput, JobStatus, JobTiming, JobView, OutputFile, RecordJobInput
from app.tables import JobEventRow, JobRow


def record_job(session: Session, record: RecordJobInput) -> None:
    job = record.job
    row = session.get(JobRow, job.job_id) or JobRow(job_id=job.job_id, backend=record.backend, status=job.status.value)
    row.status = job.status.value
    row.template_id = job.workflow_id
    row.template_version = job.template_version
    row.seed = job.seed
    row.backend = record.backend
    row.prompt_id = record.prompt_id
    row.attempts = job.attempts
    row.progress = job.progress
    row.inputs = record.inputs
    row.job_metadata = job.metadata
    row.outputs = [output.model_dump(by_alias=True) for output in job.outputs]
    row.error = job.error.model_dump(by_alias=True, mode="json") if job.error else None
    row.created_at = job.timing.created_at
    row.started_at = job.timing.started_at
    row.completed_at = job.timing.completed_at
    row.execution_time_ms = job.timing.execution_time_ms
    row.updated_at = datetime.now(timezone.utc)
    session.add(row)
    _insert_events(session, job.job_id, record.events)
    session.commit()


def close_abandoned_job(session: Session, job: JobView, event: JobEventInput) -> None:
    """Finish the row of a job whose workflow ended in Temporal without finishing it (terminated by an
    operator): the workflow can no longer write, so the one who notices does. A finished row stays as it is."""
    row = session.get(JobRow, job.job_id)
    if row is None or JobStatus(row.status).is_terminal:
        return
    row.status = job.status.value
    row.error = job.error.model_dump(by_alias=True, mode="json") if job.error else None
    row.completed_at = job.timing.completed_at
    row.updated_at = datetime.now(timezone.utc)
    session.add(row)
    _insert_events(session, job.job_id, [event])
    session.commit()


def add_events(session: Session, job_id: str, events: list[JobEventInput]) -> None:
    _insert_events(session, job_id, events)
    session.commit()


def _insert_events(session: Session, job_id: str, events: list[JobEventInput]) -> None:
    if not events:
        return
    rows = [
        {"job_id": job_id, "event_key": e.key, "at": e.at, "kind": e.kind, "message": e.message, "data": e.data}
        for e in events
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(JobEventRow).values(rows).on_conflict_do_nothing(index_elements=["job_id", "event_key"])
    session.execute(statement)


def get_job_view(session: Session, job_id: str) -> JobView | None:
    row = get_job(session, job_id)
    return job_view(row) if row is not None else None


def job_view(row: JobRow) -> JobView:
    return JobView(
        job_id=row.job_id,
        status=JobStatus(row.status),
        workflow_id=row.template_id,
        template_version=row.template_version,
        seed=row.seed,
        progress=row.progress,
        attempts=row.attempts,
        outputs=[OutputFile.model_validate(output) for output in row.outputs],
        error=JobError.model_validate(row.error) if row.error else None,
        timing=JobTiming(
            created_at=as_utc(row.created_at),
            started_at=as_utc(row.started_at),
            completed_at=as_utc(row.completed_at),
            execution_time_ms=row.execution_time_ms,
        ),
        metadata=row.job_metadata,
    )


def get_job(session: Session, job_id: str) -> JobRow | None:
    return session.get(JobRow, job_id)


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    template_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 50
    offset: int = 0


def list_jobs(session: Session, job_filter: JobFilter) -> tuple[list[JobView], int]:
    conditions = []
    if job_filter.status:
        conditions.append(col(JobRow.status) == job_filter.status.value)
    if job_filter.template_id:
        conditions.append(col(JobRow.template_id) == job_filter.template_id)
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
    return [job_view(row) for row in rows], count


def list_events(session: Session, job_id: str) -> list[JobEventRow]:
    return list(
        session.exec(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(col(JobEventRow.at), col(JobEventRow.id))
        ).all()
    )


def estimate_wait_seconds(session: Session, template_id: str | None, slots: int) -> float | None:
    """Rough ETA for a new job: mean run time of recent successes times the jobs ahead per slot."""
    recent = select(JobRow.execution_time_ms).where(
        JobRow.status == JobStatus.succeeded.value, col(JobRow.execution_time_ms).is_not(None)
    )
    if template_id:
        recent = recent.where(JobRow.template_id == template_id)
    durations = session.exec(recent.order_by(col(JobRow.completed_at).desc()).limit(20)).all()
    if not durations:
        return None
    mean_seconds = sum(durations) / len(durations) / 1000
    active = session.exec(
        select(func.count())
        .select_from(JobRow)
        .where(col(JobRow.status).in_([JobStatus.queued.value, JobStatus.running.value]))
    ).one()
    return round(mean_seconds * (1 + active / slots), 3)
