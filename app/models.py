"""Temporal payloads: workflow, signal and activity inputs and results, the workflow's state (its `status`
query answer and its result), and the heartbeats of activities.

Internal and versioned. These are neither the public API shapes (`api/schemas.py` maps them) nor the row
shapes (`app/tables.py`). They change compatibly only, because the histories of jobs in flight hold the old
shapes: a field added has a default, a field dropped is ignored when an old payload is read. They carry
references (storage keys), never file bytes or URLs. No I/O here: workflows import this module through
`imports_passed_through`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from app.errors import CLIENT_RETRYABLE_CODES, ErrorCode
from app.webhooks.events import TERMINAL_EVENTS


# Temporal's priority keys run from 1 (highest) to 5 (lowest); a job that names none runs at normal.
DEFAULT_PRIORITY = 3


class CamelModel(BaseModel):
    """camelCase on the wire (API bodies, and the payloads that always were); snake_case names in Python."""

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


LIVE_STATUSES = (JobStatus.queued, JobStatus.running)


class OutputFormat(str, Enum):
    """What a job's still images are stored as (`outputFormat`); animated images and videos stay as they are."""

    png = "png"
    jpg = "jpg"
    webp = "webp"


DEFAULT_OUTPUT_QUALITY = 90


class JobError(CamelModel):
    code: ErrorCode
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class JobWarning(CamelModel):
    """Why a live job is waiting, e.g. COMFYUI_UNREACHABLE; cleared when it runs again."""

    code: ErrorCode
    message: str
    since: datetime


class OutputRef(CamelModel):
    """A stored output file: its storage key, never a URL (URLs are made when the job is read)."""

    filename: str
    # Histories written before URLs were made at read time call it storagePath.
    storage_key: str = Field(validation_alias=AliasChoices("storageKey", "storagePath", "storage_key"))
    size: int
    sha256: str
    content_type: str
    node_id: str
    animated: bool = False


class JobState(CamelModel):
    """A job as its workflow knows it: the `status` query's answer, the workflow's result, and what it
    records in the jobs table at every status change. Live progress is not part of it: it travels in the
    prompt activity's heartbeat, never through workflow history."""

    job_id: str
    status: JobStatus
    template_id: str | None = None
    template_version: int | None = None
    # The seed the job ran with (drawn by the gateway when the client gave none or -1), to reproduce it.
    seed: int | None = None
    attempts: int = 0
    outputs: list[OutputRef] = Field(default_factory=list)
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    execution_time_ms: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # A result cache hit: the outputs are those of job `cached_from` (the same storage keys); nothing ran.
    cache_hit: bool = False
    cached_from: str | None = None
    # The principal that created the job (app.auth); None for jobs from before authentication existed.
    owner: str | None = None
    # The ComfyUI backend the job's prompt was placed on (its latest attempt); None until it is placed.
    backend: str | None = None
    # Temporal's priority key: 1 highest, 5 lowest; 3 (normal) for jobs from before priorities.
    priority: int = DEFAULT_PRIORITY
    # The batch the job is an item of (POST /batches); None for a job submitted on its own.
    batch_id: str | None = None
    # The backend tag its prompt waits for (its own or its template's); None: any backend.
    backend_tag: str | None = None


class LiveProgress(CamelModel):
    """What a live job shows beyond its state: progress, current node, place in ComfyUI's queue, a warning."""

    percent: int = 0
    node: str | None = None
    queue_position: int | None = None
    warning: JobWarning | None = None


class RetrySpec(CamelModel):
    """A client's opt-in to re-running the job on ComfyUI after failures that are not transient."""

    max_attempts: int = Field(1, ge=1, le=10)
    backoff_seconds: float = Field(5.0, ge=0, le=3600)
    retry_on: list[ErrorCode] = Field(default_factory=list)

    def allows(self, code: ErrorCode, attempt: int) -> bool:
        return code in self.retry_on and code in CLIENT_RETRYABLE_CODES and attempt < self.max_attempts


class PromptProgress(CamelModel):
    """What the prompt-following activity heartbeats, and resumes from after a crash."""

    prompt_id: str
    # A post of the prompt may have reached ComfyUI: a later try looks for it before posting again.
    post_attempted: bool = False
    submitted: bool = False
    percent: int = 0
    node: str | None = None
    node_type: str | None = None
    queue_position: int | None = None
    # Time spent on the job's limit so far: on ComfyUI, or waiting for it while the gateway ran. Time the
    # gateway was down is not in it, so a restart does not spend the job's timeout.
    elapsed_seconds: float = 0.0
    started_signalled: bool = False
    warning: JobWarning | None = None
    # The backend that has (or may have) the prompt: a retry polled by another backend's worker must not post it.
    backend: str | None = None
    # Tries that fetched the job's image inputs (on the fleet's path, inside this activity): bounded apart from
    # the activity's own retries, as the stage_images activity's were.
    image_tries: int = 0

    def live(self) -> LiveProgress:
        return LiveProgress(percent=self.percent, node=self.node, queue_position=self.queue_position,
                            warning=self.warning)


