"""Closing the rows of jobs whose workflows Temporal itself ended: terminated by an operator (Web UI, CLI) or
timed out. Such a workflow can no longer write its own end, so the worker finds them through a visibility
query on the job's search attributes and ends their rows as `cancelled` with JOB_TERMINATED, within seconds
and without waiting for anyone to read the job; and it starts the job's `job.cancelled` webhook, if the job
asked for one, which the ended workflow never will. Idempotent: a row that has ended stays as it is, and a
webhook's delivery workflow starts once, so several workers may run this at once. A run terminated by a reset
is not the job's end: the job goes on in its new run, so only a job whose latest run has ended is closed.
Canceled workflows are not looked at: a cancelled workflow records its job's end itself before it ends."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from app.db import session_scope
from app.jobstore import close_ended_job, get_job_snapshot
from app.models import LIVE_STATUSES, JobEventInput, JobState, JobStatus, WebhookDeliveryInput
from app.search_attributes import JOB_STATUS
from app.temporal_endings import started_input, terminated_error, termination_reason
from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow, webhook_workflow_id

log = logging.getLogger(__name__)

RECONCILE_EVERY_SECONDS = 2.0
# Visibility is eventually consistent: each scan looks back over the last one's window too.
_OVERLAP = timedelta(minutes=1)
class JobReconciler:
    def __init__(self, client: Client, engine: Engine, task_queue: str) -> None:
        self._client = client
        self._engine = engine
        self._task_queue = task_queue
        self._closed_since: datetime | None = None  # the first scan looks at every such workflow

    def _query(self) -> str:
        live = ", ".join(f"'{status.value}'" for status in LIVE_STATUSES)
        query = (
            f"WorkflowType = 'GenerationWorkflow' AND TaskQueue = '{self._task_queue}' "
            f"AND ExecutionStatus IN ('Terminated', 'TimedOut') "
            # Jobs started before the workflow kept its status there have none.
            f"AND ({JOB_STATUS.name} IN ({live}) OR {JOB_STATUS.name} IS NULL)"
        )
        if self._closed_since is not None:
            query += f" AND CloseTime > '{(self._closed_since - _OVERLAP).isoformat()}'"
        return query

    async def reconcile_once(self) -> int:
        """Close the rows of the jobs Temporal ended since the last scan; returns how many were closed."""
        scan_started = datetime.now(timezone.utc)
        closed = 0
        async for execution in self._client.list_workflows(self._query()):
            closed += await self._close(execution)
        self._closed_since = scan_started
        return closed

    async def _close(self, execution: WorkflowExecution) -> int:
        assert execution.status is not None
        latest = await self._client.get_workflow_handle(execution.id).describe()
        if latest.run_id != execution.run_id or latest.status is WorkflowExecutionStatus.RUNNING:
            return 0  # reset: the job goes on in a newer run
        error = terminated_error(execution.status, await termination_reason(self._client, execution.id, execution.run_id))
        completed_at = execution.close_time or datetime.now(timezone.utc)

        def recorded() -> JobState | None:
            with session_scope(self._engine) as session:
                snapshot = get_job_snapshot(session, execution.id)
            return snapshot.state if snapshot is not None else None

        state = await asyncio.to_thread(recorded)
        if state is None or state.status not in LIVE_STATUSES:
            return 0  # closed already (by another worker), or ended by the workflow itself
        ended = state.model_copy(update={"status": JobStatus.cancelled, "error": error, "completed_at": completed_at})
        # Before the row is closed: a worker that stops in between starts it again at its next scan (the row is
        # still live), and the delivery workflow's id lets it start once.
        await self._start_cancelled_webhook(execution, ended)
        event = JobEventInput(
            key="temporal:ended", at=completed_at, kind="status", message=f"job cancelled: {error.message}",
            data={"status": JobStatus.cancelled.value, "error": error.model_dump(mode="json")},
        )

        def close() -> bool:
            with session_scope(self._engine) as session:
                return close_ended_job(session, execution.id, error, completed_at, event)

        if not await asyncio.to_thread(close):
            return 0
        log.info("job %s: %s; its row is closed as cancelled", execution.id, error.message)
        return 1

    async def _start_cancelled_webhook(self, execution: WorkflowExecution, ended: JobState) -> None:
        """The job's `job.cancelled` webhook, if it asked for one: the job's workflow, ended by Temporal, never
        starts it. Its input (with the callbackUrl) is the first event of the workflow's history."""
        job = await started_input(self._client, self._client.get_workflow_handle(execution.id, run_id=execution.run_id))
        event = f"job.{JobStatus.cancelled.value}"
        if not job.wants_webhook(event):
            return
        assert job.callback_url is not None
        try:
            await self._client.start_workflow(
                WebhookDeliveryWorkflow.run,
                WebhookDeliveryInput(event=event, callback_url=job.callback_url, job=ended),
                id=webhook_workflow_id(job.job_id, event),
                task_queue=self._task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
        except WorkflowAlreadyStartedError:
            pass  # started before: by another worker's scan, or by this one before it stopped

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except (RPCError, SQLAlchemyError) as error:  # unavailable for a moment: the next scan catches up
                log.debug("reconciling jobs ended in Temporal failed: %s", error)
            except Exception:  # a fault of the reconciler's own must not end it for the worker's lifetime
                log.exception("reconciling jobs ended in Temporal failed")
            await asyncio.sleep(RECONCILE_EVERY_SECONDS)
