"""The database side of retention: which jobs have expired, which staged inputs they leave unused, and deleting
their rows. The storage side and Temporal's (is the workflow still open?) are the retention activities'.

A job has expired when it ended (succeeded, failed, cancelled) before the cutoff. A job submitted but never
recorded (its workflow never started: Temporal refused it) has no row, only its job_inputs rows; it has expired
when those are older than the cutoff. A live job (queued, running) never has.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, exists, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from app.models import JobStatus
from app.tables import JobEventRow, JobInputRow, JobRow

_ENDED = [status.value for status in JobStatus if status.is_terminal]


def link_job_inputs(session: Session, job_id: str, storage_keys: list[str], at: datetime) -> None:
    """Note that the job uses these staged inputs; the API calls it before storing them. Idempotent."""
    if not storage_keys:
        return
    rows = [{"job_id": job_id, "storage_key": key, "created_at": at} for key in sorted(set(storage_keys))]
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(insert(JobInputRow).values(rows).on_conflict_do_nothing(index_elements=["job_id", "storage_key"]))
    session.commit()


def expired_job_ids(session: Session, cutoff: datetime, after: str, limit: int) -> list[str]:
    """Up to `limit` expired job ids greater than `after`, in order."""
    hit = aliased(JobRow)
    ended = (
        select(JobRow.job_id)
        .where(
            col(JobRow.status).in_(_ENDED),
            col(JobRow.completed_at) < cutoff,
            col(JobRow.job_id) > after,
            # A cache hit shows its source's outputs: the source stays while a hit refers to it.
            ~exists().where(hit.cached_from == JobRow.job_id),
        )
        .order_by(col(JobRow.job_id))
        .limit(limit)
    )
    never_recorded = (
        select(JobInputRow.job_id)
        .where(
            col(JobInputRow.created_at) < cutoff,
            col(JobInputRow.job_id) > after,
            ~exists().where(col(JobRow.job_id) == col(JobInputRow.job_id)),
        )
        .group_by(col(JobInputRow.job_id))
        .order_by(col(JobInputRow.job_id))
        .limit(limit)
    )
    found = set(session.execute(ended).scalars()) | set(session.execute(never_recorded).scalars())
    # Each list is complete up to its own last id, so the first `limit` of both together are too.
    return sorted(found)[:limit]


def inputs_left_unused(session: Session, job_ids: list[str]) -> list[str]:
    """The staged inputs these jobs use that no other job does: deleting the jobs frees them."""
    if not job_ids:
        return []
    other = aliased(JobInputRow)
    statement = (
        select(JobInputRow.storage_key)
        .where(
            col(JobInputRow.job_id).in_(job_ids),
            ~exists().where(other.storage_key == JobInputRow.storage_key, other.job_id.not_in(job_ids)),
        )
        .distinct()
        .order_by(col(JobInputRow.storage_key))
    )
    return list(session.execute(statement).scalars())


def input_used_elsewhere(session: Session, storage_key: str, job_ids: list[str]) -> bool:
    """Whether a job other than these uses the staged input now. Asked again right before each input's deletion:
    a new job may have noted its use since inputs_left_unused, and then stores the file that deletion would
    remove under it."""
    statement = select(JobInputRow.job_id).where(
        col(JobInputRow.storage_key) == storage_key, col(JobInputRow.job_id).not_in(job_ids)
    ).limit(1)
    return session.execute(statement).first() is not None


def delete_job_records(session: Session, job_ids: list[str]) -> int:
    """Delete the jobs' rows, log events and input links in one transaction; returns how many job rows went."""
    if not job_ids:
        return 0
    session.execute(delete(JobEventRow).where(col(JobEventRow.job_id).in_(job_ids)))
    session.execute(delete(JobInputRow).where(col(JobInputRow.job_id).in_(job_ids)))
    deleted = session.execute(delete(JobRow).where(col(JobRow.job_id).in_(job_ids))).rowcount
    session.commit()
    return deleted