class StepHeartbeat(CamelModel):
    """The heartbeat of the other activities that talk to ComfyUI (staging images, collecting outputs)."""

    done: int = 0
    warning: JobWarning | None = None


# --- workflow, signal and activity inputs and results ---------------------------------------------


class CachedResult(BaseModel):
    """An earlier job's result that a new job takes as its own (a result cache hit): its outputs' storage keys."""

    source_job_id: str
    outputs: list[OutputRef]


class RenderPromptInput(BaseModel):
    template_id: str | None = None
    template_version: int | None = None
    workflow_json: dict[str, Any] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)


class RenderPromptResult(BaseModel):
    prompt: dict[str, Any]
    # "<node id>.image" → the image source (URL or stored reference) of each LoadImage still to be staged.
    image_sources: dict[str, str] = Field(default_factory=dict)


# The longest time limit a job may ask for (`timeoutSeconds`) unless MAX_JOB_TIMEOUT_S says otherwise, and the
# one that jobs from before that setting were submitted under.
MAX_JOB_TIMEOUT_SECONDS = 24 * 3600


class GenerationInput(BaseModel):
    job_id: str
    template_id: str | None = None
    template_version: int | None = None
    workflow_json: dict[str, Any] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout_seconds: float
    # The longest time limit any job could have when this one was submitted (MAX_JOB_TIMEOUT_S): how long it may
    # wait in ComfyUI's queue behind another job. None (jobs from before the setting): MAX_JOB_TIMEOUT_SECONDS.
    max_timeout_seconds: float | None = None
    heartbeat_timeout_seconds: float
    # Jobs before the fleet ran on this backend, through this queue; later jobs are placed when a slot frees up.
    backend: str
    backend_task_queue: str
    # The job runs only on a backend with this tag (COMFYUI_URLS); None: on any.
    backend_tag: str | None = None
    created_at: datetime
    privacy_mode: bool = False
    # None (jobs from before output formats): outputs are stored as ComfyUI wrote them.
    output_format: OutputFormat | None = None
    output_quality: int = DEFAULT_OUTPUT_QUALITY
    # Where the job's webhooks go (checked at submit, resolved and checked again at each delivery), and which.
    callback_url: str | None = None
    webhook_events: list[str] = Field(default_factory=lambda: list(TERMINAL_EVENTS))
    # The principal id of the caller that created the job (never a key): the row's owner and the Owner attribute.
    owner: str | None = None
    # Temporal's priority key (1 highest, 5 lowest) for the job's tasks; fairness between owners at one priority.
    priority: int = DEFAULT_PRIORITY
    # The batch the job is an item of; None for a job submitted on its own.
    batch_id: str | None = None

    # SHA-256 of the result cache key (app.result_cache); None when the job's result is not cacheable.
    cache_key: str | None = None
    # Given: the job finishes at once with this result, and never reaches ComfyUI.
    cached_result: CachedResult | None = None
    # SHA-256 of the request, for a job submitted with an idempotency key (app.idempotency).
    request_fingerprint: str | None = None
    # The prompt as the API rendered it to check it, from the same template version and inputs: the workflow
    # runs it instead of rendering again. None (jobs from before, or too large to carry twice): it renders.
    rendered: RenderPromptResult | None = None
    # The X-Request-ID of the request that created the job (None: jobs from before): on the log lines of the
    # job's activities and on its webhooks, so one id follows the job from the request to the receiver.
    request_id: str | None = None

    def wants_webhook(self, event: str) -> bool:
        return self.callback_url is not None and event in self.webhook_events

    def log_fields(self) -> dict[str, str | None]:
        """What the lines logged for the job carry (worker.log_context)."""
        return {"job_id": self.job_id, "batch_id": self.batch_id, "template_id": self.template_id,
                "request_id": self.request_id}


# By name: the activity that sends it cannot import the workflow, which imports the activity.
PROMPT_STARTED_SIGNAL = "prompt_started"


class PromptStarted(BaseModel):
    """Signal from run_prompt: ComfyUI has started executing the job's prompt."""

    attempt: int
    prompt_id: str
    # Where the prompt is (None from releases before the fleet): a cancel goes there.
    backend: str | None = None


class CancelRequest(BaseModel):
    reason: str = ""
    actor: str = "api"
    # The sender requests the workflow's cancellation in Temporal right after this signal (the API does, since the
    # operator-console patch): the workflow keeps the who and why and lets that cancellation stop the job, so that
    # it ends as Canceled. False (older APIs): the signal stops the job itself, and the workflow completes.
    temporal_cancel_follows: bool = False


