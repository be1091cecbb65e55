"""The audit log of admin actions (admin only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import Field

from api.deps import SessionDep, require_admin
from api.rate_limits import limit_principal
from api.routes.jobs import Instant
from app.audit import AuditFilter, list_audit
from app.db import as_utc
from app.models import CamelModel

router = APIRouter(prefix="/audit", tags=["audit"], dependencies=[Depends(require_admin), Depends(limit_principal)])


class AuditEntry(CamelModel):
    actor: str = Field(description="the principal id of who acted")
    role: str
    action: str = Field(description="template.create, template.update, template.delete, job.cancel, codec.decode")
    target: str = Field(description="what it acted on: a template id, a job id")
    at: datetime
    details: dict[str, Any]


class AuditLog(CamelModel):
    entries: list[AuditEntry] = Field(description="newest first")
    count: int = Field(description="how many entries match the filters in all")


@router.get("", response_model=AuditLog)
def get_audit_log(
    session: SessionDep,
    actor: str | None = Query(None, max_length=128, description="only this principal's actions"),
    action: str | None = Query(None, max_length=64, description="only this action, e.g. template.delete"),
    target: str | None = Query(None, max_length=256, description="only actions on this template or job id"),
    after: Instant | None = Query(None, description="after this instant (ISO 8601)"),
    before: Instant | None = Query(None, description="before this instant (ISO 8601)"),
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000_000),
) -> AuditLog:
    rows, count = list_audit(session, AuditFilter(actor=actor, action=action, target=target, after=after,
                                                  before=before, limit=limit, offset=offset))
    return AuditLog(count=count, entries=[
        AuditEntry(actor=row.actor, role=row.role, action=row.action, target=row.target, at=as_utc(row.at),
                   details=row.details)
        for row in rows
    ])
