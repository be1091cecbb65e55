"""The public shape of a job (`GET /jobs/{id}`, lists, outputs), mapped from the workflow's state and the
job's live progress. Output URLs are made here, at read time, by the storage provider: for local storage
the API's own route, and never frozen into workflow history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field
from starlette.concurrency import run_in_threadpool

from app.jobstore import JobSnapshot
from app.models import DEFAULT_PRIORITY, CamelModel, JobError, JobStatus, JobWarning, OutputRef, WebhookStatus
from app.output_routes import output_route
from app.queue_estimates import QueueEstimate
from app.storage import OutputStorage
from app.temporal_ui import TemporalUi


class OutputFile(CamelModel):
    filename: str
    storage_path: str = Field(
        description="where the file is stored: its key under STORAGE_LOCAL_PATH, or s3://bucket/key")
    url: str = Field(description="where to download it: the gateway's /outputs route, or (S3) a presigned URL made "
                                 "when the job was read, valid for S3_PRESIGN_EXPIRY_S")
    size: int
    sha256: str
    content_type: str
    node_id: str
    animated: bool = False


class JobTiming(CamelModel):
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    execution_time_ms: int | None = None


class Job(CamelModel):
    job_id: str
    status: JobStatus
    # The contract calls the template id `workflowId`; it is not Temporal's workflow id (that is job_id).
    workflow_id: str | None = None
    template_version: int | None = None
    seed: int | None = Field(None, description="the seed the job ran with, to reproduce it")
    progress: int = 0
    current_node: str | None = None
    queue_position: int | None = Field(
        None, description="jobs ahead of it (0 = running): while it waits for a slot, the prompts in ComfyUI plus "
                          "the jobs Temporal starts before it (higher priority, owners' turns, first come); in "
                          "ComfyUI's queue, its place there; null while it is placed with nothing known ahead. "
                          "`GET /jobs/{jobId}` counts it; lists show only a place in ComfyUI's queue")
    eta_seconds: float | None = Field(
        None, description="seconds until it should be done (`GET /jobs/{jobId}` of a live job): the work ahead "
                          "per slot plus its own run time, from recent run times per template; null when ended or "
                          "when nothing has run yet to time it by")
    priority: int = Field(DEFAULT_PRIORITY, description="1 (highest) to 5 (lowest), as submitted; 3 is normal")
    attempts: int = 0
    outputs: list[OutputFile] = Field(default_factory=list)
    error: JobError | None = None
    warning: JobWarning | None = Field(None, description="why a live job is waiting; cleared when it runs again")
    timing: JobTiming
    metadata: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = Field(
        None, description="the principal that submitted the job (`anonymous` in open mode); null for jobs from "
                          "before authentication")
    webhook: WebhookStatus | None = Field(
        None, description="how the job's webhook (its final event's) has fared; null without a callbackUrl or "
                          "before its first attempt. Never changes the job's status")
    cache_hit: bool = Field(False, description="the job took the outputs of an identical earlier job; nothing ran")
    backend: str | None = Field(None, description="the ComfyUI backend its prompt was placed on (COMFYUI_URLS "
                                                  "names); null until placed")
    temporal_ui_url: str | None = Field(
        None, description="the job's workflow history in the Temporal Web UI (TEMPORAL_UI_URL); null without one")
    batch_id: str | None = Field(None, description="the batch the job is an item of (POST /batches); null for a job "
                                                   "submitted on its own")


def output_file(job_id: str, output: OutputRef, storage: OutputStorage) -> OutputFile:
    return OutputFile(
        filename=output.filename, storage_path=storage.location(output.storage_key),
        url=storage.download_url(output.storage_key, output_route(job_id, output.filename)),
        size=output.size, sha256=output.sha256, content_type=output.content_type, node_id=output.node_id,
        animated=output.animated,
    )


def public_job(
    snapshot: JobSnapshot, storage: OutputStorage, ui: TemporalUi, in_line: QueueEstimate | None = None
) -> Job:
    """`in_line`: where the live job stands (app.queue_estimates); without it, only its place in ComfyUI's queue."""
    state, live = snapshot.state, snapshot.live
    finished = state.status.is_terminal
    queue_position = live.queue_position if in_line is None else in_line.position
    return Job(
        job_id=state.job_id,
        status=state.status,
        workflow_id=state.template_id,
        template_version=state.template_version,
        seed=state.seed,
        progress=100 if state.status is JobStatus.succeeded else live.percent,
        current_node=None if finished else live.node,
        queue_position=None if finished else queue_position,
        eta_seconds=None if finished or in_line is None else in_line.eta_seconds,
        priority=state.priority,
        attempts=state.attempts,
        outputs=[output_file(state.job_id, output, storage) for output in state.outputs],
        error=state.error,
        warning=None if finished else live.warning,
        timing=JobTiming(
            created_at=state.created_at, started_at=state.started_at, completed_at=state.completed_at,
            execution_time_ms=state.execution_time_ms,
        ),
        metadata=state.metadata,
        owner=state.owner,
        webhook=snapshot.webhook,
        cache_hit=state.cache_hit,
        backend=state.backend,
        temporal_ui_url=ui.workflow_url(state.job_id),
        batch_id=state.batch_id,
    )


async def public_job_off_loop(
    snapshot: JobSnapshot, storage: OutputStorage, ui: TemporalUi, in_line: QueueEstimate | None = None
) -> Job:
    """public_job, on a thread when the store signs its URLs with its SDK (boto3 is not for the event loop)."""
    if storage.signs_urls:
        return await run_in_threadpool(public_job, snapshot, storage, ui, in_line)
    return public_job(snapshot, storage, ui, in_line)
