"""The feed log (job_feed) as the job's writes fill it and the API's feed reader reads it, on SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from app.db import session_scope
from app.feed_log import FeedFilter, feed_after, latest_feed_id, missed_page, prune_feed, replay_start
from app.jobstore import close_ended_job, record_job, write_live_progress
from app.errors import ErrorCode
from app.models import JobError, JobEventInput, JobStatus, LiveProgress, OutputRef
from app.tables import JobFeedRow
from tests.test_jobstore import record, state

CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def output(job_id: str, name: str) -> OutputRef:
    return OutputRef(filename=name, storage_key=f"{job_id}/0/{name}", size=3, sha256="ab", content_type="image/png",
                     node_id="2")


def test_each_change_of_a_job_s_row_is_one_feed_event_in_order_and_a_repeat_is_none(engine: Engine) -> None:
    job_id = str(uuid.uuid4())
    files = [output(job_id, "a.png"), output(job_id, "b.png")]
    with Session(engine) as session:
        start = latest_feed_id(session)
        queued = state(job_id, JobStatus.queued, CREATED, owner="alice", batch_id="b1")
        running = state(job_id, JobStatus.running, CREATED, owner="alice", batch_id="b1", attempts=1)
        ended = state(job_id, JobStatus.succeeded, CREATED, owner="alice", batch_id="b1", attempts=1, outputs=files)
        record_job(session, record(queued))
        record_job(session, record(queued))  # a retried record: nothing new to tell
        record_job(session, record(running))
        assert write_live_progress(session, job_id, 1, LiveProgress(percent=40, node="3", queue_position=0))
        record_job(session, record(ended))
        record_job(session, record(ended))
        events = feed_after(session, start, 100)
    assert [(e.event, e.status) for e in events] == [
        ("queued", "queued"), ("running", "running"), ("running", "running"),
        ("output", "running"), ("output", "running"), ("succeeded", "succeeded")]
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    assert {(e.job_id, e.owner, e.batch_id, e.template_id) for e in events} == {(job_id, "alice", "b1", "solid_color")}
    assert events[2].data == {"progress": 40, "currentNode": "3", "queuePosition": 0, "attempts": 1}
    assert [len(e.data["outputs"]) for e in events[3:]] == [1, 2, 2]
    assert events[-1].data["progress"] == 100 and events[-1].data["error"] is None
    # The job's inputs are recorded with its row; the feed never carries them.
    assert all("inputs" not in e.data and "width" not in str(e.data) for e in events)


def test_a_job_closed_for_its_terminated_workflow_is_told_once(engine: Engine) -> None:
    job_id = str(uuid.uuid4())
    error = JobError(code=ErrorCode.JOB_CANCELLED, message="terminated")
    ending = JobEventInput(key="reconciled", at=CREATED, kind="status", message="terminated")
    with Session(engine) as session:
        record_job(session, record(state(job_id, JobStatus.running, CREATED, owner="bob")))
        start = latest_feed_id(session)
        assert close_ended_job(session, job_id, error, CREATED, ending)
        assert not close_ended_job(session, job_id, error, CREATED, ending)
        [closed] = feed_after(session, start, 100)
    assert (closed.event, closed.status, closed.data["error"]["code"]) == ("cancelled", "cancelled", "JOB_CANCELLED")


def test_a_listener_is_told_what_it_missed_of_its_own_filtered_within_the_window(engine: Engine) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    with Session(engine) as session:
        since = latest_feed_id(session)
        for job_id, owner in ((alice, "alice"), (bob, "bob")):
            record_job(session, record(state(job_id, JobStatus.queued, CREATED, owner=owner)))
            record_job(session, record(state(job_id, JobStatus.running, CREATED, owner=owner)))
            record_job(session, record(state(job_id, JobStatus.failed, CREATED, owner=owner)))

        def missed(feed_filter: FeedFilter, most: int = 100) -> list[tuple[str, str]]:
            """The replay as the feed reads it: where it starts, then pages (of 2 here) until one is short."""
            told, after = [], replay_start(session, since, feed_filter, 300, most)
            while page := missed_page(session, after, feed_filter, 300, 2):
                told += [(e.job_id, e.event) for e in page]
                after = page[-1].id
            return told

        assert missed(FeedFilter(owner="alice")) == [(alice, "queued"), (alice, "running"), (alice, "failed")]
        assert missed(FeedFilter()) == missed(FeedFilter(owner="alice")) + missed(FeedFilter(owner="bob"))
        assert missed(FeedFilter(statuses=frozenset({"failed"}))) == [(alice, "failed"), (bob, "failed")]
        assert missed(FeedFilter(job_ids=frozenset({bob}), statuses=frozenset({"queued", "failed"}))) == [
            (bob, "queued"), (bob, "failed")]
        assert missed(FeedFilter(template_id="another")) == []
        # More missed than it may be told: the newest, oldest first.
        assert missed(FeedFilter(), most=2) == [(bob, "running"), (bob, "failed")]

        # Past the window an event is neither told nor kept.
        hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
        session.execute(update(JobFeedRow).where(col(JobFeedRow.job_id) == alice).values(at=hour_ago))
        session.commit()
        assert missed(FeedFilter(owner="alice")) == []
        assert prune_feed(session, 300) >= 3
        assert [e.job_id for e in feed_after(session, since, 100)] == [bob] * 3


def test_the_feed_s_ids_become_visible_in_order_under_concurrent_writers(engine: Engine) -> None:
    """A reader that reads `WHERE id > last` must never find, later, an id below one it read: it would skip it.
    (PostgreSQL hands out ids before commit, so without the feed's write lock they could commit out of order.)"""
    writers, jobs_each = 4, 15
    with Session(engine) as session:
        start = latest_feed_id(session)
    done = threading.Event()
    skipped: list[int] = []

    def read() -> None:
        last, seen = start, set()
        while True:
            finished = done.is_set()
            with session_scope(engine) as session:
                rows = feed_after(session, start, 10_000)
            for row in rows:
                if row.id not in seen and row.id < last:
                    skipped.append(row.id)
                seen.add(row.id)
            last = max([last, *seen])
            if finished:
                return

    def write() -> None:
        with Session(engine) as session:
            for _ in range(jobs_each):
                job_id = str(uuid.uuid4())
                record_job(session, record(state(job_id, JobStatus.queued, CREATED)))
                record_job(session, record(state(job_id, JobStatus.running, CREATED)))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    with Session(engine) as session:
        assert len(feed_after(session, start, 10_000)) == writers * jobs_each * 2
    assert skipped == []
