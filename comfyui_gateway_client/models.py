"""What the gateway answers, as the client returns it: the API's public JSON shapes, parsed.

These are the client's own models, written from the API's documented answers (README, /openapi.json), not the
server's internal ones: a client must keep working when the server adds a field, so unknown fields are ignored,
and a code or status the client does not know yet stays a plain string.
"""

from __future__ import annotations

import base64
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class BatchStatus(str, Enum):
    queued = "queued"
    running = "running"
    completed = "completed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (BatchStatus.completed, BatchStatus.cancelled)


class JobError(ApiModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class JobWarning(ApiModel):
    code: str
    message: str
    since: datetime


class OutputFile(ApiModel):
    filename: str
    storage_path: str
    url: str
    size: int
    sha256: str
    content_type: str
    node_id: str
    animated: bool = False


class JobTiming(ApiModel):
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    execution_time_ms: int | None = None


class WebhookStatus(ApiModel):
    delivered: bool = False
    attempts: int = 0
    last_status: int | None = None


class Job(ApiModel):
    """`GET /jobs/{jobId}`. `workflow_id` is the template's id (the API calls templates workflows)."""

    job_id: str
    status: JobStatus
    workflow_id: str | None = None
    template_version: int | None = None
    seed: int | None = None
    progress: int = 0
    current_node: str | None = None
    queue_position: int | None = None
    eta_seconds: float | None = None
    priority: int = 3
    attempts: int = 0
    outputs: list[OutputFile] = Field(default_factory=list)
    error: JobError | None = None
    warning: JobWarning | None = None
    timing: JobTiming
    metadata: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = None
    webhook: WebhookStatus | None = None
    cache_hit: bool = False
    backend: str | None = None
    temporal_ui_url: str | None = None
    batch_id: str | None = None


class SubmittedJob(ApiModel):
    """`POST /jobs`'s 202."""

    job_id: str
    status: JobStatus
    eta_seconds: float | None = None
    poll_url: str
    cache_hit: bool = False
    temporal_ui_url: str | None = None


class JobPage(ApiModel):
    """A page of `GET /jobs` (or of a batch's jobs); `count` is how many jobs are on it."""

    jobs: list[Job]
    count: int


class CancelledJob(ApiModel):
    job_id: str
    status: JobStatus
    message: str


class LogEntry(ApiModel):
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class JobLogs(ApiModel):
    job_id: str
    events: list[LogEntry]


class OutputList(ApiModel):
    job_id: str
    files: list[OutputFile]


class Base64Output(ApiModel):
    """`GET /outputs/{jobId}/{filename}?format=base64`; `content` is the file's bytes."""

    filename: str
    content_type: str
    size: int
    data: str

    @property
    def content(self) -> bytes:
        return base64.b64decode(self.data)


class WorkflowSummary(ApiModel):
    id: str
    name: str
    description: str
    version: int


class Workflow(WorkflowSummary):
    """A workflow template, as `GET /workflows/{id}` shows it."""

    workflow_json: dict[str, Any]
    input_schema: dict[str, Any]
    json_schema: dict[str, Any] = Field(default_factory=dict)
    default_params: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    backend_tag: str | None = None
    created_at: datetime


class WorkflowChange(ApiModel):
    """The answer to registering or updating a template: the version now current, and what ComfyUI's node
    check warned about (node types it does not know, or that nothing was checked)."""

    workflow: Workflow
    warnings: list[str] = Field(default_factory=list)


class BatchCounts(ApiModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class BatchTiming(ApiModel):
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None


class Batch(ApiModel):
    batch_id: str
    status: BatchStatus
    workflow_id: str | None = None
    count: int
    counts: BatchCounts
    progress: int
    priority: int
    timing: BatchTiming
    metadata: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = None
    cancel_reason: str | None = None
    webhook: WebhookStatus | None = None
    temporal_ui_url: str | None = None


class SubmittedBatch(ApiModel):
    batch_id: str
    status: BatchStatus
    count: int
    poll_url: str
    temporal_ui_url: str | None = None


class CancelledBatch(ApiModel):
    batch_id: str
    status: BatchStatus
    message: str


class Reachability(ApiModel):
    reachable: bool
    url: str | None = None
    address: str | None = None


class Health(ApiModel):
    """`GET /health`, whether it answered 200 or 503: `ok` says which."""

    ok: bool
    version: str
    comfyui: Reachability
    backends: dict[str, Reachability] = Field(default_factory=dict)
    temporal: Reachability
    uptime: float
    checked_at: datetime


class Capabilities(ApiModel):
    workflows: list[str]
    max_size: int
    max_batch: int
    formats: list[str]
    output_formats: list[str]
    storage_provider: str


class Event(ApiModel):
    """One Server-Sent Event of a job's (or a batch's) stream: `event` is its status at that moment, `data` the
    fields that changed since the stream's previous event (the first event of a stream carries them all)."""

    event: str
    id: str
    data: dict[str, Any]
