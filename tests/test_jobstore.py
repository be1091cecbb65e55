"""The jobs projection and event log, against SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Engine
from sqlmodel import Session

from app.errors import ErrorCode
from app.jobstore import (
    JobFilter,
    RecordedChange,
    close_ended_job,
    get_job_snapshot,
    list_events,
    list_jobs,
    record_job,
    write_live_progress,
)
from app.models import JobError, JobEventInput, JobState, JobStatus, JobWarning, LiveProgress, OutputRef, RecordJobInput
from app.tables import JobRow


def state(job_id: str, status: JobStatus, created: datetime, **changes: object) -> JobState:
    return JobState(job_id=job_id, status=status, template_id="solid_color", template_version=1, created_at=created,
                    backend="comfyui-1", **changes)


def record(job: JobState, *events: JobEventInput) -> RecordJobInput:
    return RecordJobInput(job=job, backend="comfyui-1", prompt_id="p1", inputs={"width": 8}, events=list(events))


def event(key: str, message: str) -> JobEventInput:
    return JobEventInput(key=key, at=datetime.now(timezone.utc), kind="status", message=message)


def test_record_is_an_idempotent_upsert_of_the_latest_state(engine: Engine) -> None:
    job_id, created = str(uuid.uuid4()), datetime(2026, 1, 1, tzinfo=timezone.utc)
    output = OutputRef(filename="a.png", storage_key=f"{job_id}/0/a.png", size=3, sha256="ab", content_type="image/png",
                       node_id="2")
    with Session(engine) as session:
        record_job(session, record(state(job_id, JobStatus.queued, created), event("wf:1", "queued")))
        finished = state(job_id, JobStatus.failed, created, attempts=2, outputs=[output], seed=2**48 - 1,
                         error=JobError(code=ErrorCode.COMFYUI_OOM, message="oom", details={"nodeId": "2"}))
        # The same record twice (a retried activity) leaves one row and one copy of each event.
        record_job(session, record(finished, event("wf:2", "failed")))
        record_job(session, record(finished, event("wf:2", "failed")))
        stored = get_job_snapshot(session, job_id)
        assert stored is not None and stored.state == finished
        assert [e.message for e in list_events(session, job_id)] == ["queued", "failed"]


def test_each_milestone_of_a_job_is_reported_by_the_first_write_that_records_it(engine: Engine) -> None:
    """What the metrics count once per job (app.metrics): a retried record reports none of them again."""
    job_id, created = str(uuid.uuid4()), datetime(2026, 1, 1, tzinfo=timezone.utc)
    started = created + timedelta(seconds=3)
    queued = state(job_id, JobStatus.queued, created)
    running = state(job_id, JobStatus.running, created, started_at=started)
    ended = state(job_id, JobStatus.succeeded, created, started_at=started, completed_at=started + timedelta(seconds=1))
    with Session(engine) as session:
        changes = [record_job(session, record(job)) for job in (queued, queued, running, running, ended, ended)]
    assert changes == [
        RecordedChange(created=True, started=False, ended=False), RecordedChange(False, False, False),
        RecordedChange(False, True, False), RecordedChange(False, False, False),
        RecordedChange(False, False, True), RecordedChange(False, False, False),
    ]


def test_outputs_recorded_by_older_releases_read_as_storage_keys(engine: Engine) -> None:
    job_id, created = str(uuid.uuid4()), datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Session(engine) as session:
        record_job(session, record(state(job_id, JobStatus.succeeded, created)))
        row = session.get(JobRow, job_id)
        row.outputs = [{"filename": "a.png", "storagePath": f"{job_id}/0/a.png", "url": f"/outputs/{job_id}/a.png",
                        "size": 3, "sha256": "ab", "contentType": "image/png", "nodeId": "2", "animated": False}]
        session.add(row)
        session.commit()
        [output] = get_job_snapshot(session, job_id).state.outputs
        assert output.storage_key == f"{job_id}/0/a.png"


def test_live_progress_is_written_only_while_the_job_is_live_on_its_attempt(engine: Engine) -> None:
    job_id, created = str(uuid.uuid4()), datetime(2026, 1, 1, tzinfo=timezone.utc)
    warning = JobWarning(code=ErrorCode.COMFYUI_UNREACHABLE, message="down", since=created)
    with Session(engine) as session:
        record_job(session, record(state(job_id, JobStatus.running, created, attempts=1)))
        assert write_live_progress(session, job_id, 1, LiveProgress(percent=40, node="3", queue_position=0,
                                                                   warning=warning))
        live = get_job_snapshot(session, job_id).live
        assert (live.percent, live.node, live.queue_position, live.warning) == (40, "3", 0, warning)

        # A resubmission starts over; a late write of the superseded attempt changes nothing.
        record_job(session, record(state(job_id, JobStatus.queued, created, attempts=2)))
        assert get_job_snapshot(session, job_id).live == LiveProgress()
        assert not write_live_progress(session, job_id, 1, LiveProgress(percent=90))
        assert write_live_progress(session, job_id, 2, LiveProgress(percent=10))

        # The end clears what only a live job has; nothing writes over it afterwards.
        record_job(session, record(state(job_id, JobStatus.failed, created, attempts=2)))
        assert not write_live_progress(session, job_id, 2, LiveProgress(percent=50, node="4"))
        ended = get_job_snapshot(session, job_id)
        assert ended.state.status is JobStatus.failed and ended.live == LiveProgress(percent=10)


def test_a_job_ended_in_temporal_is_closed_once_and_an_ended_row_stays(engine: Engine) -> None:
    live_id, done_id = str(uuid.uuid4()), str(uuid.uuid4())
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    error = JobError(code=ErrorCode.JOB_TERMINATED, message="terminated in Temporal: stuck")
    with Session(engine) as session:
        record_job(session, record(state(live_id, JobStatus.running, created, attempts=1)))
        record_job(session, record(state(done_id, JobStatus.succeeded, created, attempts=1)))
        assert close_ended_job(session, live_id, error, created, event("temporal:ended", "cancelled"))
        assert not close_ended_job(session, live_id, error, created, event("temporal:ended", "cancelled"))
        assert not close_ended_job(session, done_id, error, created, event("temporal:ended", "cancelled"))
        closed = get_job_snapshot(session, live_id).state
        assert closed.status is JobStatus.cancelled and closed.error == error and closed.completed_at == created
        assert get_job_snapshot(session, done_id).state.status is JobStatus.succeeded
        assert [e.message for e in list_events(session, live_id)] == ["cancelled"]
        assert list_events(session, done_id) == []


def test_list_filters_by_status_template_and_time(engine: Engine) -> None:
    base = datetime(2026, 3, 1, tzinfo=timezone.utc)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    with Session(engine) as session:
        for index, job_id in enumerate(ids):
            status = JobStatus.succeeded if index % 2 else JobStatus.queued
            record_job(session, record(state(job_id, status, base + timedelta(minutes=index))))
        jobs, count = list_jobs(session, JobFilter(status=JobStatus.succeeded))
        assert count == 2 and {j.state.job_id for j in jobs} == {ids[1], ids[3]}
        jobs, count = list_jobs(session, JobFilter(created_after=base + timedelta(minutes=1), limit=1))
        assert count == 2 and [j.state.job_id for j in jobs] == [ids[3]]
        jobs, count = list_jobs(session, JobFilter(created_before=base + timedelta(minutes=1)))
        assert [j.state.job_id for j in jobs] == [ids[0]]
        assert list_jobs(session, JobFilter(template_id="other"))[1] == 0
