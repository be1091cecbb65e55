"""Table models: the rows' own shapes, apart from Temporal payloads (app.models) and the public API (api/).
The jobs table is a projection that each job's workflow keeps current (see app.jobstore for who writes what)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.auth import MAX_PRINCIPAL_ID_LENGTH


def _utc_column(index: bool = False, nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), index=index, nullable=nullable))


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    # What app.queue_estimates reads on each read of a live job: the waiting jobs by priority, and a template's
    # latest successes (its run time). Then the outputs across jobs (app.recent_outputs), newest first: a user's,
    # and everyone's for an admin.
    __table_args__ = (
        Index("ix_jobs_status_priority", "status", "priority"),
        Index("ix_jobs_recent_runs", "template_id", "status", "completed_at"),
        Index("ix_jobs_owner_completed", "owner", "completed_at"),
        Index("ix_jobs_completed", "completed_at"),
    )

    job_id: str = Field(primary_key=True, max_length=64)
    status: str = Field(index=True, max_length=16)
    template_id: str | None = Field(default=None, index=True, max_length=128)
    template_version: int | None = None
    # The principal that created the job (app.auth); None for jobs from before authentication existed.
    owner: str | None = Field(default=None, index=True, max_length=MAX_PRINCIPAL_ID_LENGTH)
    # Seeds reach 2**48: past PostgreSQL's INTEGER.
    seed: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    backend: str = Field(max_length=64)
    # Its priority key (1 highest … 5 lowest) and the backend tag its prompt waits for (None: any backend).
    priority: int = Field(default=3, sa_column_kwargs={"server_default": "3"})
    backend_tag: str | None = Field(default=None, max_length=32)
    prompt_id: str | None = Field(default=None, max_length=64)
    attempts: int = 0
    # The live columns, written by the prompt activity while the job runs (throttled), cleared at its end.
    progress: int = 0
    current_node: str | None = Field(default=None, max_length=64)
    queue_position: int | None = None
    warning: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # Under PRIVACY_MODE the inputs are not stored (the workflow passes an empty dict).
    inputs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    job_metadata: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    outputs: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = _utc_column(index=True, nullable=False)
    started_at: datetime | None = _utc_column()
    completed_at: datetime | None = _utc_column()
    execution_time_ms: int | None = None
    # {delivered, attempts, lastStatus} of the job's webhook, written by its delivery activity; None without one.
    webhook: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    updated_at: datetime = _utc_column(nullable=False)
    # The result cache (app.result_cache): the job's cache key (None: not cacheable), and on a cache hit, the
    # job whose outputs (the same storage keys) it took. Deleting a job's files must spare those of a source
    # that a hit still names in cached_from.
    cache_key: str | None = Field(default=None, index=True, max_length=64)
    cache_hit: bool = False
    cached_from: str | None = Field(default=None, index=True, max_length=64)
    # SHA-256 of the request of a job submitted with an idempotency key: a repeat with another body is refused.
    request_fingerprint: str | None = Field(default=None, max_length=64)
    # The batch the job is an item of (POST /batches); None for a job submitted on its own.
    batch_id: str | None = Field(default=None, index=True, max_length=64)


class JobEventRow(SQLModel, table=True):
    __tablename__ = "job_events"
    # A retried activity may report the same event again; the key makes the second write a no-op.
    __table_args__ = (UniqueConstraint("job_id", "event_key", name="uq_job_event_key"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=64)
    event_key: str = Field(max_length=200)
    at: datetime = _utc_column(nullable=False)
    kind: str = Field(max_length=32)
    message: str
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class JobFeedRow(SQLModel, table=True):
    """One change of a job as the feed of all jobs tells it (`GET /events`, `WS /ws`; api.feed): written in the
    transaction that changes the job's row, so the feed says what the rows say, in the order they said it. Its
    id is the feed's event id. Pruned past FEED_REPLAY_WINDOW_S. Never a job's inputs or prompt."""

    __tablename__ = "job_feed"
    # AUTOINCREMENT on SQLite: an id is never reused, also once pruning has emptied the table, so a client's
    # Last-Event-ID never names a later event.
    __table_args__ = (Index("ix_job_feed_at", "at"), {"sqlite_autoincrement": True})

    id: int | None = Field(default=None, sa_column=Column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True))
    job_id: str = Field(max_length=64)
    owner: str | None = Field(default=None, max_length=MAX_PRINCIPAL_ID_LENGTH)
    batch_id: str | None = Field(default=None, max_length=64)
    template_id: str | None = Field(default=None, max_length=128)
    # The event's name (queued, running, output, succeeded, failed, cancelled) and the job's status then.
    event: str = Field(max_length=16)
    status: str = Field(max_length=16)
    at: datetime = _utc_column(nullable=False)
    # progress, currentNode, queuePosition, attempts; outputs (storage refs) and error once it has them.
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class TemplateRow(SQLModel, table=True):
    """One immutable version of a workflow template; a job names the (id, version) it ran with."""

    __tablename__ = "workflow_templates"

    template_id: str = Field(primary_key=True, max_length=128)
    version: int = Field(primary_key=True)
    name: str
    description: str = ""
    workflow_json: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    input_schema: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    default_params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The template's own limits ({"maxImageSize", "maxBatchSize"}), in place of the operator's.
    limits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Its jobs run only on a backend with this tag, unless a job names its own.
    backend_tag: str | None = Field(default=None, max_length=32)
    created_at: datetime = _utc_column(nullable=False)
    # Deleting a template hides it; the rows stay so that jobs submitted before still render their version.
    deleted_at: datetime | None = _utc_column()


class JobInputRow(SQLModel, table=True):
    """A staged input image a job uses. Inline images are stored by content (`inputs/<sha256>.<ext>`), so jobs
    that sent the same image share one object: retention deletes it only when no job left refers to it.
    Written by the API before it stores the image, so no stored input is ever without a row naming it."""

    __tablename__ = "job_inputs"

    job_id: str = Field(primary_key=True, max_length=64)
    storage_key: str = Field(primary_key=True, index=True, max_length=255)
    created_at: datetime = _utc_column(nullable=False)


class AuditRow(SQLModel, table=True):
    """One admin action (app.audit): who did what to what, when. Written once, never changed."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    actor: str = Field(index=True, max_length=MAX_PRINCIPAL_ID_LENGTH)
    role: str = Field(max_length=16)
    action: str = Field(index=True, max_length=64)
    target: str = Field(index=True, max_length=256)
    at: datetime = _utc_column(index=True, nullable=False)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class BackendSlotRow(SQLModel, table=True):
    """A slot of a ComfyUI backend that a worker process holds for a prompt (app.comfy.slots), until it releases
    it or stops renewing it and it expires."""

    __tablename__ = "backend_slots"

    backend: str = Field(primary_key=True, max_length=32)
    slot: int = Field(primary_key=True)
    holder: str = Field(max_length=128)
    prompt_id: str | None = Field(default=None, max_length=64)
    expires_at: datetime = _utc_column(nullable=False)


class BatchRow(SQLModel, table=True):
    """A batch (POST /batches), written by its BatchWorkflow as it starts, as it continues as new and as it
    ends. Its items are ordinary jobs, whose rows name it (jobs.batch_id)."""

    __tablename__ = "batches"

    batch_id: str = Field(primary_key=True, max_length=64)
    status: str = Field(index=True, max_length=16)
    template_id: str | None = Field(default=None, max_length=128)
    owner: str | None = Field(default=None, index=True, max_length=MAX_PRINCIPAL_ID_LENGTH)
    priority: int
    batch_metadata: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    total: int
    started: int = 0
    # {succeeded, failed, cancelled}: the items that had ended when the workflow last wrote the row.
    tally: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    cancel_reason: str | None = None
    # {delivered, attempts, lastStatus} of the batch.completed webhook; None without one.
    webhook: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = _utc_column(index=True, nullable=False)
    started_at: datetime | None = _utc_column()
    completed_at: datetime | None = _utc_column()
    updated_at: datetime = _utc_column(nullable=False)
