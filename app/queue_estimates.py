"""Where a live job stands in line and when it should be done: `queuePosition` and `etaSeconds`.

The line is the one the job really waits in. Ahead of a job that waits in Temporal for a slot are:

- every prompt already in ComfyUI (running, or prefetched into its queue) on the backends that serve the job's
  queue: those keep their place whatever their priority;
- the jobs waiting in the same queue (the same backend tag) in the order Temporal hands them out: a higher
  priority first; at one priority, owners take turns (fairness: an owner's n-th waiting job comes after every
  other owner's n-th, and before their (n+1)-th), and each owner's own jobs come first come, first served.

A job already in ComfyUI's queue has the place ComfyUI gives it; a running job has position 0; a waiting job
with nothing known ahead of it has none (it is being placed, and ComfyUI tells its place in a moment).

A job's run time is the mean execution time of the latest successes of its template (raw graphs count as one
template), else of any job; with no success yet there is no ETA. The wait is the work ahead (what the prompts
in ComfyUI still have to run, plus the waiting jobs' run times) shared by the slots of the backends that serve
the queue: a fluid estimate, exact for one slot.

The means are shared by every estimate and read from the database at most once a second (`MeanRunTimes`):
with a thousand jobs running, every read of one asked for the same mean. A running job's estimate needs
nothing else, so with its template's mean known it is worked out without the database (`without_database`);
its countdown and its place are the job's own, as read now. That a template (or the whole gateway) has no
success yet is kept the same way: the first one counts within a second, as every later one does, and at once
once the API has shown a job succeeded.

The live columns of a row are written about once a second (activities.live_row), so a prompt that reached
ComfyUI a moment ago may still count as waiting in Temporal.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from app.comfy.backends import Backend
from app.db import as_utc
from app.models import JobState, JobStatus, LiveProgress
from app.tables import JobRow

# How many of a template's latest successes its run time is the mean of.
RECENT_RUNS = 20
# How long a mean run time read from the database serves every estimate.
MEANS_REUSE_SECONDS = 1.0
_MEANS_CAPACITY = 10_000


@dataclass(frozen=True)
class QueueEstimate:
    # Jobs ahead of it (0: it runs); None: not in line (ended), or being placed with nothing known ahead.
    position: int | None
    # Seconds until it should be done; None: no run time known yet.
    eta_seconds: float | None


@dataclass(frozen=True)
class InLine:
    """The job whose place is asked: as its workflow's state and its live progress say."""

    job_id: str
    status: JobStatus
    priority: int
    owner: str | None
    created_at: datetime
    template_id: str | None
    backend_tag: str | None
    started_at: datetime | None = None
    # Its prompt's place in ComfyUI's queue once it is there (0: running); None: still waiting in Temporal.
    comfy_position: int | None = None

    @classmethod
    def of(cls, state: JobState, live: LiveProgress | None = None) -> "InLine":
        return cls(
            job_id=state.job_id, status=state.status, priority=state.priority, owner=state.owner,
            created_at=state.created_at, template_id=state.template_id, backend_tag=state.backend_tag,
            started_at=state.started_at, comfy_position=live.queue_position if live is not None else None,
        )


