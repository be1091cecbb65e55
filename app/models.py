"""Shared I/O models: workflow, activity and signal inputs and results, and the job's public view.

No I/O here: workflows import this module through `imports_passed_through`. Everything travels through
Temporal with the pydantic data converter, and carries references (storage keys), never file bytes.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    """API shapes are camelCase on the wire; Python code uses snake_case names."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ErrorCode(str, Enum):
    """Stable error codes: clients branch on these, so they never change meaning."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    UNSUPPORTED_FIELD = "UNSUPPORTED_FIELD"
    WORKFLOW_NOT_FOUND = "WORKFLOW_NOT_FOUND"
    WORKFLOW_EXISTS = "WORKFLOW_EXISTS"
    WORKFLOW_CONFLICT = "WORKFLOW_CONFLICT"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_ALREADY_FINISHED = "JOB_ALREADY_FINISHED"
    JOB_CANCELLED = "JOB_CANCELLED"
    JOB_TERMINATED = "JOB_TERMINATED"
    OUTPUT_NOT_FOUND = "OUTPUT_NOT_FOUND"
    COMFYUI_UNREACHABLE = "COMFYUI_UNREACHABLE"
    COMFYUI_OOM = "COMFYUI_OOM"
    COMFYUI_NODE_ERROR = "COMFYUI_NODE_ERROR"
    COMFYUI_TIMEOUT = "COMFYUI_TIMEOUT"
    COMFYUI_INTERRUPTED = "COMFYUI_INTERRUPTED"
    COMFYUI_PROTOCOL_ERROR = "COMFYUI_PROTOCOL_ERROR"
    PROMPT_LOST = "PROMPT_LOST"
    STORAGE_ERROR = "STORAGE_ERROR"
    IMAGE_FETCH_FAILED = "IMAGE_FETCH_FAILED"
    TEMPORAL_UNAVAILABLE = "TEMPORAL_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# Failures a client may ask to retry through the job's `retry.retryOn`; transient ones
# (COMFYUI_UNREACHABLE, PROMPT_LOST, STORAGE_ERROR) are always retried and need no opt-in.
CLIENT_RETRYABLE_CODES = (
    ErrorCode.COMFYUI_NODE_ERROR,
    ErrorCode.COMFYUI_OOM,
    ErrorCode.COMFYUI_INTERRUPTED,
    ErrorCode.COMFYUI_TIMEOUT,
)


class JobError(CamelModel):
    code: ErrorCode
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class OutputFile(CamelModel):
    filename: str
    storage_path: str
    url: str
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


class RetrySpec(CamelModel):
    """A client's opt-in to re-running the job on ComfyUI after failures that are not transient."""

    max_attempts: int = Field(1, ge=1, le=10)
    backoff_seconds: float = Field(5.0, ge=0, le=3600)
    retry_on: list[ErrorCode] = Field(default_factory=list)

    def allows(self, code: ErrorCode, attempt: int) -> bool:
        return code in self.retry_on and attempt < self.max_attempts


class PromptProgress(CamelModel):
    """What the prompt-following activity heartbeats; also the live part of `GET /jobs/{id}`."""

    prompt_id: str
    submitted: bool = False
    percent: int = 0
    node: str | None = None
    node_type: str | None = None
    queue_position: int | None = None
    # Epoch seconds when the first attempt got its slot: a retried activity keeps the job's deadline.
    started_at: float | None = None
    started_signalled: bool = False


class JobView(CamelModel):
    """Everything `GET /jobs/{id}` shows; also the `status` query's answer."""

    job_id: str
    status: JobStatus
    # The contract calls the template id `workflowId`; it is not Temporal's workflow id (that is job_id).
    workflow_id: str | None = None
    template_version: int | None = None
    # The seed the job ran with (drawn by the gateway when the client gave none or -1), to reproduce it.
    seed: int | None = None
    progress: int = 0
    current_node: str | None = None
    queue_position: int | None = None
    attempts: int = 0
    outputs: list[OutputFile] = Field(default_factory=list)
    error: JobError | None = None
    timing: JobTiming
    metadata: dict[str, Any] = Field(default_factory=dict)


# --- workflow, signal and activity inputs and results ---------------------------------------------


class GenerationInput(BaseModel):
    job_id: str
    template_id: str | None = None
    template_version: int | None = None
    workflow_json: dict[str, Any] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout_seconds: float
    heartbeat_timeout_seconds: float
    backend: str
    backend_task_queue: str
    created_at: datetime
    privacy_mode: bool = False


class PromptStarted(BaseModel):
    """Signal from run_prompt: ComfyUI has started executing the job's prompt."""

    attempt: int
    prompt_id: str


class CancelRequest(BaseModel):
    reason: str = ""
    actor: str = "api"


class RenderPromptInput(BaseModel):
    template_id: str | None = None
    template_version: int | None = None
    workflow_json: dict[str, Any] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)


class RenderPromptResult(BaseModel):
    prompt: dict[str, Any]
    # "<node id>.image" → the image source (URL or stored reference) of each LoadImage still to be staged.
    image_sources: dict[str, str] = Field(default_factory=dict)


class StageImagesInput(BaseModel):
    job_id: str
    backend: str
    prompt: dict[str, Any]
    # "<node id>.image" → source (URL or stored reference); the key names the input in errors.
    images: dict[str, str]


class StageImagesResult(BaseModel):
    # key → the name ComfyUI returned for it, and the prompt with those names in its LoadImage nodes.
    names: dict[str, str]
    prompt: dict[str, Any]


class RunPromptInput(BaseModel):
    job_id: str
    backend: str
    attempt: int
    prompt: dict[str, Any]
    timeout_seconds: float


class RunPromptResult(BaseModel):
    prompt_id: str
    # ComfyUI's history `outputs`: node id -> UI dict ({"images": [{filename, subfolder, type}], ...}).
    outputs: dict[str, dict[str, Any]]
    # ComfyUI's execution_start timestamp (epoch ms): when it began executing the prompt.
    started_at_ms: int | None = None
    execution_time_ms: int | None = None


class CancelPromptInput(BaseModel):
    backend: str
    prompt_id: str


class CollectOutputsInput(BaseModel):
    job_id: str
    backend: str
    outputs: dict[str, dict[str, Any]]


class CollectOutputsResult(BaseModel):
    files: list[OutputFile]


class JobEventInput(BaseModel):
    # Unique per job; the same key written twice (a retried activity) is stored once.
    key: str
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class RecordJobInput(BaseModel):
    """One status change: the job's full snapshot plus the log events that explain it."""

    job: JobView
    backend: str
    prompt_id: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    events: list[JobEventInput] = Field(default_factory=list)


def prompt_id_for(job_id: str, attempt: int) -> str:
    """The ComfyUI prompt id of a job's n-th run: deterministic, so a retried submit finds its own prompt."""
    import uuid

    return str(uuid.uuid5(uuid.UUID(job_id), f"attempt-{attempt}"))
