"""Batches: submit many jobs of one template as one unit, read their progress, list their jobs, cancel them.

Every item is checked at submit as `POST /jobs` checks a job (the same pipeline, app.submission, and the same
checks of the job route): a bad item is a 400 naming `items[i].<field>`, and then nothing is started. The
batch is one BatchWorkflow (workflows_temporal.batch), which runs each item as an ordinary job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import suppress
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import ConfigDict, Field
from sqlmodel import Session
from temporalio.client import WorkflowFailureError, WorkflowQueryFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from api.database import Database
from api.deps import DatabaseDep, PrincipalDep, SettingsDep, StorageDep, TemporalDep, TemporalUiDep, may_see
from api.errors import ApiError, validation_error
from api.job_views import Job, public_job
from api.json_body import JsonBodyRoute
from api.openapi import answers_with
from api.rate_limits import limit_principal
from api.request_ids import request_id_of
from api.routes.jobs import (
    CreateJobRequest,
    check_active_jobs,
    check_metadata,
    check_webhook,
    find_template,
    image_intake,
    job_input,
)
from api.temporal_connection import TemporalConnection
from app.temporal_ui import TemporalUi
from app.audit import BATCH_CANCEL, record_audit
from app.batch_store import batch_state, get_batch, item_rows
from app.batches import BatchCounts, BatchInput, BatchItem, BatchState, BatchStatus, ended_counts, item_job_id
from app.errors import ErrorCode, InvalidInput
from app.jobstore import JobFilter, list_jobs
from app.models import DEFAULT_PRIORITY, CamelModel, CancelRequest, JobStatus, WebhookStatus
from app.priorities import Priority
from app.storage import StorageError
from app.submission import PreparedJob, prepare_job
from app.templates.limits import Limits
from app.templates.registry import TEMPLATE_ID_MAX_LENGTH
from workflows_temporal.batch import BatchWorkflow

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/batches", tags=["batches"], route_class=JsonBodyRoute, dependencies=[Depends(limit_principal)])

# Temporal refuses payloads over 2 MB: the batch's workflow input (its items' inputs, its shared job) stays below.
_MAX_BATCH_BYTES = 1_500_000
# How long `POST /batches/{id}/cancel` waits for the batch's workflow to end before it answers.
_CANCEL_WAIT_SECONDS = 10.0
# Items checked between two turns of the event loop (an item takes about 0.2 ms to check).
_ITEMS_PER_TURN = 50
# Items, in the request body's own limit; MAX_BATCH_ITEMS (at most this) is the operator's.
_ITEMS_LIMIT = 10_000


class CreateBatchRequest(CamelModel):
    model_config = ConfigDict(
        extra="forbid", validate_by_name=False,  # camelCase only, as documented
        json_schema_extra={"examples": [{"workflowId": "solid_color", "items": [{"color": 255}, {"color": 65280}],
                                         "priority": "low"}]},
    )

    workflow_id: str = Field(max_length=TEMPLATE_ID_MAX_LENGTH, description="the registered template every item runs")
    items: list[dict[str, Any]] = Field(
        min_length=1, max_length=_ITEMS_LIMIT,
        description="each item's inputs (as a job's `inputs`), one job per item; at most MAX_BATCH_ITEMS")
    priority: Priority = DEFAULT_PRIORITY
    callback_url: str | None = Field(
        None, max_length=2048,
        description="where the batch's one signed webhook, batch.completed, is posted when every item has ended")
    metadata: dict[str, Any] = Field(default_factory=dict, description="echoed back with the batch and each item job")


class CreateBatchResponse(CamelModel):
    batch_id: str
    status: BatchStatus
    count: int
    poll_url: str
    temporal_ui_url: str | None = Field(
        None, description="the batch's workflow history in the Temporal Web UI (TEMPORAL_UI_URL); null without one")


class BatchTiming(CamelModel):
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None


class Batch(CamelModel):
    batch_id: str
    status: BatchStatus
    workflow_id: str | None = None
    count: int = Field(description="the batch's items")
    counts: BatchCounts = Field(description="its items by status; items not started yet count as queued (as "
                                            "cancelled once the batch is cancelled)")
    progress: int = Field(description="0–100: the items' progress, an ended item counting 100")
    priority: int
    timing: BatchTiming
    metadata: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = None
    cancel_reason: str | None = Field(None, description="by whom and why the batch was cancelled")
    webhook: WebhookStatus | None = Field(None, description="how its batch.completed webhook has fared")
    temporal_ui_url: str | None = Field(
        None, description="the batch's workflow history in the Temporal Web UI (TEMPORAL_UI_URL); null without one")


class BatchJobs(CamelModel):
    jobs: list[Job]
    count: int


class CancelBatchBody(CamelModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=False)

    reason: str = Field("", max_length=500)


class CancelBatchResponse(CamelModel):
    batch_id: str
    status: BatchStatus
    message: str


@router.post("", status_code=202, response_model=CreateBatchResponse)
@answers_with(ErrorCode.WEBHOOK_NOT_CONFIGURED, ErrorCode.WORKFLOW_NOT_FOUND, ErrorCode.STORAGE_ERROR,
              ErrorCode.TOO_MANY_ACTIVE_JOBS, ErrorCode.TEMPORAL_UNAVAILABLE)
async def create_batch(
    body: CreateBatchRequest, request: Request, db: DatabaseDep, settings: SettingsDep, temporal: TemporalDep,
    storage: StorageDep, principal: PrincipalDep, ui: TemporalUiDep,
) -> CreateBatchResponse:
    if len(body.items) > settings.max_batch_items:
        raise validation_error([{"field": "items", "message": f"at most {settings.max_batch_items} items"}])
    # The shared part of every item's job, checked as a job's request is.
    shared = CreateJobRequest.model_validate({"workflowId": body.workflow_id, "metadata": body.metadata})
    check_webhook(CreateJobRequest.model_validate(
        {"workflowId": body.workflow_id, "metadata": body.metadata, "callbackUrl": body.callback_url}), settings)
    check_metadata(body.metadata)
    await check_active_jobs(principal, db, settings, adding=len(body.items))
    template = await find_template(db, body.workflow_id)

    batch_id = str(uuid.uuid4())
    limits = Limits.of_settings(settings.max_image_size, settings.max_batch_size)
    prepared: list[PreparedJob] = []
    issues: list[dict[str, str]] = []
    for index, given in enumerate(body.items):
        if index and index % _ITEMS_PER_TURN == 0:
            await asyncio.sleep(0)  # checking 1,000 items takes a few hundred ms: other requests get their turns
        job_id = item_job_id(batch_id, index)
        try:
            prepared.append(await prepare_job(
                template=template, workflow_json=None, given=given, limits=limits,
                images=image_intake(request, db, storage, settings, job_id)))
        except InvalidInput as error:
            issues += [{"field": _item_field(index, issue.field), "message": issue.message} for issue in error.issues]
        except StorageError as error:
            raise ApiError(ErrorCode.STORAGE_ERROR, f"items[{index}]: an inline image could not be stored: {error}",
                           {"field": f"items[{index}]"}) from error
    if issues:
        raise validation_error(issues)

    job = job_input(shared, settings, principal, batch_id, template, prepared[0], request_id_of(request.scope))
    job.inputs, job.priority = {}, body.priority  # each item's inputs are its own
    batch = BatchInput(
        batch_id=batch_id, job=job,
        items=[BatchItem(job_id=item_job_id(batch_id, index), inputs=item.inputs)
               for index, item in enumerate(prepared)],
        total=len(prepared), max_parallel=settings.batch_max_parallel, items_per_run=settings.batch_items_per_run,
        callback_url=body.callback_url, created_at=datetime.now(timezone.utc),
    )
    if len(batch.model_dump_json()) > _MAX_BATCH_BYTES:
        raise validation_error([{"field": "items", "message": f"the batch is larger than {_MAX_BATCH_BYTES} bytes; "
                                                              "split it into smaller batches"}])
    try:
        await temporal.require().start_workflow(
            BatchWorkflow.run, batch, id=batch_id, task_queue=settings.temporal_task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except RPCError as error:
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal refused the batch; nothing was created") from error
    log.info("batch %s submitted: %d jobs", batch_id, batch.total, extra={"batch_id": batch_id,
                                                                        "template_id": body.workflow_id})
    return CreateBatchResponse(batch_id=batch_id, status=BatchStatus.queued, count=batch.total,
                               poll_url=f"/batches/{batch_id}", temporal_ui_url=ui.workflow_url(batch_id))


def _item_field(index: int, field: str) -> str:
    """An item's field as the client wrote it: the item is the job's `inputs`."""
    name = field.removeprefix("inputs").removeprefix(".")
    return f"items[{index}]" + (f".{name}" if name else "")


@answers_with(ErrorCode.BATCH_NOT_FOUND, ErrorCode.TEMPORAL_UNAVAILABLE)
async def load_batch(batch_id: str, db: DatabaseDep, temporal: TemporalDep, principal: PrincipalDep) -> BatchState:
    """The batch, if the caller may see it; another's batch is the same 404 as no batch."""
    state = await read_batch(db, temporal, batch_id)
    if not may_see(principal, state.owner):
        raise _not_found(batch_id)
    return state