class MeanRunTimes:
    """Mean run times in seconds by template, each read from the database at most once per `reuse_seconds` and
    shared by every estimate; a template with no success yet takes any template's. That there is none yet is
    kept as long as a mean is, or until a read shows a job of the template succeeded (`succeeded`); so a
    template's first success counts within `reuse_seconds`, as every later one does, and at once for a client
    that saw it (asked again at each estimate, it cost every read of a running job two queries on a worker
    thread, a fifth of the API's CPU with a thousand jobs running and none done yet: bench/long_jobs.py).
    Estimates that ask while a read of the same mean is under way share its answer (a burst of submissions
    before any success asked the same two queries each, and held the API's database connections). Estimates run
    on worker threads, hence the lock."""

    def __init__(self, reuse_seconds: float = MEANS_REUSE_SECONDS) -> None:
        self.reuse_seconds = reuse_seconds
        # (template, any template) → (when it expires, the mean read; None: no success yet)
        self._means: dict[tuple[str | None, bool], tuple[float, float | None]] = {}
        self._reads: dict[tuple[str | None, bool], Future[float | None]] = {}
        # The keys kept as "no success yet"; and the successes seen (`succeeded`), by template and of any
        # (None): a read that began before one must not keep an absence it may have read before that success.
        self._absent: set[tuple[str | None, bool]] = set()
        self._seen: dict[tuple[str | None, bool], int] = {}
        self._lock = threading.Lock()

    def succeeded(self, template_id: str | None) -> None:
        """A job of the template was seen succeeding: that the template, or any, had no success yet is asked
        again, so that a client that saw its first job done has an ETA for its next at once. Reads of jobs that
        ended long ago drop nothing: their template's mean is known. Called on the event loop only."""
        seen = ((template_id, False), (None, True))
        for key in seen:
            self._seen[key] = self._seen.get(key, 0) + 1
        if self._absent.isdisjoint(seen):
            return
        with self._lock:
            for key in seen:
                if key in self._absent:
                    self._means.pop(key, None)
                    self._absent.discard(key)

    def known(self, template_id: str | None) -> tuple[bool, float | None]:
        """Whether what `of` answers is known without the database, and that answer."""
        own = self._fresh((template_id, False))
        if own is None or own[1] is not None:
            return own is not None, None if own is None else own[1]
        fallback = self._fresh((None, True))
        return fallback is not None, None if fallback is None else fallback[1]

    def of(self, session: Session, template_id: str | None) -> float | None:
        mean = self._read(session, template_id, any_template=False)
        return mean if mean is not None else self._read(session, None, any_template=True)

    def _fresh(self, key: tuple[str | None, bool]) -> tuple[float, float | None] | None:
        with self._lock:
            entry = self._means.get(key)
        return entry if entry is not None and entry[0] > time.monotonic() else None

    def _read(self, session: Session, template_id: str | None, *, any_template: bool) -> float | None:
        key = (template_id, any_template)
        if (entry := self._fresh(key)) is not None:
            return entry[1]
        # Only an estimate that holds no connection yet waits for another's read: one waiting with a connection
        # could hold the last one the read needs.
        may_wait = not session.in_transaction()
        with self._lock:
            under_way = self._reads.get(key) if may_wait else None
            if under_way is None:
                reading = self._reads[key] = Future()
        if under_way is not None:
            return under_way.result()
        seen = self._seen.get(key, 0)
        try:
            mean = _recent_mean(session, template_id, any_template=any_template)
        except BaseException as error:
            self._done(key, reading)
            reading.set_exception(error)
            raise
        now = time.monotonic()
        with self._lock:
            # Kept before the read is let go, so an estimate that comes between finds the mean.
            if len(self._means) >= _MEANS_CAPACITY:
                self._means = {known: entry for known, entry in self._means.items() if entry[0] > now}
                self._absent &= self._means.keys()
            if mean is not None:
                self._means[key] = (now + self.reuse_seconds, mean)
                self._absent.discard(key)
            elif seen == self._seen.get(key, 0):  # else a success seen since the read began may not be in it
                self._means[key] = (now + self.reuse_seconds, mean)
                self._absent.add(key)
        self._done(key, reading)
        reading.set_result(mean)
        return mean

    def _done(self, key: tuple[str | None, bool], reading: Future[float | None]) -> None:
        with self._lock:
            if self._reads.get(key) is reading:
                del self._reads[key]


def _recent_mean(session: Session, template_id: str | None, *, any_template: bool) -> float | None:
    query = select(JobRow.execution_time_ms).where(
        col(JobRow.status) == JobStatus.succeeded.value, col(JobRow.execution_time_ms).is_not(None))
    if not any_template:
        query = query.where(col(JobRow.template_id).is_(None) if template_id is None
                            else col(JobRow.template_id) == template_id)
    durations = session.exec(query.order_by(col(JobRow.completed_at).desc()).limit(RECENT_RUNS)).all()
    return sum(durations) / len(durations) / 1000 if durations else None


def without_database(job: InLine, run_times: MeanRunTimes, now: datetime) -> QueueEstimate | None:
    """The estimate of a running job (or one ComfyUI runs) whose run time is known already; None when the
    database must be asked (`estimate`)."""
    if job.status is not JobStatus.running and job.comfy_position != 0:
        return None
    known, own = run_times.known(job.template_id)
    return _running(own, job, now) if known else None


