"""A batch's payloads and shapes: what BatchWorkflow is started with and carries across continue-as-new, what
it records in the batches table, and its counts. No I/O: the workflow imports this module."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field

from app.models import CamelModel, GenerationInput, JobStatus


class BatchStatus(str, Enum):
    queued = "queued"  # accepted; its workflow has not recorded it yet
    running = "running"  # items are being started or run
    completed = "completed"  # every item ended (succeeded, failed or cancelled)
    cancelled = "cancelled"  # cancelled: unfinished items were cancelled, items not started never start

    @property
    def is_terminal(self) -> bool:
        return self in (BatchStatus.completed, BatchStatus.cancelled)


class BatchItem(BaseModel):
    """One item: its job's id and its inputs as validated at submit (defaults filled in, images as references)."""

    job_id: str
    inputs: dict[str, Any]


class BatchTally(CamelModel):
    """Items that have ended, by how."""

    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def add(self, status: JobStatus) -> None:
        if status is JobStatus.succeeded:
            self.succeeded += 1
        elif status is JobStatus.failed:
            self.failed += 1
        else:
            self.cancelled += 1


class BatchInput(BaseModel):
    """BatchWorkflow's input. `job` is every item's GenerationInput but for its id and inputs (each item's are
    its own), so the payload holds the shared parts once. `items` are those not started yet: each run starts
    up to `items_per_run` of them, waits for them, and continues as new with the rest (a cancelled batch never
    continues as new)."""

    batch_id: str
    job: GenerationInput
    items: list[BatchItem]
    total: int
    max_parallel: int
    items_per_run: int
    callback_url: str | None = None
    created_at: datetime
    # Carried across continue-as-new.
    started: int = 0
    tally: BatchTally = Field(default_factory=BatchTally)
    started_at: datetime | None = None

    def log_fields(self) -> dict[str, str | None]:
        """What the lines logged for the batch carry (worker.log_context)."""
        return {"batch_id": self.batch_id, "template_id": self.job.template_id, "request_id": self.job.request_id}


class BatchState(CamelModel):
    """What BatchWorkflow knows of its batch: the `progress` query's answer, its result, and its row."""

    batch_id: str
    status: BatchStatus
    template_id: str | None = None
    owner: str | None = None
    priority: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    total: int
    # Items whose jobs were started (ended ones included).
    started: int = 0
    tally: BatchTally = Field(default_factory=BatchTally)
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    cancel_reason: str | None = None


class RecordBatchInput(BaseModel):
    batch: BatchState


class BatchCounts(CamelModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


def item_job_id(batch_id: str, index: int) -> str:
    """An item's job id, a UUID as every job id is (prompt ids derive from it), named by its batch and its place
    in it: the same item always has the same id."""
    return str(uuid.uuid5(uuid.UUID(batch_id), f"item:{index}"))


# The one webhook a batch sends, once all its items have ended (or it was cancelled).
BATCH_COMPLETED = "batch.completed"


def ended_counts(state: BatchState) -> BatchCounts:
    """The counts of a batch that has ended, from its workflow's own tally: every item is accounted for."""
    return BatchCounts(succeeded=state.tally.succeeded, failed=state.tally.failed, cancelled=state.tally.cancelled)


def _instant(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def batch_webhook_body(state: BatchState) -> dict[str, Any]:
    """The `batch.completed` webhook's body (its `event` added when it is built): the batch as
    `GET /batches/{id}` shows it once it has ended."""
    return {
        "batchId": state.batch_id,
        "status": state.status.value,
        "workflowId": state.template_id,
        "count": state.total,
        "counts": ended_counts(state).model_dump(by_alias=True),
        "progress": 100,
        "metadata": state.metadata,
        "cancelReason": state.cancel_reason,
        "timing": {"createdAt": _instant(state.created_at), "startedAt": _instant(state.started_at),
                   "completedAt": _instant(state.completed_at)},
    }