class StageImagesInput(BaseModel):
    job_id: str
    backend: str
    prompt: dict[str, Any]
    # "<node id>.image" → source (URL or stored reference); the key names the input in errors.
    images: dict[str, str]
    # How long an unreachable ComfyUI is waited for (the job's limit); None, from older releases: no bound.
    timeout_seconds: float | None = None
    # PRIVACY_MODE: the job's free texts (app.redaction), kept out of the failure this activity raises.
    redacted_texts: list[str] = Field(default_factory=list)


class StageImagesResult(BaseModel):
    # key → the name ComfyUI returned for it, and the prompt with those names in its LoadImage nodes.
    names: dict[str, str]
    prompt: dict[str, Any]


class ProgressWebhook(BaseModel):
    """What the prompt activity needs to send a job's opt-in `job.progress` webhooks."""

    callback_url: str
    template_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    request_id: str | None = None


class OutputCollection(BaseModel):
    """How run_prompt stores a finished prompt's outputs (as collect_outputs would)."""

    output_format: OutputFormat | None = None
    output_quality: int = DEFAULT_OUTPUT_QUALITY


class RunPromptInput(BaseModel):
    job_id: str
    # The backend named by jobs before the fleet; None: the backend whose worker polled the task runs it.
    backend: str | None = None
    attempt: int
    # None: prompt_id_for(job_id, attempt). Given on the fleet's path: the id the workflow cancels and records.
    prompt_id: str | None = None
    prompt: dict[str, Any]
    # Sent back to the backend that has the prompt (PROMPT_ON_OTHER_BACKEND): look it up before posting.
    reattach: bool = False
    # A re-attach's seconds of the job's time limit already spent by the attempt on the backend that passed it on
    # (PROMPT_ON_OTHER_BACKEND's elapsedSeconds): the re-attach counts on from there, not from 0.
    elapsed_seconds: float = 0
    # "<node id>.image" → source of each LoadImage to stage on the placed backend before the prompt is posted.
    image_sources: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float
    progress_webhook: ProgressWebhook | None = None
    # PRIVACY_MODE: the job's free texts (app.redaction), kept out of the failure and log this activity writes.
    redacted_texts: list[str] = Field(default_factory=list)
    # Given: the activity also stores the prompt's outputs, from the backend that ran it, in the same slot;
    # None (jobs from before, or a worker from before): the workflow collects them with collect_outputs.
    collect: OutputCollection | None = None

    @property
    def the_prompt_id(self) -> str:
        return self.prompt_id or prompt_id_for(self.job_id, self.attempt)


class RunPromptResult(BaseModel):
    prompt_id: str
    # The backend that ran it; None from jobs before the fleet (their job's own backend).
    backend: str | None = None
    # ComfyUI's history `outputs`: node id -> UI dict ({"images": [{filename, subfolder, type}], ...}).
    outputs: dict[str, dict[str, Any]]
    # ComfyUI's execution_start timestamp (epoch ms): when it began executing the prompt.
    started_at_ms: int | None = None
    execution_time_ms: int | None = None
    # The outputs stored by the activity itself (RunPromptInput.collect); None: not stored, the workflow collects
    # them with collect_outputs (not asked, or storing hit trouble that collect_outputs' own retries handle).
    files: list[OutputRef] | None = None


class CancelPromptInput(BaseModel):
    # None: the prompt was placed but the workflow has not heard where; it is stopped on every backend.
    backend: str | None
    prompt_id: str


class CollectOutputsInput(BaseModel):
    job_id: str
    backend: str
    outputs: dict[str, dict[str, Any]]
    # How long an unreachable ComfyUI is waited for (the job's limit); None, from older releases: no bound.
    timeout_seconds: float | None = None
    # What still images are converted to; None, from older releases: stored as ComfyUI wrote them.
    output_format: OutputFormat | None = None
    output_quality: int = DEFAULT_OUTPUT_QUALITY


class CollectOutputsResult(BaseModel):
    files: list[OutputRef]


class JobEventInput(BaseModel):
    # Unique per job; the same key written twice (a retried activity) is stored once.
    key: str
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class RecordJobInput(BaseModel):
    """One status change: the job's full state plus the log events that explain it."""

    job: JobState
    backend: str
    prompt_id: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    cache_key: str | None = None
    request_fingerprint: str | None = None
    events: list[JobEventInput] = Field(default_factory=list)


class WebhookStatus(CamelModel):
    """How a job's webhook (its terminal event's) has fared: kept on the job's row by the delivery activity."""

    delivered: bool = False
    attempts: int = 0
    # The receiver's last HTTP status; None when the last attempt got no answer (timeout, refused connection).
    last_status: int | None = None