async def read_batch(db: Database, temporal: TemporalConnection, batch_id: str) -> BatchState:
    row = await db.run(get_batch, batch_id)
    return batch_state(row) if row is not None else await _accepted_batch(temporal, batch_id)


async def batch_json(db: Database, temporal: TemporalConnection, ui: TemporalUi, batch_id: str) -> dict[str, Any]:
    """The batch as `GET /batches/{id}` answers, JSON (what its event stream reads)."""
    view = await _view(db, await read_batch(db, temporal, batch_id), ui)
    return view.model_dump(mode="json", by_alias=True)


BatchDep = Annotated[BatchState, Depends(load_batch)]


async def _accepted_batch(temporal: TemporalConnection, batch_id: str) -> BatchState:
    """A batch accepted a moment ago, whose workflow has not written its row yet: as its workflow says."""
    try:
        return await temporal.require().get_workflow_handle(batch_id).query(BatchWorkflow.progress)
    except WorkflowQueryFailedError:
        raise _not_found(batch_id) from None  # a workflow of another kind (a job's) under this id
    except RPCError as error:
        if error.status is RPCStatusCode.NOT_FOUND:
            raise _not_found(batch_id) from None
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal could not answer for this batch") from error


def _not_found(batch_id: str) -> ApiError:
    return ApiError(ErrorCode.BATCH_NOT_FOUND, f"no batch with id {batch_id}", {"batchId": batch_id})


