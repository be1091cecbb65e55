"""A live job's place in line and its ETA, from the jobs table: prompts in ComfyUI first, then the waiting jobs
Temporal hands out before it (priority, owners' turns, first come), timed by recent run times per template."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from app.comfy.backends import Backend
from app.jobstore import record_job, write_live_progress
from app.models import JobState, JobStatus, LiveProgress, RecordJobInput
from app.queue_estimates import InLine, MeanRunTimes, QueueEstimate, estimate, without_database

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
ONE_SLOT = [Backend(id="gpu1", url="http://gpu1", slots=1)]


def _job(session: Session, status: JobStatus, *, owner: str = "alice", priority: int = 3, template: str = "t",
         created: datetime = NOW, **changes: object) -> JobState:
    state = JobState(job_id=str(uuid.uuid4()), status=status, template_id=template, created_at=created, owner=owner,
                     priority=priority, **changes)
    record_job(session, RecordJobInput(job=state, backend=""))
    return state


def _ran(session: Session, template: str, milliseconds: int) -> None:
    _job(session, JobStatus.succeeded, template=template, created=NOW - timedelta(hours=1),
         completed_at=NOW - timedelta(minutes=30), execution_time_ms=milliseconds)


def _at(minutes: int) -> datetime:
    return NOW - timedelta(minutes=10) + timedelta(minutes=minutes)


def test_a_waiting_job_counts_prompts_in_comfyui_higher_priorities_and_owners_turns(engine: Engine) -> None:
    with Session(engine) as session:
        _ran(session, "t", 2000)
        _ran(session, "big", 10_000)
        _job(session, JobStatus.running, started_at=NOW - timedelta(seconds=0.5), created=_at(-5))  # 1.5 s left
        alices = [_job(session, JobStatus.queued, created=_at(minute)) for minute in (0, 1, 2)]
        bobs = _job(session, JobStatus.queued, owner="bob", created=_at(3))
        _job(session, JobStatus.queued, owner="carol", priority=1, template="big", created=_at(4))
        _job(session, JobStatus.queued, owner="dave", priority=5, created=_at(-1))  # lower: behind them all
        _job(session, JobStatus.queued, created=_at(-2), backend_tag="sdxl")  # waits in another queue

        # Bob's first turn comes after alice's first (it came first) and before her second.
        assert estimate(session, InLine.of(bobs), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(3, 1.5 + 10 + 2 + 2)
        # Alice's third waits for her first two and for bob's one turn.
        assert estimate(session, InLine.of(alices[2]), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(
            5, 1.5 + 10 + 2 * 3 + 2)
        # Two slots share the work ahead.
        two_slots = [Backend(id="gpu1", url="http://gpu1", slots=2)]
        assert estimate(session, InLine.of(bobs), two_slots, NOW, MeanRunTimes()) == QueueEstimate(
            3, (1.5 + 10 + 2) / 2 + 2)


def test_a_prompt_in_comfyui_keeps_its_place_there_and_a_running_one_counts_down(engine: Engine) -> None:
    with Session(engine) as session:
        _ran(session, "t", 4000)
        running = _job(session, JobStatus.running, started_at=NOW - timedelta(seconds=1), created=_at(0))
        prefetched = _job(session, JobStatus.queued, created=_at(1))
        assert write_live_progress(session, prefetched.job_id, 0, LiveProgress(queue_position=1))
        waiting = _job(session, JobStatus.queued, priority=1, created=_at(2))

        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(0, 3.0)
        live = LiveProgress(queue_position=1)
        assert estimate(session, InLine.of(prefetched, live), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(1, 8.0)
        # A higher priority does not pass what ComfyUI already holds: 3 s left, 4 s prefetched, then its own 4 s.
        assert estimate(session, InLine.of(waiting), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(2, 11.0)


def test_a_tagged_job_waits_only_behind_its_own_queue_and_the_backends_with_its_tag(engine: Engine) -> None:
    backends = [Backend(id="gpu1", url="http://gpu1", slots=1), Backend(id="gpu2", url="http://gpu2", slots=1,
                                                                         tags=("sdxl",))]
    with Session(engine) as session:
        _ran(session, "t", 1000)
        _job(session, JobStatus.queued, created=_at(0))  # untagged: any backend's
        on_gpu1 = _job(session, JobStatus.running, started_at=NOW, created=_at(0))
        record_job(session, RecordJobInput(job=on_gpu1, backend="gpu1"))
        tagged_ahead = _job(session, JobStatus.queued, created=_at(1), backend_tag="sdxl")
        tagged = _job(session, JobStatus.queued, created=_at(2), backend_tag="sdxl")
        assert estimate(session, InLine.of(tagged), backends, NOW, MeanRunTimes()) == QueueEstimate(1, 2.0)
        # Nothing known ahead of it, yet waiting: being placed, its place not known until ComfyUI tells it.
        assert estimate(session, InLine.of(tagged_ahead), backends, NOW, MeanRunTimes()) == QueueEstimate(None, 1.0)


def test_without_a_run_to_time_by_there_is_a_place_but_no_eta(engine: Engine) -> None:
    with Session(engine) as session:
        _job(session, JobStatus.queued, created=_at(0))
        later = _job(session, JobStatus.queued, created=_at(1))
        assert estimate(session, InLine.of(later), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(1, None)
        # Any template's run time stands in for one that never ran.
        _ran(session, "other", 3000)
        assert estimate(session, InLine.of(later), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(1, 6.0)
        ended = later.model_copy(update={"status": JobStatus.succeeded})
        assert estimate(session, InLine.of(ended), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(None, None)


def test_a_mean_run_time_is_read_once_a_while_yet_each_estimate_is_the_jobs_own(engine: Engine) -> None:
    run_times = MeanRunTimes(reuse_seconds=60)
    with Session(engine) as session:
        _ran(session, "t", 4000)
        running = _job(session, JobStatus.running, started_at=NOW - timedelta(seconds=1), created=_at(0))
        queued = _job(session, JobStatus.queued, created=_at(1))
        # Not read yet: the database must be asked, and then the mean is known without it.
        assert without_database(InLine.of(running), run_times, NOW) is None
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, run_times) == QueueEstimate(0, 3.0)
        assert without_database(InLine.of(running), run_times, NOW) == QueueEstimate(0, 3.0)
        # The countdown is the job's, as read now, and so is its place: only the mean is shared.
        assert without_database(InLine.of(running), run_times, NOW + timedelta(seconds=2)) == QueueEstimate(0, 1.0)
        assert without_database(InLine.of(queued), run_times, NOW) is None
        assert estimate(session, InLine.of(queued), ONE_SLOT, NOW, run_times) == QueueEstimate(1, 7.0)
        moved = queued.model_copy(update={"status": JobStatus.running, "started_at": NOW})
        assert without_database(InLine.of(moved), run_times, NOW) == QueueEstimate(0, 4.0)
        in_comfyui = InLine.of(queued, LiveProgress(queue_position=0))
        assert without_database(in_comfyui, run_times, NOW) == QueueEstimate(0, 4.0)
        # A success since is in the mean once the mean is read again, not before.
        _ran(session, "t", 8000)
        assert without_database(InLine.of(running), run_times, NOW) == QueueEstimate(0, 3.0)
        fresh = MeanRunTimes(reuse_seconds=0)
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, fresh) == QueueEstimate(0, 5.0)
        assert without_database(InLine.of(running), fresh, NOW) is None


def test_that_a_template_has_no_success_yet_is_kept_like_a_mean_and_its_first_counts_once_read_again(
    engine: Engine,
) -> None:
    run_times = MeanRunTimes(reuse_seconds=60)
    with Session(engine) as session:
        running = _job(session, JobStatus.running, started_at=NOW, created=_at(0))
        assert without_database(InLine.of(running), run_times, NOW) is None  # nothing read yet
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, run_times) == QueueEstimate(0, None)
        # No success of its own nor of any template: known without the database, until read again.
        assert without_database(InLine.of(running), run_times, NOW) == QueueEstimate(0, None)
        _ran(session, "other", 3000)
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, run_times) == QueueEstimate(0, None)
        fresh = MeanRunTimes(reuse_seconds=60)
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, fresh) == QueueEstimate(0, 3.0)
        # Its own absence and the fallback are both known: any template's mean stands in without the database.
        assert without_database(InLine.of(running), fresh, NOW) == QueueEstimate(0, 3.0)
        _ran(session, "t", 5000)
        assert without_database(InLine.of(running), fresh, NOW) == QueueEstimate(0, 3.0)
        again = MeanRunTimes(reuse_seconds=0)
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, again) == QueueEstimate(0, 5.0)


def test_a_success_seen_lets_an_absence_kept_be_asked_again_and_keeps_the_means(engine: Engine) -> None:
    run_times = MeanRunTimes(reuse_seconds=60)
    with Session(engine) as session:
        _ran(session, "t", 4000)
        running = _job(session, JobStatus.running, started_at=NOW, created=_at(0))
        other = _job(session, JobStatus.running, template="u", started_at=NOW, created=_at(1))
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, run_times) == QueueEstimate(0, 4.0)
        assert estimate(session, InLine.of(other), ONE_SLOT, NOW, run_times) == QueueEstimate(0, 4.0)
        _ran(session, "u", 2000)
        assert without_database(InLine.of(other), run_times, NOW) == QueueEstimate(0, 4.0)  # u's absence kept
        run_times.succeeded("t")  # a read showed one of t's jobs succeeded: t's mean is known, nothing to drop
        assert without_database(InLine.of(other), run_times, NOW) == QueueEstimate(0, 4.0)
        run_times.succeeded("u")  # one of u's: its first success may be it
        assert without_database(InLine.of(other), run_times, NOW) is None
        assert estimate(session, InLine.of(other), ONE_SLOT, NOW, run_times) == QueueEstimate(0, 2.0)
        assert without_database(InLine.of(running), run_times, NOW) == QueueEstimate(0, 4.0)  # means stay


def test_an_absence_read_before_a_success_was_seen_is_not_kept(engine: Engine) -> None:
    run_times = MeanRunTimes(reuse_seconds=60)

    def success_seen_during_the_read(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "execution_time_ms" in statement and "ORDER BY" in statement:
            run_times.succeeded("t")  # as the API shows t's first success while the read is under way

    with Session(engine) as session:
        running = _job(session, JobStatus.running, started_at=NOW, created=_at(0))
        event.listen(engine, "before_cursor_execute", success_seen_during_the_read)
        try:
            assert estimate(session, InLine.of(running), ONE_SLOT, NOW, run_times) == QueueEstimate(0, None)
        finally:
            event.remove(engine, "before_cursor_execute", success_seen_during_the_read)
        assert without_database(InLine.of(running), run_times, NOW) is None  # asked again, not kept
        assert estimate(session, InLine.of(running), ONE_SLOT, NOW, run_times) == QueueEstimate(0, None)
        assert without_database(InLine.of(running), run_times, NOW) == QueueEstimate(0, None)  # now kept


def test_estimates_asking_at_once_share_one_read_of_a_mean_and_one_holding_a_connection_reads_its_own(
    engine: Engine,
) -> None:
    reads: list[str] = []
    asking: list[bool] = []  # the estimates that have begun

    def slow_mean_reads(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "execution_time_ms" in statement and "ORDER BY" in statement:
            reads.append(statement)
            # Not done before every estimate has begun, and a moment more for them to reach the read under way.
            deadline = time.monotonic() + 10
            while len(asking) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)

    run_times = MeanRunTimes(reuse_seconds=60)
    event.listen(engine, "before_cursor_execute", slow_mean_reads)
    try:
        def mean(holding_a_connection: bool) -> float | None:
            asking.append(True)
            with Session(engine) as session:
                if holding_a_connection:
                    session.exec(select(1)).all()
                return run_times.of(session, "t")

        with ThreadPoolExecutor(8) as threads:
            shared = list(threads.map(mean, [False] * 8))
        # No success yet: each of the two queries (the template's, then any template's) about once, shared by all
        # (the estimate that read the first holds a connection, so it reads the second itself, and one that was
        # waiting may lead the second too: 3 at most, against 16 without sharing).
        assert shared == [None] * 8 and len(reads) <= 3, reads
        reads.clear()
        assert [mean(False) for _ in range(3)] == [None] * 3 and not reads  # that there is none is kept
        run_times = MeanRunTimes(reuse_seconds=60)  # nothing known: each asks for itself
        with ThreadPoolExecutor(4) as threads:
            own = list(threads.map(mean, [True] * 4))
        assert own == [None] * 4 and len(reads) == 8
    finally:
        event.remove(engine, "before_cursor_execute", slow_mean_reads)


def test_an_estimate_asks_each_templates_mean_once_however_many_of_its_jobs_are_ahead(engine: Engine) -> None:
    mean_reads: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "execution_time_ms" in statement and "ORDER BY" in statement:
            mean_reads.append(statement)

    with Session(engine) as session:
        for minute in range(5):
            _job(session, JobStatus.running, started_at=NOW, created=_at(minute))
            _job(session, JobStatus.queued, created=_at(minute + 5))
        waiting = _job(session, JobStatus.queued, created=_at(20))
        event.listen(engine, "before_cursor_execute", count)
        try:
            # No success yet, so no mean is kept between reads: its own template's, then any template's, once.
            assert estimate(session, InLine.of(waiting), ONE_SLOT, NOW, MeanRunTimes()) == QueueEstimate(10, None)
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert len(mean_reads) == 2, mean_reads
