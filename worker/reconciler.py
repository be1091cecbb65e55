"""Closing the rows of jobs whose workflows Temporal itself ended: terminated by an operator (Web UI, CLI) or
timed out. Such a workflow can no longer write its own end, so the worker finds them through a visibility
query on the job's search attributes and ends their rows as `cancelled` with JOB_TERMINATED, within seconds
and without waiting for anyone to read the job; and it starts the job's `job.cancelled` webhook, if the job
asked for one, which the ended workflow never will. Idempotent: a row that has ended stays as it is, and a
webhook's delivery workflow starts once, so several workers may run this at once. A run terminated by a reset
is not the job's end: the job goes on in its new run, so only a job whose latest run has ended is closed.
Canceled workflows are not looked at: a cancelled workflow records its job's end itself before it ends.

Batches likewise: a BatchWorkflow that Temporal ended leaves its row `running`, so its row is closed as
`cancelled`, its reason saying the batch was terminated (or timed out) in Temporal, and its `batch.completed`
webhook started, if it asked for one. Its running items are cancelled by Temporal (their parent close policy)
and record their own ends: the batch's row is closed once none of them is live, with the tally their rows make,
so a batch waiting for its items is looked at again at every scan until then."""

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

from app.batch_store import batch_state, close_ended_batch, ended_items_tally, get_batch
from app.batches import BATCH_COMPLETED, BatchInput, BatchState, BatchStatus, batch_webhook_body
from app.db import session_scope
from app.jobstore import close_ended_job, get_job_snapshot
from app.metrics import count_job_end
from app.models import LIVE_STATUSES, JobEventInput, JobState, JobStatus, WebhookDeliveryInput
from app.search_attributes import JOB_STATUS
from app.temporal_endings import started_input, started_with, terminated_error, termination_reason
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
        # Batches Temporal ended whose items were still live at a scan, by id: looked at again at every scan.
        self._batches_waiting: dict[str, WorkflowExecution] = {}

    def _query(self, workflow_type: str) -> str:
        query = (
            f"WorkflowType = '{workflow_type}' AND TaskQueue = '{self._task_queue}' "
            f"AND ExecutionStatus IN ('Terminated', 'TimedOut')"
        )
        if workflow_type == "GenerationWorkflow":
            live = ", ".join(f"'{status.value}'" for status in LIVE_STATUSES)
            # Jobs started before the workflow kept its status there have none.
            query += f" AND ({JOB_STATUS.name} IN ({live}) OR {JOB_STATUS.name} IS NULL)"
        if self._closed_since is not None:
            query += f" AND CloseTime > '{(self._closed_since - _OVERLAP).isoformat()}'"
        return query

    async def reconcile_once(self) -> int:
        """Close the rows of the jobs and batches Temporal ended since the last scan (and of the batches whose
        items have ended since); returns how many were closed."""
        scan_started = datetime.now(timezone.utc)
        closed = 0
        async for execution in self._client.list_workflows(self._query("GenerationWorkflow")):
            closed += await self._close(execution)
        batches = dict(self._batches_waiting)
        async for execution in self._client.list_workflows(self._query("BatchWorkflow")):
            batches[execution.id] = execution
        for execution in batches.values():
            closed += await self._close_batch(execution)
        self._closed_since = scan_started
        return closed

    async def _ended_for_good(self, execution: WorkflowExecution) -> bool:
        """Whether the run Temporal ended is the workflow's latest: a reset terminates the run it starts from, and
        the job (or batch) goes on in a newer one."""
        latest = await self._client.get_workflow_handle(execution.id).describe()
        return latest.run_id == execution.run_id and latest.status is not WorkflowExecutionStatus.RUNNING

    async def _close(self, execution: WorkflowExecution) -> int:
        assert execution.status is not None
        if not await self._ended_for_good(execution):
            return 0
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
        count_job_end(ended)  # only the write that closed the row counts it
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
        await self._start_webhook(
            WebhookDeliveryInput(event=event, callback_url=job.callback_url, job=ended), job.job_id)

    async def _close_batch(self, execution: WorkflowExecution) -> int:
        """Close the row of a batch Temporal ended, once none of its items is live."""
        assert execution.status is not None

        def row_is_live() -> bool:
            with session_scope(self._engine) as session:
                row = get_batch(session, execution.id)
                return row is not None and not BatchStatus(row.status).is_terminal

        # The row first: batches have no status in Temporal to query by, so a scan lists those closed already too.
        if not await asyncio.to_thread(row_is_live) or not await self._ended_for_good(execution):
            self._batches_waiting.pop(execution.id, None)
            return 0
        reason = await termination_reason(self._client, execution.id, execution.run_id)
        completed_at = execution.close_time or datetime.now(timezone.utc)

        def final_state() -> tuple[bool, BatchState | None]:
            """(whether its items are still live, the batch's final state if its row can be closed now)"""
            with session_scope(self._engine) as session:
                row = get_batch(session, execution.id)
                if row is None or BatchStatus(row.status).is_terminal:
                    return False, None  # ended by the workflow itself, or closed already (by another worker)
                ended = ended_items_tally(session, execution.id, row.total)
                if ended is None:
                    return True, None
                started, tally = ended
                return False, batch_state(row).model_copy(update={
                    "status": BatchStatus.cancelled, "started": started, "tally": tally, "completed_at": completed_at,
                    "cancel_reason": terminated_error(execution.status, reason).message,
                })

        waiting, ended = await asyncio.to_thread(final_state)
        if waiting:
            self._batches_waiting[execution.id] = execution
            return 0
        self._batches_waiting.pop(execution.id, None)
        if ended is None:
            return 0
        # Before the row is closed, as a job's: a worker that stops in between starts it again at its next scan.
        batch = await started_with(
            self._client, self._client.get_workflow_handle(execution.id, run_id=execution.run_id), BatchInput)
        if batch.callback_url is not None:
            await self._start_webhook(WebhookDeliveryInput(
                event=BATCH_COMPLETED, callback_url=batch.callback_url, batch=batch_webhook_body(ended)),
                ended.batch_id)

        def close() -> bool:
            with session_scope(self._engine) as session:
                return close_ended_batch(session, ended)

        if not await asyncio.to_thread(close):
            return 0
        count_job_end(ended)  # only the write that closed the row counts it
        log.info("batch %s: %s; its row is closed as cancelled", execution.id, ended.cancel_reason)
        return 1

    async def _start_webhook(self, delivery: WebhookDeliveryInput, subject_id: str) -> None:
        try:
            await self._client.start_workflow(
                WebhookDeliveryWorkflow.run,
                delivery,
                id=webhook_workflow_id(subject_id, delivery.event),
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
                log.debug("reconciling jobs and batches ended in Temporal failed: %s", error)
            except Exception:  # a fault of the reconciler's own must not end it for the worker's lifetime
                log.exception("reconciling jobs and batches ended in Temporal failed")
            await asyncio.sleep(RECONCILE_EVERY_SECONDS)
