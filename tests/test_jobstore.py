"""The jobs projection and event log, against SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from app.jobstore import JobFilter, estimate_wait_seconds, get_job, job_view, list_events, list_jobs, record_job
from app.models import ErrorCode, JobError, JobEventInput, JobStatus, JobTiming, JobView, OutputFile, RecordJobInput

def view(job_id: str, status: JobStatus, created: datetime, **changes: object) -> JobView:
    fields: dict[str, object] = {"timing": JobTiming(created_at=created), **changes}
    return JobView(job_id=job_id, status=status, workflow_id="solid_color", template_version=1, **fields)


def record(job: JobView, *events: JobEventInput) -> RecordJobInput:
    return RecordJobInput(job=job, backend="comfyui-1", prompt_id="p1", inputs={"width": 8}, events=list(events))


def event(key: str, message: str) -> JobEventInput:
    return JobEventInput(key=key, at=datetime.now(timezone.utc), kind="status", message=message)


def test_record_is_an_idempotent_upsert_of_the_latest_snapshot(engine: Engine) -> None:
    job_id, created = str(uuid.uuid4()), datetime(2026, 1, 1, tzinfo=timezone.utc)
    output = OutputFile(filename="a.png", storage_path=f"{job_id}/0/a.png", url="/outputs/x/a.png", size=3,
                        sha256="ab", content_type="image/png", node_id="2")
    with Session(engine) as session:
        record_job(session, record(view(job_id, JobStatus.queued, created), event("wf:1", "queued")))
        finished = view(job_id, JobStatus.failed, created, attempts=2, outputs=[output],
                        error=JobError(code=ErrorCode.COMFYUI_OOM, message="oom", details={"nodeId": "2"}))
        # The same record twice (a retried activity) leaves one row and one copy of each event.
        record_job(session, record(finished, event("wf:2", "failed")))
        record_job(session, record(finished, event("wf:2", "failed")))
        row = get_job(session, job_id)
        assert row is not None
        stored = job_view(row)
        assert stored.status is JobStatus.failed and stored.attempts == 2
        assert stored.outputs == [output] and stored.error is not None and stored.error.code is ErrorCode.COMFYUI_OOM
        assert stored.timing.created_at == created
        assert [e.message for e in list_events(session, job_id)] == ["queued", "failed"]


def test_list_filters_by_status_template_and_time(engine: Engine) -> None:
    base = datetime(2026, 3, 1, tzinfo=timezone.utc)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    with Session(engine) as session:
        for index, job_id in enumerate(ids):
            status = JobStatus.succeeded if index % 2 else JobStatus.queued
            record_job(session, record(view(job_id, status, base + timedelta(minutes=index))))
        jobs, count = list_jobs(session, JobFilter(status=JobStatus.succeeded))
        assert count == 2 and {j.job_id for j in jobs} == {ids[1], ids[3]}
        jobs, count = list_jobs(session, JobFilter(created_after=base + timedelta(minutes=1), limit=1))
        assert count == 2 and [j.job_id for j in jobs] == [ids[3]]
        jobs, count = list_jobs(session, JobFilter(created_before=base + timedelta(minutes=1)))
        assert [j.job_id for j in jobs] == [ids[0]]
        assert list_jobs(session, JobFilter(template_id="other"))[1] == 0


def test_eta_uses_recent_run_times_and_jobs_ahead(engine: Engine) -> None:
    with Session(engine) as session:
        assert estimate_wait_seconds(session, "solid_color", slots=1) is None
        done = view(str(uuid.uuid4()), JobStatus.succeeded, datetime.now(timezone.utc),
                    timing=JobTiming(created_at=datetime.now(timezone.utc), completed_at=datetime.now(timezone.utc),
                                     execution_time_ms=2000))
        record_job(session, record(done))
        record_job(session, record(view(str(uuid.uuid4()), JobStatus.queued, datetime.now(timezone.utc))))
        assert estimate_wait_seconds(session, "solid_color", slots=1) == 4.0