@router.get("/{batch_id}", response_model=Batch)
async def get_batch_view(batch: BatchDep, db: DatabaseDep, ui: TemporalUiDep) -> Batch:
    return await _view(db, batch, ui)


async def _view(db: Database, state: BatchState, ui: TemporalUi) -> Batch:
    row = await db.run(get_batch, state.batch_id)
    webhook = WebhookStatus.model_validate(row.webhook) if row is not None and row.webhook else None
    if state.status.is_terminal:
        counts, progress = ended_counts(state), 100
    else:
        counts, progress = await db.run(_live_counts, state)
    return Batch(
        batch_id=state.batch_id, status=state.status, workflow_id=state.template_id, count=state.total, counts=counts,
        progress=progress, priority=state.priority,
        timing=BatchTiming(created_at=state.created_at, started_at=state.started_at, completed_at=state.completed_at),
        metadata=state.metadata, owner=state.owner, cancel_reason=state.cancel_reason, webhook=webhook,
        temporal_ui_url=ui.workflow_url(state.batch_id),
    )


def _live_counts(session: Session, state: BatchState) -> tuple[BatchCounts, int]:
    """A live batch's counts and progress, from its items' rows (each written by its job's workflow); an item
    without a row yet is queued."""
    rows = item_rows(session, state.batch_id)
    by_status = rows.by_status
    without_row = max(0, state.total - sum(by_status.values()))
    counts = BatchCounts(
        queued=by_status.get(JobStatus.queued, 0) + without_row, running=by_status.get(JobStatus.running, 0),
        succeeded=by_status.get(JobStatus.succeeded, 0), failed=by_status.get(JobStatus.failed, 0),
        cancelled=by_status.get(JobStatus.cancelled, 0),
    )
    return counts, min(100, rows.progress_sum // max(1, state.total))


@router.get("/{batch_id}/jobs", response_model=BatchJobs)
async def get_batch_jobs(
    batch: BatchDep, db: DatabaseDep, storage: StorageDep, ui: TemporalUiDep,
    status: JobStatus | None = None,
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000_000),
) -> BatchJobs:
    """The batch's item jobs that have started, newest first, each as `GET /jobs/{jobId}` shows it."""
    jobs, count = await db.run(
        list_jobs, JobFilter(status=status, batch_id=batch.batch_id, limit=limit, offset=offset))
    return BatchJobs(jobs=[public_job(job, storage, ui) for job in jobs], count=count)


@router.post("/{batch_id}/cancel", response_model=CancelBatchResponse)
@answers_with(ErrorCode.BATCH_ALREADY_FINISHED)
async def cancel_batch(
    batch: BatchDep, db: DatabaseDep, temporal: TemporalDep, principal: PrincipalDep,
    body: Annotated[CancelBatchBody | None, Body()] = None,
) -> CancelBatchResponse:
    """Cancels every item not ended yet; items not started never start."""
    if batch.status.is_terminal:
        raise _already_finished(batch)
    handle = temporal.require().get_workflow_handle(batch.batch_id)
    try:
        await handle.signal(BatchWorkflow.cancel, CancelRequest(reason=body.reason if body else "", actor=principal.id))
    except RPCError as error:
        row = await db.run(get_batch, batch.batch_id)
        if row is not None and BatchStatus(row.status).is_terminal:
            raise _already_finished(batch_state(row)) from error
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal did not take the cancel; try again") from error
    if batch.owner != principal.id:  # only an admin reaches another's batch (load_batch)
        await db.run(record_audit, principal, BATCH_CANCEL, batch.batch_id,
                     {"owner": batch.owner, "reason": body.reason if body else ""})
    # The workflow's end, awaited (long-polled by Temporal) rather than polled for.
    with suppress(TimeoutError, WorkflowFailureError, RPCError):
        async with asyncio.timeout(_CANCEL_WAIT_SECONDS):
            await handle.result()
    row = await db.run(get_batch, batch.batch_id)
    status = BatchStatus(row.status) if row is not None else batch.status
    if status is BatchStatus.cancelled:
        message = "batch cancelled"
    elif status.is_terminal:
        message = f"the batch ended as {status.value} before the cancel took effect"
    else:
        message = "cancel requested; the batch's items are stopping"
    return CancelBatchResponse(batch_id=batch.batch_id, status=status, message=message)


def _already_finished(batch: BatchState) -> ApiError:
    return ApiError(ErrorCode.BATCH_ALREADY_FINISHED, f"batch {batch.batch_id} already ended as {batch.status.value}",
                    {"batchId": batch.batch_id, "status": batch.status.value})
