"""GET /backends: the ComfyUI backends the gateway places jobs on, and how each fares. Health is the API's own
background probe's (about once a second), never a ComfyUI call per request; the counts come from the jobs table
and the slot leases."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from sqlalchemy import func, select

from api.deps import SessionDep, SettingsDep
from api.rate_limits import limit_principal
from app.comfy.backends import configured_backends
from app.comfy.slots import live_leases
from app.models import CamelModel, JobStatus
from app.tables import JobRow

router = APIRouter(tags=["backends"], dependencies=[Depends(limit_principal)])


class BackendReport(CamelModel):
    id: str
    url: str = Field(description="without credentials")
    tags: list[str]
    slots: int = Field(description="prompts it runs at once")
    capacity: int = Field(description="prompts the gateway keeps on it at once: slots × (1 + COMFYUI_PREFETCH)")
    healthy: bool = Field(description="it answered the API's last probe")
    last_error: str | None = Field(None, description="why the last probe that failed did")
    running: int = Field(description="its jobs that ComfyUI is executing")
    queued: int = Field(description="prompts the gateway placed on it that wait in ComfyUI's own queue (prefetched)")


class BackendsReport(CamelModel):
    backends: list[BackendReport]
    waiting: int = Field(description=(
        "an estimate of the jobs waiting in Temporal for a slot on any backend: the jobs whose row says queued, less "
        "the backends' `queued` (their live slot leases less their jobs whose row says running), at least 0. Not a "
        "count of Temporal's tasks: off for moments while a job's row catches up with its prompt (placed, or "
        "started by ComfyUI, before the row says so), and too low while the leases of a worker that died have not "
        "yet expired"))
    checked_at: datetime = Field(description="when the background probe last looked")


@router.get("/backends", response_model=BackendsReport)
def list_backends(request: Request, session: SessionDep, settings: SettingsDep) -> BackendsReport:
    probe = request.app.state.probes.latest
    running = dict(session.execute(
        select(JobRow.backend, func.count()).where(JobRow.status == JobStatus.running.value).group_by(JobRow.backend)
    ).all())
    queued_jobs = session.execute(
        select(func.count()).select_from(JobRow).where(JobRow.status == JobStatus.queued.value)).scalar_one()
    leases = live_leases(session.get_bind())
    reports = []
    for backend in configured_backends(settings):
        on_it = running.get(backend.id, 0)
        reports.append(BackendReport(
            id=backend.id, url=backend.public_url, tags=list(backend.tags), slots=backend.slots,
            capacity=backend.capacity(settings.comfyui_prefetch), healthy=probe.comfyui.get(backend.id, False),
            last_error=request.app.state.probes.last_errors.get(backend.id), running=on_it,
            queued=max(len(leases.get(backend.id, [])) - on_it, 0),
        ))
    prefetched = sum(report.queued for report in reports)
    return BackendsReport(backends=reports, waiting=max(queued_jobs - prefetched, 0), checked_at=probe.checked_at)
