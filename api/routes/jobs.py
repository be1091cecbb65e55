"""Jobs: submit, read, list, cancel, and the job's event log."""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import suppress
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator
from sqlmodel import Session
from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from api.deps import (
    DatabaseDep, JobDep, JobReaderDep, Principal, PrincipalDep, SessionDep, SettingsDep, StorageDep, TemporalDep,
)
from api.database import Database
from api.errors import ApiError, invalid_input, validation_error
from api.job_views import Job, public_job
from api.json_body import JsonBodyRoute
from api.openapi import answers_with
from api.rate_limits import limit_principal
from app.comfy.backends import backend_task_queue, configured_backends
from app.db import as_utc
from app.errors import CLIENT_RETRYABLE_CODES, ErrorCode, InvalidInput
from app.jobstore import JobFilter, JobSnapshot, count_unfinished_jobs, estimate_wait_seconds, list_events, list_jobs
from app.models import CamelModel, CancelRequest, GenerationInput, JobStatus, RetrySpec
from app.retention import link_job_inputs
from app.safe_http import RefusedTarget
from app.settings import Settings
from app.submission import ImageIntake, prepare_job
from app.templates.limits import Limits
from app.templates.registry import TEMPLATE_ID_MAX_LENGTH
from app.templates.rendering import ApiFormatGraph
from app.templates.store import get_template
from app.webhooks.events import TERMINAL_EVENTS
from app.webhooks.targets import check_callback_url
from workflows_temporal.generation import GenerationWorkflow

router = APIRouter(
    prefix="/jobs", tags=["jobs"], route_class=JsonBodyRoute, dependencies=[Depends(limit_principal)])

# Temporal refuses payloads over 2 MB; a job near that belongs in a template, its images in URLs or storage.
_MAX_JOB_BYTES = 1_000_000
_MAX_METADATA_BYTES = 16_000
_MAX_TIMEOUT_SECONDS = 24 * 3600
# How long `POST /jobs/{id}/cancel` waits for the workflow to finish cancelling before it answers.
_CANCEL_WAIT_SECONDS = 10.0
_MAX_CALLBACK_URL_LENGTH = 2048

WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "job.progress"]


def _json_number(value: Any) -> Any:
    # Pydantic would read "10" as 10 and true as 1: a timeout of `true` seconds is a client's mistake.
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


def _iso_8601(value: Any) -> Any:
    # Pydantic reads a number, or a string that is one, as a Unix time: `before=0` was taken for 1970.
    try:
        float(value)
    except (TypeError, ValueError):
        return value
    raise ValueError("must be an ISO 8601 instant such as 2024-05-01T12:00:00Z, not a Unix time")


Instant = Annotated[datetime, BeforeValidator(_iso_8601)]