def estimate(
    session: Session, job: InLine, backends: list[Backend], now: datetime, run_times: MeanRunTimes
) -> QueueEstimate:
    if job.status.is_terminal:
        return QueueEstimate(None, None)
    own = run_times.of(session, job.template_id)
    if job.status is JobStatus.running or job.comfy_position == 0:
        return _running(own, job, now)
    if job.comfy_position is not None:
        # In ComfyUI's queue: behind the prompts ahead of it there, on its backend's one slot at a time.
        ahead = job.comfy_position
        return QueueEstimate(ahead, _rounded(None if own is None else own * (ahead + 1)))

    served = [backend for backend in backends if job.backend_tag is None or job.backend_tag in backend.tags]
    slots = sum(backend.slots for backend in served) or 1
    in_comfyui = _in_comfyui(session, job, {backend.id for backend in served})
    waiting = _waiting_ahead(session, job)
    # Each template's mean once per estimate: a thousand prompts of one template in ComfyUI, with no success yet
    # (no mean kept), asked it 2,000 times, half a second per estimate.
    means: dict[str | None, float | None] = {job.template_id: own}

    def mean_of(template_id: str | None) -> float | None:
        if template_id not in means:
            means[template_id] = run_times.of(session, template_id)
        return means[template_id]

    work: float | None = 0.0 if own is not None else None  # with no run time of its own, no ETA whatever is ahead
    for template_id, started_at in in_comfyui:
        if work is None:
            break
        work = _plus(work, _remaining(mean_of(template_id), started_at, now))
    for template_id, count in waiting.items():
        if work is None:
            break
        run_time = mean_of(template_id)
        work = _plus(work, None if run_time is None else run_time * count)
    eta = None if work is None or own is None else work / slots + own
    ahead = len(in_comfyui) + sum(waiting.values())
    # Nothing known ahead, yet not running: it is being placed (its prompt may be in ComfyUI already, behind
    # prompts the gateway did not send), and ComfyUI tells its place in a moment. 0 would say it runs.
    return QueueEstimate(ahead or None, _rounded(eta))


def _in_comfyui(session: Session, job: InLine, served: set[str]) -> list[tuple[str | None, datetime | None]]:
    """(template, started at) of the other live prompts in ComfyUI on the backends that serve the job's queue. A
    prompt only prefetched has no backend on its row yet: its tag says whether it waits where this job would."""
    rows = session.exec(
        select(JobRow.template_id, JobRow.started_at, JobRow.status, JobRow.backend, JobRow.backend_tag).where(
            col(JobRow.status).in_([JobStatus.queued.value, JobStatus.running.value]),
            col(JobRow.job_id) != job.job_id,
            or_(col(JobRow.status) == JobStatus.running.value, col(JobRow.queue_position).is_not(None)),
        )
    ).all()
    placed = []
    for template_id, started_at, status, backend, backend_tag in rows:
        on_served = backend in served if backend else (job.backend_tag is None or backend_tag == job.backend_tag)
        if on_served:
            placed.append((template_id, as_utc(started_at) if status == JobStatus.running.value else None))
    return placed


def _waiting_ahead(session: Session, job: InLine) -> Counter[str | None]:
    """How many jobs of each template Temporal hands out before this one from the same queue."""
    waiting = (
        col(JobRow.status) == JobStatus.queued.value,
        col(JobRow.queue_position).is_(None),
        col(JobRow.job_id) != job.job_id,
        col(JobRow.backend_tag).is_(None) if job.backend_tag is None else col(JobRow.backend_tag) == job.backend_tag,
    )
    ahead: Counter[str | None] = Counter()
    for template_id, count in session.exec(
        select(JobRow.template_id, func.count()).where(*waiting, col(JobRow.priority) < job.priority)
        .group_by(col(JobRow.template_id))
    ).all():
        ahead[template_id] += count
    peers: dict[str | None, list[tuple[datetime, str | None]]] = defaultdict(list)
    for owner, created_at, template_id in session.exec(
        select(JobRow.owner, JobRow.created_at, JobRow.template_id).where(*waiting, col(JobRow.priority) == job.priority)
    ).all():
        peers[owner].append((as_utc(created_at), template_id))
    own_turn = sum(1 for created_at, _ in peers.get(job.owner, []) if created_at < job.created_at)
    for owner, jobs in peers.items():
        jobs.sort(key=lambda item: item[0])
        if owner == job.owner:
            turns = jobs[:own_turn]
        else:  # their turns before this job's, and the one at the same turn if it came first
            turns = jobs[:own_turn] + [item for item in jobs[own_turn:own_turn + 1] if item[0] < job.created_at]
        ahead.update(template_id for _, template_id in turns)
    return ahead


def _running(own: float | None, job: InLine, now: datetime) -> QueueEstimate:
    return QueueEstimate(0, _rounded(_remaining(own, job.started_at, now)))


def _remaining(run_time: float | None, started_at: datetime | None, now: datetime) -> float | None:
    if run_time is None or started_at is None:
        return run_time
    return max(run_time - (now - started_at).total_seconds(), 0.0)


def _plus(total: float | None, seconds: float | None) -> float | None:
    return None if total is None or seconds is None else total + seconds


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
