"""The outputs of many jobs at once (`GET /outputs`), newest first: each job's `outputs` array flattened in SQL
into one row per file, so that a page is one query and its count another, whatever the jobs' sizes.

The jobs' rows hold their outputs as a JSON array. SQLite spreads it with `json_each`, PostgreSQL with
`json_array_elements ... WITH ORDINALITY`; both count it with `json_array_length`. Only jobs that have ended
have outputs, and they are ordered by when they ended (the files were made then), then by job id and the
file's place in its job, so that paging through is stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, column, func, true
from sqlmodel import Session, col, select

from app.db import as_utc
from app.models import OutputRef
from app.tables import JobRow


@dataclass(frozen=True)
class OutputFilter:
    owner: str | None = None  # None: every owner's (an admin's list)
    template_id: str | None = None
    batch_id: str | None = None
    completed_after: datetime | None = None
    completed_before: datetime | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class RecentOutput:
    job_id: str
    template_id: str | None
    completed_at: datetime
    output: OutputRef


def list_recent_outputs(session: Session, output_filter: OutputFilter) -> tuple[list[RecentOutput], int]:
    """One page of the outputs the filter selects, newest first, and how many it selects in all."""
    conditions = _conditions(output_filter)
    count = session.exec(
        select(func.coalesce(func.sum(func.json_array_length(col(JobRow.outputs))), 0)).where(*conditions)
    ).one()
    files, file, position = _files(session)
    rows = session.exec(
        select(col(JobRow.job_id), col(JobRow.template_id), col(JobRow.completed_at), file)
        .select_from(JobRow)
        .join(files, true())
        .where(*conditions)
        .order_by(col(JobRow.completed_at).desc(), col(JobRow.job_id), position)
        .offset(output_filter.offset)
        .limit(output_filter.limit)
    ).all()
    outputs = [RecentOutput(job_id, template_id, as_utc(completed_at), OutputRef.model_validate(value))
               for job_id, template_id, completed_at, value in rows]
    return outputs, int(count)


def _conditions(output_filter: OutputFilter) -> list[Any]:
    conditions: list[Any] = [col(JobRow.completed_at).is_not(None)]
    if output_filter.owner is not None:
        conditions.append(col(JobRow.owner) == output_filter.owner)
    if output_filter.template_id is not None:
        conditions.append(col(JobRow.template_id) == output_filter.template_id)
    if output_filter.batch_id is not None:
        conditions.append(col(JobRow.batch_id) == output_filter.batch_id)
    if output_filter.completed_after is not None:
        conditions.append(col(JobRow.completed_at) > output_filter.completed_after)
    if output_filter.completed_before is not None:
        conditions.append(col(JobRow.completed_at) < output_filter.completed_before)
    return conditions


def _files(session: Session) -> tuple[Any, Any, Any]:
    """The table-valued function that spreads a row's outputs, its file column and its position column."""
    if session.get_bind().dialect.name == "postgresql":
        spread = func.json_array_elements(col(JobRow.outputs)).table_valued(
            column("value", JSON), with_ordinality="position").render_derived()
        return spread, spread.c.value, spread.c.position
    spread = func.json_each(col(JobRow.outputs)).table_valued(column("value", JSON), column("key", Integer))
    return spread, spread.c.value, spread.c.key