class RetryRequest(RetrySpec):
    """The job's `retry`: like every other part of the request, unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", validate_by_name=False)  # camelCase only, as documented

    retry_on: list[ErrorCode] = Field(default_factory=list, json_schema_extra={
        "items": {"type": "string", "enum": [code.value for code in CLIENT_RETRYABLE_CODES]}})

    _numbers = field_validator("max_attempts", "backoff_seconds", mode="before")(_json_number)

    @field_validator("retry_on")
    @classmethod
    def _retryable(cls, codes: list[ErrorCode]) -> list[ErrorCode]:
        if refused := [code.value for code in codes if code not in CLIENT_RETRYABLE_CODES]:
            allowed = ", ".join(code.value for code in CLIENT_RETRYABLE_CODES)
            raise ValueError(f"{', '.join(refused)} cannot be retried; retryOn takes {allowed}")
        return codes


class CreateJobRequest(CamelModel):
    model_config = ConfigDict(
        extra="forbid", validate_by_name=False,  # camelCase only, as documented
        json_schema_extra={
            "oneOf": [  # _one_workflow's rule: a template id or a graph, not both (null is as good as absent)
                {"required": ["workflowId"], "properties": {"workflowId": {"type": "string"}}},
                {"required": ["workflowJson"], "properties": {"workflowJson": {"type": "object"}}},
            ],
            "examples": [{"workflowId": "solid_color", "inputs": {"width": 256, "height": 256, "color": 16711680}}],
        },
    )

    # No longer than a template id can be: a 404 names the id it did not find.
    workflow_id: str | None = Field(
        None, max_length=TEMPLATE_ID_MAX_LENGTH, description="id of a registered workflow template")
    workflow_json: ApiFormatGraph | None = Field(None, description="an inline ComfyUI graph in API format")
    inputs: dict[str, Any] = Field(default_factory=dict, description="values for the template's {{placeholders}}")
    params: dict[str, Any] = Field(default_factory=dict, description="generation parameters; `inputs` win on a clash")
    callback_url: str | None = Field(
        None, max_length=_MAX_CALLBACK_URL_LENGTH,
        description="where the job's signed webhooks are posted (http or https, a host WEBHOOK_ALLOWED_DOMAINS allows)")
    webhook_events: list[WebhookEvent] | None = Field(
        None, min_length=1, max_length=4,
        description="which events are sent to callbackUrl; default the final ones (job.succeeded, job.failed, "
                    "job.cancelled); job.progress is opt-in")
    metadata: dict[str, Any] = Field(default_factory=dict, description="echoed back with the job")
    retry: RetryRequest = Field(default_factory=RetryRequest)
    timeout_seconds: float | None = Field(None, gt=0, le=_MAX_TIMEOUT_SECONDS, description="defaults to COMFYUI_TIMEOUT_MS")

    _numbers = field_validator("timeout_seconds", mode="before")(_json_number)

    @model_validator(mode="after")
    def _one_workflow(self) -> "CreateJobRequest":
        if (self.workflow_id is None) == (self.workflow_json is None):
            raise ValueError("give exactly one of workflowId and workflowJson")
        return self


class CreateJobResponse(CamelModel):
    job_id: str
    status: JobStatus
    eta_seconds: float | None
    poll_url: str


class JobList(CamelModel):
    jobs: list[Job]
    count: int


class CancelJobBody(CamelModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=False)  # camelCase only, as documented

    reason: str = Field("", max_length=500)


class CancelJobResponse(CamelModel):
    job_id: str
    status: JobStatus
    message: str


class JobEvent(CamelModel):
    at: datetime
    kind: str
    message: str
    data: dict[str, Any]


class JobLogs(CamelModel):
    job_id: str
    events: list[JobEvent]


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


@router.post("", status_code=202, response_model=CreateJobResponse)
@answers_with(ErrorCode.WEBHOOK_NOT_CONFIGURED, ErrorCode.WORKFLOW_NOT_FOUND, ErrorCode.TOO_MANY_ACTIVE_JOBS)
async def create_job(
    body: CreateJobRequest,
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    storage: StorageDep,
    principal: PrincipalDep,
) -> CreateJobResponse:
    _check_webhook(body, settings)
    await _check_active_jobs(principal, db, settings)
    if _json_size(body.metadata) > _MAX_METADATA_BYTES:
        raise validation_error([{"field": "metadata", "message": f"larger than {_MAX_METADATA_BYTES} bytes"}])

    template = None
    if body.workflow_id is not None:
        template = await db.run(get_template, body.workflow_id)
        if template is None:
            raise ApiError(ErrorCode.WORKFLOW_NOT_FOUND, f"no workflow template with id {body.workflow_id}",
                           {"workflowId": body.workflow_id})
    job_id = str(uuid.uuid4())
    images = ImageIntake(
        storage=storage, note_use=lambda keys: db.run(link_job_inputs, job_id, keys, datetime.now(timezone.utc)),
        http=request.app.state.http, max_bytes=settings.input_image_max_bytes,
        max_pixels=settings.input_image_max_pixels,
        allow_private_urls=settings.input_image_allow_private_urls,
    )
    try:
        prepared = await prepare_job(
            template=template, workflow_json=body.workflow_json, given={**body.params, **body.inputs},
            limits=Limits.of_settings(settings.max_image_size, settings.max_batch_size), images=images,
        )
    except InvalidInput as error:
        raise invalid_input(error) from error

    backend = configured_backends(settings)[0]
    job = GenerationInput(
        job_id=job_id,
        template_id=body.workflow_id,
        template_version=template.version if template is not None else None,
        workflow_json=prepared.workflow_json,
        inputs=prepared.inputs,
        metadata=body.metadata,
        retry=RetrySpec.model_validate(body.retry.model_dump()),
        timeout_seconds=body.timeout_seconds or settings.job_timeout_seconds,
        heartbeat_timeout_seconds=settings.comfyui_heartbeat_timeout_s,
        backend=backend.id,
        backend_task_queue=backend_task_queue(settings, backend.id),
        created_at=datetime.now(timezone.utc),
        privacy_mode=settings.privacy_mode,
        callback_url=body.callback_url,
        webhook_events=list(dict.fromkeys(body.webhook_events or TERMINAL_EVENTS)),
    )
    if len(job.model_dump_json()) > _MAX_JOB_BYTES:
        field = "workflowJson" if body.workflow_json is not None else "inputs"
        raise validation_error([{"field": field, "message": f"the job is larger than {_MAX_JOB_BYTES} bytes"}])
    try:
        await temporal.require().start_workflow(
            GenerationWorkflow.run,
            job,
            id=job_id,
            task_queue=settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except RPCError as error:
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal refused the job; nothing was created") from error
    eta = await db.run(estimate_wait_seconds, body.workflow_id, settings.max_concurrency)
    return CreateJobResponse(job_id=job_id, status=JobStatus.queued, eta_seconds=eta, poll_url=f"/jobs/{job_id}")


async def _check_active_jobs(principal: Principal, db: Database, settings: Settings) -> None:
    """MAX_ACTIVE_JOBS_PER_PRINCIPAL. A job's row is written by its workflow a moment after it starts, so
    submissions that come together may pass this check before any of their rows exists: a burst can
    overshoot the cap by about as many requests as arrive in that moment."""
    cap = settings.max_active_jobs_per_principal
    if cap is None:
        return
    if (active := await db.run(count_unfinished_jobs, principal.id)) >= cap:
        raise ApiError(ErrorCode.TOO_MANY_ACTIVE_JOBS,
                       f"{active} of your jobs are queued or running, the most allowed at once ({cap}); "
                       "submit again when one has finished", {"active": active, "limit": cap})


def _check_webhook(body: CreateJobRequest, settings: Settings) -> None:
    """A callback URL the job's webhooks may go to, before any job exists; the addresses its host resolves to
    are checked at each delivery."""
    if body.callback_url is None:
        if body.webhook_events is not None:
            raise validation_error([{"field": "webhookEvents", "message": "needs a callbackUrl to send them to"}])
        return
    if not settings.webhook_secret:
        raise ApiError(
            ErrorCode.WEBHOOK_NOT_CONFIGURED,
            "callbackUrl: this gateway has no WEBHOOK_SECRET and never sends unsigned webhooks",
            {"field": "callbackUrl"},
        )
    try:
        check_callback_url(body.callback_url, settings.webhook_allowed_domains)
    except RefusedTarget as refused:
        raise validation_error([{"field": "callbackUrl", "message": str(refused)}]) from None


@router.get("", response_model=JobList)
def get_jobs(
    session: SessionDep,
    storage: StorageDep,
    status: JobStatus | None = None,
    workflow_id: Annotated[str | None, Query(alias="workflowId")] = None,
    after: Instant | None = Query(None, description="created after this instant (ISO 8601)"),
    before: Instant | None = Query(None, description="created before this instant (ISO 8601)"),
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000_000),
) -> JobList:
    jobs, count = list_jobs(
        session,
        JobFilter(status=status, template_id=workflow_id, created_after=after, created_before=before, limit=limit, offset=offset),
    )
    return JobList(jobs=[public_job(job, storage) for job in jobs], count=count)


@router.get("/{job_id}", response_model=Job)
async def get_job(job: JobDep, storage: StorageDep) -> Job:
    return public_job(job, storage)


@router.post("/{job_id}/cancel", response_model=CancelJobResponse)
@answers_with(ErrorCode.JOB_ALREADY_FINISHED)
async def cancel_job(
    job: JobDep,
    reader: JobReaderDep,
    temporal: TemporalDep,
    body: Annotated[CancelJobBody | None, Body()] = None,
) -> CancelJobResponse:
    job_id = job.state.job_id
    if job.state.status.is_terminal:
        raise _already_finished(job)
    handle = temporal.require().get_workflow_handle(job_id)
    try:
        await handle.signal(GenerationWorkflow.cancel, CancelRequest(reason=body.reason if body else "", actor="api"))
    except RPCError as error:
        job = await reader.read(job_id, reuse_live=False)
        if job.state.status.is_terminal:
            raise _already_finished(job) from error
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal did not take the cancel; try again") from error
    # The workflow's end, awaited (long-polled by Temporal) rather than polled for.
    with suppress(TimeoutError, WorkflowFailureError, RPCError):
        async with asyncio.timeout(_CANCEL_WAIT_SECONDS):
            await handle.result()
    status = (await reader.read(job_id, reuse_live=False)).state.status
    if status is JobStatus.cancelled:
        message = "job cancelled"
    elif status.is_terminal:
        message = f"the job finished as {status.value} before the cancel took effect"
    else:
        message = "cancel requested; the job is stopping"
    return CancelJobResponse(job_id=job_id, status=status, message=message)


def _already_finished(job: JobSnapshot) -> ApiError:
    state = job.state
    return ApiError(
        ErrorCode.JOB_ALREADY_FINISHED, f"job {state.job_id} already finished as {state.status.value}",
        {"jobId": state.job_id, "status": state.status.value},
    )


@router.get("/{job_id}/logs", response_model=JobLogs)
async def get_job_logs(job: JobDep, db: DatabaseDep) -> JobLogs:
    return JobLogs(job_id=job.state.job_id, events=await db.run(_job_events, job.state.job_id))


def _job_events(session: Session, job_id: str) -> list[JobEvent]:
    return [JobEvent(at=as_utc(row.at), kind=row.kind, message=row.message, data=row.data)
            for row in list_events(session, job_id)]
