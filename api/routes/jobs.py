"""Jobs: submit, read, list, cancel, and the job's event log."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Iterator
from contextlib import suppress
from datetime import datetime, timedelta, timezone
from itertools import islice
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from sqlmodel import Session
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import Priority as TaskQueuePriority
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import (
    DatabaseDep,
    JobDep,
    JobReaderDep,
    JobWaitsDep,
    PrincipalDep,
    RunTimesDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TemporalDep,
    TemporalUiDep,
    WaitDep,
)
from api.errors import DATABASE_ERRORS, ApiError, database_unavailable, invalid_input, validation_error
from api.http_server import step_aside
from api.database import Database
from api.job_reader import JobReader
from api.job_waits import JobWaits
from api.temporal_connection import TemporalConnection
from api.job_views import Job, public_job, public_job_off_loop
from api.json_body import JsonBodyRoute
from api.openapi import answers_with
from api.rate_limits import limit_principal
from api.request_ids import request_id_of
from app.audit import JOB_CANCEL, record_audit
from app.auth import Principal
from app.comfy.backends import backend_task_queue, configured_backends
from app.db import as_utc
from app.errors import CLIENT_RETRYABLE_CODES, ErrorCode, InvalidInput
from app.idempotency import MAX_KEY_LENGTH, idempotent_job_id, request_fingerprint
from app.images.load_image import find_load_image_sources
from app.jobstore import (
    JobFilter,
    JobSnapshot,
    count_unfinished_jobs,
    get_job_snapshot,
    list_events,
    list_jobs,
    request_fingerprint_of,
)
from app.metrics import CACHE_HITS, CACHE_MISSES
from app.priorities import Priority
from app.queue_estimates import InLine, MeanRunTimes, QueueEstimate, estimate, without_database
from app.models import (
    DEFAULT_OUTPUT_QUALITY,
    DEFAULT_PRIORITY,
    MAX_JOB_TIMEOUT_SECONDS,
    CachedResult,
    CamelModel,
    CancelRequest,
    GenerationInput,
    JobState,
    JobStatus,
    LiveProgress,
    OutputFormat,
    RenderPromptResult,
    RetrySpec,
    accepted_state,
)
from app.redaction import free_texts
from app.retention import link_job_inputs
from app.result_cache import cache_key, find_cached_result
from app.safe_http import RefusedTarget
from app.settings import Settings
from app.storage import OutputStorage, StorageError
from app.submission import ImageIntake, PreparedJob, prepare_job
from app.tables import TemplateRow
from app.temporal_endings import started_input
from app.temporal_ui import TemporalUi
from app.templates.limits import Limits
from app.templates.registry import TEMPLATE_ID_MAX_LENGTH
from app.templates.rendering import ApiFormatGraph
from app.templates.store import get_template
from app.webhooks.events import TERMINAL_EVENTS
from app.webhooks.targets import check_callback_url
from workflows_temporal.generation import GenerationWorkflow

log = logging.getLogger(__name__)
T = TypeVar("T")

router = APIRouter(
    prefix="/jobs", tags=["jobs"], route_class=JsonBodyRoute, dependencies=[Depends(limit_principal)])

# Temporal refuses payloads over 2 MB; a job near that belongs in a template, its images in URLs or storage.
_MAX_JOB_BYTES = 1_000_000
_MAX_METADATA_BYTES = 16_000
# How long `POST /jobs/{id}/cancel` waits for the workflow to finish cancelling before it answers.
_CANCEL_WAIT_SECONDS = 10.0
_MAX_CALLBACK_URL_LENGTH = 2048

WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "job.progress"]
# How long `POST /jobs` waits for a cache hit's workflow to finish (it only records the result) before it
# answers with the status the job has then.
_CACHE_HIT_WAIT_SECONDS = 10.0
# The idempotency key a client may give in its metadata when it cannot set a header.
_REQUEST_ID = "requestId"


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


def _with_time_zone(value: datetime) -> datetime:
    # A time without an offset names no instant (the client's local time? the server's?): guessing UTC would
    # shift a filter by the client's offset without a word.
    if value.utcoffset() is None:
        raise ValueError("must be an ISO 8601 instant with a time zone, such as 2024-05-01T12:00:00Z or "
                         "2024-05-01T14:00:00+02:00")
    return value


Instant = Annotated[datetime, BeforeValidator(_iso_8601), AfterValidator(_with_time_zone)]


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
    timeout_seconds: float | None = Field(
        None, gt=0, description=f"the job's time limit on ComfyUI, counted from when its prompt starts; at most "
                                f"MAX_JOB_TIMEOUT_S (by default {MAX_JOB_TIMEOUT_SECONDS}); defaults to COMFYUI_TIMEOUT_MS")
    output_format: OutputFormat = Field(
        OutputFormat.png, description="what still images are stored as; animated images and videos stay as they are")
    quality: int = Field(
        DEFAULT_OUTPUT_QUALITY, ge=1, le=100, description="jpg and webp encoding quality; png is lossless and ignores it")
    backend_tag: str | None = Field(
        None, max_length=32, description="run only on a ComfyUI backend with this tag (COMFYUI_URLS); one tag per "
                                         "job; default any backend")
    priority: Priority = DEFAULT_PRIORITY

    _numbers = field_validator("timeout_seconds", "quality", mode="before")(_json_number)

    @model_validator(mode="after")
    def _one_workflow(self) -> "CreateJobRequest":
        if (self.workflow_id is None) == (self.workflow_json is None):
            raise ValueError("give exactly one of workflowId and workflowJson")
        return self


class CreateJobResponse(CamelModel):
    job_id: str
    status: JobStatus = Field(description="`succeeded` at once for a result cache hit; a repeat of an idempotency "
                                          "key answers with its job's status now")
    eta_seconds: float | None = Field(description="seconds until the job should be done, as `GET /jobs/{jobId}` "
                                                  "estimates it; null when it has ended or nothing has run yet")
    poll_url: str
    cache_hit: bool = Field(False, description="the job took the outputs of an identical earlier job")
    temporal_ui_url: str | None = Field(
        None, description="the job's workflow history in the Temporal Web UI (TEMPORAL_UI_URL); null without one")


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


IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LENGTH,
    description="the same key (per caller) always names the same job: a repeat never runs it twice",
)]


@router.post("", status_code=202, response_model=CreateJobResponse, responses={200: {
    "model": Job, "description": "with `wait`: the job has ended (succeeded, failed or cancelled), as "
                                 "`GET /jobs/{jobId}` shows it"}})
@answers_with(
    ErrorCode.WEBHOOK_NOT_CONFIGURED, ErrorCode.WORKFLOW_NOT_FOUND, ErrorCode.IDEMPOTENCY_CONFLICT, ErrorCode.STORAGE_ERROR,
    ErrorCode.WORKFLOW_JSON_NOT_ALLOWED, ErrorCode.TOO_MANY_ACTIVE_JOBS,
)
async def create_job(
    body: CreateJobRequest,
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    temporal: TemporalDep,
    storage: StorageDep,
    reader: JobReaderDep,
    principal: PrincipalDep,
    waits: JobWaitsDep,
    wait: WaitDep,
    run_times: RunTimesDep,
    idempotency_key: IdempotencyKey = None,
) -> CreateJobResponse | JSONResponse:
    """With `wait`, `200` and the job as `GET /jobs/{jobId}` shows it once it has ended, or the `202` when
    the wait runs out first (its `status` then is the job's now)."""
    if wait is None:
        return await _submit(body, request, db, settings, run_times, temporal, storage, reader, principal,
                             idempotency_key)
    with waits.place():  # taken before the job is created: a refusal creates nothing
        accepted = await _submit(body, request, db, settings, run_times, temporal, storage, reader, principal,
                                 idempotency_key)
        job_id = accepted.job_id
        ended = accepted.status.is_terminal  # a cache hit, or a repeat of a key whose job has ended
        if not ended and wait:
            ended = await _wait_for_end(request, waits, temporal.require(), job_id, wait)
        # A job that has not ended is read from its row, never by a query of its live workflow, which would
        # wait for a worker (as `_state_now`).
        snapshot = await _unless_unanswered(
            job_id, "its answer after the wait",
            reader.read(job_id, reuse_live=False) if ended else db.run(get_job_snapshot, job_id), None)
        if snapshot is None:
            return accepted
        if snapshot.state.status.is_terminal:
            if snapshot.state.status is JobStatus.succeeded:
                run_times.succeeded(snapshot.state.template_id)
            job = await public_job_off_loop(snapshot, storage, TemporalUi.of(settings))
            return JSONResponse(job.model_dump(mode="json", by_alias=True))
        return await _accepted(db, settings, run_times, snapshot.state)


async def _wait_for_end(request: Request, waits: JobWaits, client: Client, job_id: str, seconds: float) -> bool:
    """Whether the job ended within `seconds`. While it waits, the request holds no place in the server's
    concurrency limit nor a read turn (api.http_server), and it stops waiting when its client goes away."""
    step_aside(request.scope)
    gone = asyncio.create_task(_disconnected(request))
    try:
        return await waits.until_closed(client, job_id, seconds, gone)
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: once the body is read, the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_timeout(body: CreateJobRequest, settings: Settings) -> None:
    # The maximum is a setting, so it is checked here rather than in the request model's schema.
    if body.timeout_seconds is not None and body.timeout_seconds > settings.max_job_timeout_s:
        raise validation_error([{"field": "timeoutSeconds",
                                 "message": f"at most {settings.max_job_timeout_s:g} (MAX_JOB_TIMEOUT_S)"}])


async def _submit(
    body: CreateJobRequest,
    request: Request,
    db: Database,
    settings: Settings,
    run_times: MeanRunTimes,
    temporal: TemporalConnection,
    storage: OutputStorage,
    reader: JobReader,
    principal: Principal,
    idempotency_key: str | None,
) -> CreateJobResponse:
    """The job created, or found by its idempotency key: the `202`'s body."""
    _check_raw_graph(body, settings, principal)
    check_webhook(body, settings)
    check_metadata(body.metadata)
    _check_timeout(body, settings)
    key = idempotency_key if idempotency_key is not None else _request_id(body.metadata)
    fingerprint = None
    if key is not None:
        # Scoped by the principal: two callers' keys never name the same job.
        job_id = idempotent_job_id(principal.id, key)
        fingerprint = request_fingerprint(body.model_dump(mode="json"))
        # A job recorded already answers without a template read or a render, even when Temporal no longer
        # holds its workflow (its namespace's retention has passed).
        if (recorded := await db.run(request_fingerprint_of, job_id)) is not None:
            snapshot, recorded_fingerprint = recorded
            _check_same_request(job_id, recorded_fingerprint, fingerprint)
            log.info("job %s: a repeat of its idempotency key", job_id, extra={"job_id": job_id})
            return await _accepted(db, settings, run_times, snapshot.state)
    else:
        job_id = str(uuid.uuid4())
    await check_active_jobs(principal, db, settings)  # after a repeat's answer: a repeat starts nothing

    template = await find_template(db, body.workflow_id) if body.workflow_id is not None else None
    images = image_intake(request, db, storage, settings, job_id)
    try:
        prepared = await prepare_job(
            template=template, workflow_json=body.workflow_json, given={**body.params, **body.inputs},
            limits=Limits.of_settings(settings.max_image_size, settings.max_batch_size), images=images,
        )
    except InvalidInput as error:
        raise invalid_input(error) from error
    except StorageError as error:
        raise ApiError(ErrorCode.STORAGE_ERROR, f"an inline image could not be stored: {error}") from error

    result_key = cache_key(
        template_id=body.workflow_id, template_version=template.version if template is not None else None,
        workflow_json=prepared.workflow_json, inputs=prepared.inputs, output_format=body.output_format.value,
        quality=None if body.output_format is OutputFormat.png else body.quality,  # png ignores quality
    ) if prepared.reproducible else None

    job = job_input(body, settings, principal, job_id, template, prepared, request_id_of(request.scope))
    job.cache_key = result_key
    job.cached_result = await _cached_result(db, storage, settings, result_key, principal.id)
    job.request_fingerprint = fingerprint
    # Under PRIVACY_MODE the prompt's activity also carries the job's free texts, to redact them (app.redaction).
    redacted = free_texts(job.inputs, job.workflow_json) if job.privacy_mode else []
    if len(job.model_dump_json()) + _json_size(redacted) > _MAX_JOB_BYTES:
        field = "workflowJson" if body.workflow_json is not None else "inputs"
        raise validation_error([{"field": field, "message": f"the job is larger than {_MAX_JOB_BYTES} bytes"}])
    if job.cached_result is None:
        # The prompt just rendered and checked goes with the job, so the workflow need not render it again; a
        # job too large to carry its prompt as well still runs, rendered by the worker as before.
        rendered = RenderPromptResult(prompt=prepared.prompt, image_sources=find_load_image_sources(prepared.prompt))
        if len(job.model_dump_json()) + _json_size(redacted) + len(rendered.model_dump_json()) <= _MAX_JOB_BYTES:
            job.rendered = rendered
    client = temporal.require()
    handle, closed = await _start(client, job, settings.temporal_task_queue)
    if key is not None:
        # This request's workflow, or one a repeat of the key started first: that one is the job.
        try:
            job = await started_input(client, handle)
        except RPCError as error:
            raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal could not say what the job is") from error
        _check_same_request(job_id, job.request_fingerprint, fingerprint)
    _log_submitted(job, request_id_of(request.scope))
    if key is None and job.cached_result is None:
        return await _accepted(db, settings, run_times, accepted_state(job))
    if job.cached_result is not None:
        # It only records the result: answered in moments, so the answer can truthfully be `succeeded`.
        with suppress(TimeoutError, WorkflowFailureError, RPCError):
            async with asyncio.timeout(_CACHE_HIT_WAIT_SECONDS):
                await handle.result()
    state = await _unless_unanswered(job.job_id, "its state now", _state_now(db, reader, job, closed),
                                     accepted_state(job))
    return await _accepted(db, settings, run_times, state)


async def find_template(db: Database, template_id: str) -> TemplateRow:
    """The template a job (or a batch) runs, at its latest version."""
    template = await db.run(get_template, template_id)
    if template is None:
        raise ApiError(ErrorCode.WORKFLOW_NOT_FOUND, f"no workflow template with id {template_id}",
                       {"workflowId": template_id})
    return template


def image_intake(
    request: Request, db: Database, storage: OutputStorage, settings: Settings, job_id: str
) -> ImageIntake:
    """Where the inline images of the job `job_id` go (app.submission)."""
    return ImageIntake(
        storage=storage, note_use=lambda keys: db.run(link_job_inputs, job_id, keys, datetime.now(timezone.utc)),
        http=request.app.state.http, max_bytes=settings.input_image_max_bytes,
        max_pixels=settings.input_image_max_pixels,
        allow_private_urls=settings.input_image_allow_private_urls,
    )


def _log_submitted(job: GenerationInput, request_id: str | None) -> None:
    """The job's first line: a started job's, or a repeat's, which names the request that created the job."""
    fields = {"job_id": job.job_id, "template_id": job.template_id}
    if job.request_id is not None and job.request_id != request_id:
        log.info("job %s: a repeat of its idempotency key; request %s created it", job.job_id, job.request_id,
                 extra=fields)
    else:
        log.info("job %s submitted%s", job.job_id, " (a result cache hit)" if job.cached_result else "", extra=fields)


def job_input(
    body: CreateJobRequest, settings: Settings, principal: Principal, job_id: str, template: TemplateRow | None,
    prepared: PreparedJob, request_id: str | None,
) -> GenerationInput:
    """The workflow's input for a job whose request has been checked and prepared (`prepare_job`); without the
    result cache's parts. Shared with `POST /batches`, whose items are jobs made alike."""
    backend = configured_backends(settings)[0]  # what a worker from before the fleet runs the job on
    backend_tag = body.backend_tag or (template.backend_tag if template is not None else None)
    _check_backend_tag(backend_tag, settings)
    return GenerationInput(
        job_id=job_id,
        template_id=body.workflow_id,
        template_version=template.version if template is not None else None,
        workflow_json=prepared.workflow_json,
        inputs=prepared.inputs,
        metadata=body.metadata,
        retry=RetrySpec.model_validate(body.retry.model_dump()),
        timeout_seconds=body.timeout_seconds or settings.job_timeout_seconds,
        max_timeout_seconds=settings.max_job_timeout_s,
        heartbeat_timeout_seconds=settings.comfyui_heartbeat_timeout_s,
        backend=backend.id,
        backend_task_queue=backend_task_queue(settings, backend.id),
        backend_tag=backend_tag,
        created_at=datetime.now(timezone.utc),
        privacy_mode=settings.privacy_mode,
        callback_url=body.callback_url,
        webhook_events=list(dict.fromkeys(body.webhook_events or TERMINAL_EVENTS)),
        output_format=body.output_format,
        output_quality=body.quality,
        owner=principal.id,
        priority=body.priority,
        request_id=request_id,
    )


async def _cached_result(
    db: Database, storage: OutputStorage, settings: Settings, key: str | None, owner: str
) -> CachedResult | None:
    """The result cache's answer for a cacheable job (a key) of `owner`, counted as a hit or a miss."""
    if not settings.cache_enabled or key is None:
        return None
    since = datetime.now(timezone.utc) - timedelta(seconds=settings.cache_ttl_seconds)
    cached = await db.run(find_cached_result, storage, key, owner, since)
    (CACHE_HITS if cached is not None else CACHE_MISSES).inc()
    return cached


def _request_id(metadata: dict[str, Any]) -> str | None:
    """`metadata.requestId`, the idempotency key of a client that cannot set the header."""
    value = metadata.get(_REQUEST_ID)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise validation_error([{
            "field": f"metadata.{_REQUEST_ID}",
            "message": f"an idempotency key: a string of 1 to {MAX_KEY_LENGTH} characters",
        }])
    return value


def _check_same_request(job_id: str, recorded: str | None, fingerprint: str | None) -> None:
    if recorded != fingerprint:
        raise ApiError(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "this idempotency key was used for a different request; use a new key for a new job",
            {"jobId": job_id},
        )


async def _start(client: Client, job: GenerationInput, task_queue: str) -> tuple[WorkflowHandle[Any, JobState], bool]:
    """Start the job's workflow, or find the one its id names: a repeat of an idempotency key, concurrent
    (USE_EXISTING) or after the job ended (REJECT_DUPLICATE: a job id never runs twice). Also says whether
    the workflow found had closed."""
    try:
        handle = await client.start_workflow(
            GenerationWorkflow.run,
            job,
            id=job.job_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            # Its workflow tasks too: under load a high-priority job's start is not queued behind a flood.
            priority=TaskQueuePriority(priority_key=job.priority, fairness_key=job.owner),
        )
    except WorkflowAlreadyStartedError:
        return client.get_workflow_handle_for(GenerationWorkflow.run, job.job_id), True
    except RPCError as error:
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal refused the job; nothing was created") from error
    return handle, False


async def _state_now(db: Database, reader: JobReader, job: GenerationInput, closed: bool) -> JobState:
    """The job as its row says (written at each status change), else as it was accepted; never a query of a
    live workflow, which would wait for a worker. Only a closed workflow whose row is gone is asked."""
    recorded = await db.run(get_job_snapshot, job.job_id)
    if recorded is not None:
        return recorded.state
    if closed:
        return (await reader.read(job.job_id, reuse_live=False)).state
    return accepted_state(job)


async def _accepted(db: Database, settings: Settings, run_times: MeanRunTimes, state: JobState) -> CreateJobResponse:
    job_id = state.job_id
    eta = None
    if not state.status.is_terminal:
        in_line = await _unless_unanswered(
            job_id, "its ETA", _in_line(db, settings, run_times, JobSnapshot(state, LiveProgress())), None)
        eta = in_line.eta_seconds if in_line is not None else None
    return CreateJobResponse(job_id=job_id, status=state.status, eta_seconds=eta, poll_url=f"/jobs/{job_id}",
                             cache_hit=state.cache_hit, temporal_ui_url=TemporalUi.of(settings).workflow_url(job_id))


async def _unless_unanswered(job_id: str, what: str, answer: Awaitable[T], otherwise: T) -> T:
    """`answer`, or `otherwise` when the database or Temporal cannot answer now. For what a submission reads once
    its job exists (its workflow has started): the fault costs the answer `what`, never the job's 202, which a
    503 would have the client send again as a second job."""
    try:
        return await answer
    except ApiError as error:
        if error.code is not ErrorCode.TEMPORAL_UNAVAILABLE:
            raise
        who = "Temporal"
    except DATABASE_ERRORS as error:
        if not database_unavailable(error):
            raise
        who = "the database"
    log.warning("job %s: %s did not answer for %s; the job is accepted without it", job_id, who, what,
                extra={"job_id": job_id})
    return otherwise


def _check_raw_graph(body: CreateJobRequest, settings: Settings, principal: Principal) -> None:
    """Operators of shared GPUs let only some roles send arbitrary graphs (RAW_WORKFLOW_ROLES)."""
    if body.workflow_json is not None and principal.role not in settings.raw_workflow_roles:
        raise ApiError(
            ErrorCode.WORKFLOW_JSON_NOT_ALLOWED,
            f"workflowJson: the role {principal.role.value} may not submit a raw graph here; run a template by "
            "workflowId", {"field": "workflowJson", "role": principal.role.value},
        )


async def check_active_jobs(principal: Principal, db: Database, settings: Settings, adding: int = 1) -> None:
    """MAX_ACTIVE_JOBS_PER_PRINCIPAL, for `adding` jobs more (a batch's items). A job's row is written by its workflow a moment after it starts, so
    submissions that come together may pass this check before any of their rows exists: a burst can
    overshoot the cap by about as many requests as arrive in that moment."""
    cap = settings.max_active_jobs_per_principal
    if cap is None:
        return
    if (active := await db.run(count_unfinished_jobs, principal.id)) + adding > cap:
        raise ApiError(ErrorCode.TOO_MANY_ACTIVE_JOBS,
                       f"{active} of your jobs are queued or running, the most allowed at once ({cap}); "
                       "submit again when one has finished", {"active": active, "limit": cap})


def _check_backend_tag(backend_tag: str | None, settings: Settings) -> None:
    """The job's tag (its own, else its template's) must be one a backend has: else the job would wait forever."""
    tags = {tag for backend in configured_backends(settings) for tag in backend.tags}
    if backend_tag is not None and backend_tag not in tags:
        known = ", ".join(sorted(tags)) or "none"
        raise validation_error([{"field": "backendTag",
                                 "message": f"no ComfyUI backend has this tag (tags: {known})"}])


def check_metadata(metadata: dict[str, Any]) -> None:
    if _json_size(metadata) > _MAX_METADATA_BYTES:
        raise validation_error([{"field": "metadata", "message": f"larger than {_MAX_METADATA_BYTES} bytes"}])


def check_webhook(body: CreateJobRequest, settings: Settings) -> None:
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
    if unsafe := list(islice(_unsafe_integers(body.metadata, "metadata"), 10)):
        raise validation_error([
            {"field": path, "message": f"integers beyond ±{_MAX_SAFE_INTEGER} do not survive a JavaScript receiver's "
                                       "parse of the webhook (its signature check would fail): send it as a string"}
            for path in unsafe
        ])


# Number.MAX_SAFE_INTEGER: the largest integer every JavaScript receiver (n8n) parses exactly.
_MAX_SAFE_INTEGER = 2**53 - 1


def _unsafe_integers(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _unsafe_integers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _unsafe_integers(item, f"{path}[{index}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_SAFE_INTEGER:
        yield path


@router.get("", response_model=JobList)
def get_jobs(
    session: SessionDep,
    storage: StorageDep,
    ui: TemporalUiDep,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    workflow_id: Annotated[str | None, Query(alias="workflowId")] = None,
    batch_id: Annotated[str | None, Query(alias="batchId", max_length=64, description="a batch's item jobs")] = None,
    after: Instant | None = Query(None, description="created after this instant (ISO 8601)"),
    before: Instant | None = Query(None, description="created before this instant (ISO 8601)"),
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000_000),
) -> JobList:
    """Every job for an admin; a user's own jobs for a user."""
    owner = None if principal.is_admin else principal.id
    jobs, count = list_jobs(
        session,
        JobFilter(status=status, template_id=workflow_id, batch_id=batch_id, created_after=after, created_before=before,
                  owner=owner, limit=limit, offset=offset),
    )
    return JobList(jobs=[public_job(job, storage, ui) for job in jobs], count=count)


@router.get("/{job_id}", response_model=Job)
async def get_job(
    job: JobDep, storage: StorageDep, ui: TemporalUiDep, request: Request, reader: JobReaderDep,
    temporal: TemporalDep, waits: JobWaitsDep, wait: WaitDep, db: DatabaseDep, settings: SettingsDep,
    run_times: RunTimesDep,
) -> Job:
    """With `wait`, the job once it has ended, or as it is when the wait runs out: 200 both ways, and its
    `status` says which (`succeeded`, `failed`, `cancelled`: ended; `queued`, `running`: not yet)."""
    if wait and not job.state.status.is_terminal:
        client = temporal.require()
        with waits.place():
            ended = await _wait_for_end(request, waits, client, job.state.job_id, wait)
            job = await reader.read(job.state.job_id, reuse_live=not ended)
    if job.state.status is JobStatus.succeeded:
        run_times.succeeded(job.state.template_id)
    in_line = None if job.state.status.is_terminal else await _in_line(db, settings, run_times, job)
    return await public_job_off_loop(job, storage, ui, in_line)


async def _in_line(db: Database, settings: Settings, run_times: MeanRunTimes, job: JobSnapshot) -> QueueEstimate:
    in_line, now = InLine.of(job.state, job.live), datetime.now(timezone.utc)
    # A running job's estimate, its run time known, is worked out here: no worker thread, no session.
    if (known := without_database(in_line, run_times, now)) is not None:
        return known
    return await db.run(estimate, in_line, configured_backends(settings), now, run_times)


@router.post("/{job_id}/cancel", response_model=CancelJobResponse)
@router.delete("/{job_id}", response_model=CancelJobResponse, description=(
    "Cancels the job exactly as `POST /jobs/{job_id}/cancel` does, with the same optional body, answers and "
    "rules: for management clients that cancel a job by deleting it. Its record stays, as `cancelled`."))
@answers_with(ErrorCode.JOB_ALREADY_FINISHED)
async def cancel_job(
    job: JobDep,
    reader: JobReaderDep,
    temporal: TemporalDep,
    db: DatabaseDep,
    principal: PrincipalDep,
    body: Annotated[CancelJobBody | None, Body()] = None,
) -> CancelJobResponse:
    job_id = job.state.job_id
    if job.state.status.is_terminal:
        raise _already_finished(job)
    reason = body.reason if body else ""
    handle = temporal.require().get_workflow_handle(job_id)
    try:
        # The who and why by signal (its payload, encrypted with ENCRYPTION_KEYS, unlike a cancellation's reason),
        # then Temporal's own cancellation, which stops the job so that the Web UI shows its workflow as Canceled.
        # A retry of a cancel that failed between the two sends both again: the second signal changes nothing.
        await handle.signal(GenerationWorkflow.cancel,
                            CancelRequest(reason=reason, actor=principal.id, temporal_cancel_follows=True))
    except RPCError as error:
        job = await reader.read(job_id, reuse_live=False)
        if job.state.status.is_terminal:
            raise _already_finished(job) from error
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal did not take the cancel; try again") from error
    try:
        await handle.cancel(reason=f"cancelled through the gateway's API by {principal.id}")
    except RPCError as error:
        # The workflow took the signal, so the job was live: if it has ended since (Temporal answers NOT_FOUND for
        # a closed workflow), the answer below says how, as it does for a job that ends while the cancel runs.
        if not (await reader.read(job_id, reuse_live=False)).state.status.is_terminal:
            raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal did not take the cancel; try again") from error
    if job.state.owner != principal.id:  # only an admin reaches another's job (JobDep)
        await db.run(record_audit, principal, JOB_CANCEL, job_id, {"owner": job.state.owner, "reason": reason})
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
