"""The feed of all jobs' changes (table job_feed): what is written with each change of a job's row, and what the
API's one feed reader reads (api.feed).

Written in the transaction that changes the row (app.jobstore: the workflow's records and the prompt activity's
live columns), so a job's state keeps its one writer and the feed never says what no row says. The ids are the
feed's event ids, read in order (`WHERE id > last`): an id must not become visible after a greater one was read.
SQLite has one writer at a time, so its commits come in id order; on PostgreSQL two transactions may take ids in
one order and commit in the other, so a write takes a transaction lock first (held to its commit, a few ms), and
the feed's writes commit in the order of their ids. Never a job's inputs or prompt (PRIVACY_MODE or not)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, insert, text
from sqlmodel import Session, col, select

from app.db import as_utc
from app.tables import JobFeedRow, JobRow

# Any fixed key: the one PostgreSQL advisory lock that puts the feed's writes in the order of their ids.
_FEED_WRITE_LOCK = 0x6A6F6266  # "jobf"


def append_feed(session: Session, row: JobRow, events: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Events (name, the job's status to tell with it, data) of the job whose row `row` is, as it is now, in
    this session's transaction; the caller commits at once (on PostgreSQL the feed's lock is held until then)."""
    if not events:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FEED_WRITE_LOCK})
    at = datetime.now(timezone.utc)
    session.execute(insert(JobFeedRow), [
        {"job_id": row.job_id, "owner": row.owner, "batch_id": row.batch_id, "template_id": row.template_id,
         "event": name, "status": status, "at": at, "data": data}
        for name, status, data in events
    ])


def live_data(row: JobRow) -> dict[str, Any]:
    """What every event says of the job: its progress and where it is."""
    return {"progress": row.progress, "currentNode": row.current_node, "queuePosition": row.queue_position,
            "attempts": row.attempts}


@dataclass(frozen=True)
class FeedFilter:
    """Which of the feed's events a listener gets: its owner's (None: everyone's, for an admin), and optionally
    only those of some statuses, a template (`workflowId`), a batch, or some jobs."""

    owner: str | None = None
    statuses: frozenset[str] | None = None
    template_id: str | None = None
    batch_id: str | None = None
    job_ids: frozenset[str] | None = None

    def matches(self, event: JobFeedRow) -> bool:
        return ((self.owner is None or event.owner == self.owner)
                and (self.statuses is None or event.status in self.statuses)
                and (self.template_id is None or event.template_id == self.template_id)
                and (self.batch_id is None or event.batch_id == self.batch_id)
                and (self.job_ids is None or event.job_id in self.job_ids))

    def conditions(self) -> list[Any]:
        conditions = []
        if self.owner is not None:
            conditions.append(col(JobFeedRow.owner) == self.owner)
        if self.statuses is not None:
            conditions.append(col(JobFeedRow.status).in_(sorted(self.statuses)))
        if self.template_id is not None:
            conditions.append(col(JobFeedRow.template_id) == self.template_id)
        if self.batch_id is not None:
            conditions.append(col(JobFeedRow.batch_id) == self.batch_id)
        if self.job_ids is not None:
            conditions.append(col(JobFeedRow.job_id).in_(sorted(self.job_ids)))
        return conditions


def latest_feed_id(session: Session) -> int:
    return session.exec(select(func.max(JobFeedRow.id))).one() or 0


def feed_after(session: Session, last_id: int, limit: int) -> list[JobFeedRow]:
    """Everyone's events after `last_id`, oldest first: the feed reader's one query per poll."""
    rows = session.exec(select(JobFeedRow).where(col(JobFeedRow.id) > last_id).order_by(col(JobFeedRow.id))
                        .limit(limit)).all()
    return [_utc(row) for row in rows]


def replay_start(session: Session, since_id: int, feed_filter: FeedFilter, window_s: float, most: int) -> int:
    """Where a reconnecting listener's replay starts: after `since_id`, or, when it missed more than `most` events
    within the last `window_s`, after the event just older than the newest `most` of them."""
    older = session.exec(
        select(JobFeedRow.id)
        .where(col(JobFeedRow.id) > since_id, col(JobFeedRow.at) >= _cutoff(window_s), *feed_filter.conditions())
        .order_by(col(JobFeedRow.id).desc())
        .offset(most)
        .limit(1)
    ).first()
    return since_id if older is None else older


def missed_page(session: Session, after_id: int, feed_filter: FeedFilter, window_s: float, limit: int
                ) -> list[JobFeedRow]:
    """A page of a listener's replay: its events after `after_id` within the last `window_s`, oldest first."""
    rows = session.exec(
        select(JobFeedRow)
        .where(col(JobFeedRow.id) > after_id, col(JobFeedRow.at) >= _cutoff(window_s), *feed_filter.conditions())
        .order_by(col(JobFeedRow.id))
        .limit(limit)
    ).all()
    return [_utc(row) for row in rows]


def prune_feed(session: Session, window_s: float) -> int:
    """Drop the events older than the replay window; how many went."""
    result = session.execute(delete(JobFeedRow).where(col(JobFeedRow.at) < _cutoff(window_s)))
    session.commit()
    return result.rowcount


def _cutoff(window_s: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=window_s)


def _utc(row: JobFeedRow) -> JobFeedRow:
    row.at = as_utc(row.at)
    return row