class WebhookDeliveryInput(BaseModel):
    """WebhookDeliveryWorkflow's input: one event of one job, its state as the event saw it; or of one batch
    (`batch.completed`), its body as BatchWorkflow made it (`batch`, with `batchId`; then no `job`)."""

    event: str
    callback_url: str
    job: JobState | None = None
    batch: dict[str, Any] | None = None
    # The job's (or the batch's) request id: each attempt sends it as X-Request-ID.
    request_id: str | None = None

    def log_fields(self) -> dict[str, str | None]:
        """What the lines logged for the delivery carry (worker.log_context)."""
        subject = "job_id" if self.job is not None else "batch_id"
        return {subject: self.subject_id, "request_id": self.request_id}

    @property
    def subject_id(self) -> str:
        """The job or batch whose event it is: its row and log get the attempts."""
        if self.job is not None:
            return self.job.job_id
        assert self.batch is not None
        return str(self.batch["batchId"])


class BuildWebhookInput(BaseModel):
    event: str
    job: JobState | None = None
    batch: dict[str, Any] | None = None


class BuiltWebhook(BaseModel):
    """An event's body, the exact bytes sent on every attempt, and how long to keep trying (the worker's
    settings when it was built: in history, so a replay does the same)."""

    body: str
    first_retry_seconds: float
    max_retry_interval_seconds: float
    retry_for_seconds: float


class DeliverWebhookInput(BaseModel):
    job_id: str
    event: str
    webhook_id: str
    callback_url: str
    body: str
    request_id: str | None = None


class DeliverWebhookResult(BaseModel):
    status_code: int
    attempts: int


class WebhookGivenUpInput(BaseModel):
    job_id: str
    event: str
    webhook_id: str
    reason: str


def accepted_state(job: GenerationInput) -> JobState:
    """A job as it stands when its workflow starts: queued, nothing run yet."""
    seed = job.inputs.get("seed")
    return JobState(
        job_id=job.job_id,
        status=JobStatus.queued,
        template_id=job.template_id,
        template_version=job.template_version,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        created_at=job.created_at,
        metadata=job.metadata,
        cache_hit=job.cached_result is not None,
        cached_from=job.cached_result.source_job_id if job.cached_result is not None else None,
        owner=job.owner,
        priority=job.priority,
        batch_id=job.batch_id,
        backend_tag=job.backend_tag,
    )


def prompt_id_for(job_id: str, attempt: int, reset_run: str | None = None) -> str:
    """The ComfyUI prompt id of a job's n-th run: deterministic, so a retried submit finds its own prompt. An
    attempt that a run started by an operator's reset schedules (`reset_run`, a token of that run's own) has a
    prompt of its own: the run it replaced may still have its prompt in ComfyUI, and stops that one when it finds
    itself gone."""
    name = f"attempt-{attempt}" if reset_run is None else f"attempt-{attempt}-run-{reset_run}"
    return str(uuid.uuid5(uuid.UUID(job_id), name))


# --- retention -------------------------------------------------------------------------------------


class RetentionInput(BaseModel):
    """What the retention schedule starts RetentionWorkflow with."""

    retention_days: int = Field(ge=1)
    batch_size: int = Field(500, ge=1, le=5000)


class FindExpiredJobsInput(BaseModel):
    cutoff: datetime
    # Job ids are walked in order: the next batch starts after the last one looked at, so jobs that are
    # passed over (their workflow is still open) are not looked at again in the same run.
    after: str = ""
    limit: int


class ExpiredJob(BaseModel):
    job_id: str
    # Its workflow's run, closed; None when Temporal no longer has it (its own retention removed it).
    run_id: str | None = None
    # Its webhook deliveries' closed runs that Temporal still has: workflow id (`<jobId>:webhook:<event>`) → run id.
    webhook_runs: dict[str, str] = Field(default_factory=dict)


class FindExpiredJobsResult(BaseModel):
    jobs: list[ExpiredJob]
    # Jobs of this batch whose workflow, or a webhook delivery of theirs, is still open in Temporal: left alone.
    in_flight: int = 0
    # Where the next batch starts; None when this batch was the last.
    next_after: str | None = None


class DeleteJobsInput(BaseModel):
    jobs: list[ExpiredJob]


class DeleteJobsResult(BaseModel):
    jobs: int = 0
    output_files: int = 0
    input_files: int = 0
    # Closed workflows whose deletion Temporal accepted (it deletes them in the background): the jobs' own and
    # their webhook deliveries'.
    workflows: int = 0


class RetentionResult(BaseModel):
    cutoff: datetime
    jobs: int = 0
    output_files: int = 0
    input_files: int = 0
    workflows: int = 0
    in_flight: int = 0
