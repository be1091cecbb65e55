"""Where a job's truth is: a live job's is its workflow (status query + the heartbeat of the prompt it
follows), a finished job's is its row in the database.

A query runs on the worker, beside the jobs themselves, so a live job's view is reused for a moment:
however often clients poll, each live job costs the worker at most a few queries a second.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from api.database import Database
from api.errors import ApiError
from app.jobstore import close_abandoned_job, get_job_view
from app.models import ErrorCode, JobError, JobEventInput, JobStatus, JobView, PromptProgress
from workflows_temporal.generation import GenerationWorkflow


LIVE_VIEW_SECONDS = 0.25
_LIVE_VIEW_CAPACITY = 10_000


@dataclass
class LiveViews:
    """Recently read views of live jobs, by job id, each kept for LIVE_VIEW_SECONDS."""

    _views: dict[str, tuple[float, JobView]] = field(default_factory=dict)

    def get(self, job_id: str) -> JobView | None:
        cached = self._views.get(job_id)
        if cached is None or cached[0] < time.monotonic():
            return None
        return cached[1].model_copy(deep=True)

    def put(self, view: JobView) -> None:
        now = time.monotonic()
        if len(self._views) >= _LIVE_VIEW_CAPACITY:
            self._views = {job_id: entry for job_id, entry in self._views.items() if entry[0] >= now}
        self._views[view.job_id] = (now + LIVE_VIEW_SECONDS, view)


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id}", {"jobId": job_id})


def _is_job_id(job_id: str) -> bool:
    try:
        uuid.UUID(job_id)
    except ValueError:
        return False
    return True


async def find_job(job_id: str, db: Database, temporal: Client, live_views: LiveViews | None = None) -> JobView:
    """The job's current view; with `live_views`, a live job's view may be up to LIVE_VIEW_SECONDS old."""
    if not _is_job_id(job_id):
        raise job_not_found(job_id)
    recorded = await db.run(get_job_view, job_id)
    if recorded is not None and recorded.status.is_terminal:
        return recorded  # checked first, so a finished job never shows as live from the cache
    if live_views is not None and (cached := live_views.get(job_id)) is not None:
        return cached
    handle = temporal.get_workflow_handle(job_id)
    try:
        view = await handle.query(GenerationWorkflow.status)
    except RPCError as error:
        if recorded is not None:
            return recorded  # the projection, when the workflow cannot answer right now
        if error.status is RPCStatusCode.NOT_FOUND:
            raise job_not_found(job_id) from error
        raise ApiError(503, ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal could not answer for this job") from error
    if view.status.is_terminal:
        return view
    description = await handle.describe()
    if description.status is not WorkflowExecutionStatus.RUNNING:
        view = await _ended_in_temporal(handle, view, description)
        await db.run(close_abandoned_job, view, JobEventInput(
            key="api:ended-in-temporal", at=view.timing.completed_at, kind="status", message=view.error.message,
            data={"status": view.status.value, "error": view.error.model_dump(mode="json")},
        ))
        return view
    await _add_live_progress(temporal, description, view)
    if live_views is not None:
        live_views.put(view)
    return view


async def _ended_in_temporal(
    handle: WorkflowHandle, view: JobView, description: WorkflowExecutionDescription
) -> JobView:
    """A workflow that closed while its job was unfinished was terminated in Temporal (Web UI, CLI): the
    job ends as cancelled, with the operator's reason."""
    reason = ""
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            reason = event.workflow_execution_terminated_event_attributes.reason
    state = description.status.name.lower() if description.status else "closed"
    message = f"{state} in Temporal" + (f": {reason}" if reason else "")
    view.status = JobStatus.cancelled
    view.error = JobError(code=ErrorCode.JOB_TERMINATED, message=message)
    view.timing.completed_at = description.close_time or datetime.now(timezone.utc)
    return view


async def _add_live_progress(temporal: Client, description: WorkflowExecutionDescription, view: JobView) -> None:
    """Progress is not in workflow history tick by tick: it is the prompt activity's last heartbeat."""
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name != "run_prompt" or not pending.heartbeat_details.payloads:
            continue
        [details] = await temporal.data_converter.decode(pending.heartbeat_details.payloads)
        progress = PromptProgress.model_validate(details)
        view.progress = progress.percent
        view.current_node = progress.node
        view.queue_position = progress.queue_position
