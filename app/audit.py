"""The audit log: every admin action (template create, update and delete; a cancel of another's job; a codec
decode), with who, what, on what, and when. Rows are only ever added.

Sync routes call `record_audit(session, ...)`; async ones `await db.run(record_audit, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.auth import Principal
from app.tables import AuditRow

# The actions recorded, as `action` names them.
TEMPLATE_CREATE = "template.create"
TEMPLATE_UPDATE = "template.update"
TEMPLATE_DELETE = "template.delete"
JOB_CANCEL = "job.cancel"
BATCH_CANCEL = "batch.cancel"
CODEC_DECODE = "codec.decode"


def record_audit(
    session: Session, actor: Principal, action: str, target: str, details: dict[str, Any] | None = None
) -> AuditRow:
    row = AuditRow(actor=actor.id, role=actor.role.value, action=action, target=target,
                   at=datetime.now(timezone.utc), details=details or {})
    session.add(row)
    session.commit()
    return row


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    after: datetime | None = None
    before: datetime | None = None
    limit: int = 50
    offset: int = 0


def list_audit(session: Session, audit_filter: AuditFilter) -> tuple[list[AuditRow], int]:
    """Entries matching every filter given, newest first, and how many match in all."""
    conditions = []
    for column, value in ((AuditRow.actor, audit_filter.actor), (AuditRow.action, audit_filter.action),
                          (AuditRow.target, audit_filter.target)):
        if value is not None:
            conditions.append(col(column) == value)
    if audit_filter.after is not None:
        conditions.append(col(AuditRow.at) > audit_filter.after)
    if audit_filter.before is not None:
        conditions.append(col(AuditRow.at) < audit_filter.before)
    count = session.exec(select(func.count()).select_from(AuditRow).where(*conditions)).one()
    rows = session.exec(
        select(AuditRow).where(*conditions).order_by(col(AuditRow.at).desc(), col(AuditRow.id).desc())
        .offset(audit_filter.offset).limit(audit_filter.limit)
    ).all()
    return list(rows), count
