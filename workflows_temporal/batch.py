"""BatchWorkflow: a batch of jobs (POST /batches) run as one unit. Workflow id = batch id.

Each item is an ordinary job: a child GenerationWorkflow whose id is the item's job id, started with the
batch's shared input and the item's own inputs. At most `max_parallel` items are started and not yet ended at
once, so a batch of 1,000 does not put 1,000 workflows in Temporal together; the items beyond wait here, in
order. A run starts at most `items_per_run` items, waits for them to end, and continues as new with the rest:
the history of one run stays bounded however large the batch (the items left and the counts are carried
over). Waiting for the run's items before continuing as new keeps every child the run's own to await; it
costs at most `max_parallel` items' tail between two runs.

Cancelling (the `cancel` signal, or Temporal's own cancellation) cancels every item still running as the API
cancels a job (a `cancel` signal, then Temporal's cancellation: each item's workflow ends as Canceled), and the
items not started yet never start; they count as cancelled. The batch's row is written by this
workflow (a local activity) as it starts, as it continues as new and as it ends, and then, with a callbackUrl,
its one webhook `batch.completed` goes to a WebhookDeliveryWorkflow of its own.

Deterministic: no I/O, clock or randomness here.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import Priority, RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.batches import BatchActivities
    from app.batches import BATCH_COMPLETED, BatchInput, BatchItem, BatchState, BatchStatus, RecordBatchInput
    from app.batches import batch_webhook_body
    from app.models import CancelRequest, JobState, JobStatus, WebhookDeliveryInput
    from workflows_temporal.generation import GenerationWorkflow
    from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow, webhook_workflow_id

_RECORD_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=10))


@workflow.defn(name="BatchWorkflow")
class BatchWorkflow:
    def __init__(self) -> None:
        self._batch: BatchInput | None = None
        self._state: BatchState | None = None
        self._cancel: CancelRequest | None = None
        # The items this run started that have not ended, by job id.
        self._running: dict[str, workflow.ChildWorkflowHandle[GenerationWorkflow, JobState]] = {}
        # The tasks that await them, held here: an event loop keeps only weak references to its tasks.
        self._followers: set[asyncio.Task[None]] = set()

    @workflow.run
    async def run(self, batch: BatchInput) -> BatchState:
        self._batch = batch
        self._state = BatchState(
            batch_id=batch.batch_id, status=BatchStatus.running, template_id=batch.job.template_id,
            owner=batch.job.owner, priority=batch.job.priority, metadata=batch.job.metadata, total=batch.total,
            started=batch.started, tally=batch.tally.model_copy(), created_at=batch.created_at,
            started_at=batch.started_at or workflow.now(), cancel_reason=self._reason(),
        )
        await self._record()
        pending = list(batch.items)
        try:
            started_here = 0
            while pending and self._cancel is None and started_here < batch.items_per_run:
                await workflow.wait_condition(
                    lambda: len(self._running) < batch.max_parallel or self._cancel is not None)
                if self._cancel is None:
                    await self._start(pending.pop(0))
                    started_here += 1
            await workflow.wait_condition(lambda: not self._running)
        except asyncio.CancelledError:
            # Cancelled through Temporal itself (Web UI, CLI): the same path as the signal, then Canceled.
            await self.cancel(CancelRequest(reason="cancelled through Temporal", actor="temporal"))
            await workflow.wait_condition(lambda: not self._running)
            await self._finish(len(pending))
            raise
        if pending and self._cancel is None:
            await self._record()
            workflow.continue_as_new(batch.model_copy(update={
                "items": pending, "started": self._state.started, "tally": self._state.tally,
                "started_at": self._state.started_at,
            }))
        await self._finish(len(pending))
        return self._state

    @workflow.query
    def progress(self) -> BatchState:
        assert self._state is not None
        return self._state

    @workflow.signal
    async def cancel(self, request: CancelRequest) -> None:
        if self._cancel is not None or (self._state is not None and self._state.status.is_terminal):
            return
        self._cancel = request
        if self._state is not None:
            self._state.cancel_reason = self._reason()
        await asyncio.gather(*(self._cancel_item(handle) for handle in list(self._running.values())))

    # --- the items -------------------------------------------------------------------------------

    async def _start(self, item: BatchItem) -> None:
        assert self._batch is not None and self._state is not None
        job = self._batch.job.model_copy(update={
            "job_id": item.job_id, "inputs": item.inputs, "batch_id": self._batch.batch_id,
            "created_at": workflow.now(),
        })
        handle = await workflow.start_child_workflow(
            GenerationWorkflow.run,
            job,
            id=item.job_id,
            # A batch terminated in Temporal takes its running items with it (they end as cancelled).
            parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            priority=Priority(priority_key=job.priority, fairness_key=job.owner),
        )
        self._state.started += 1
        self._running[item.job_id] = handle
        follower = asyncio.create_task(self._follow(item.job_id, handle))
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)
        if self._cancel is not None:  # the cancel came while the item was being started
            await self._cancel_item(handle)

    async def _follow(self, job_id: str, handle: workflow.ChildWorkflowHandle[GenerationWorkflow, JobState]) -> None:
        assert self._state is not None
        try:
            status = (await handle).status
        except ChildWorkflowError as failure:
            # A job that failed raises its error; one cancelled or terminated through Temporal ended cancelled.
            status = JobStatus.failed if isinstance(failure.cause, ApplicationError) else JobStatus.cancelled
        finally:
            del self._running[job_id]
        self._state.tally.add(status)

    async def _cancel_item(self, handle: workflow.ChildWorkflowHandle[GenerationWorkflow, JobState]) -> None:
        """Cancel an item as the API cancels a job: the who and why by signal (its payload encrypted like any other,
        unlike a cancellation's reason), then Temporal's cancellation of the item's workflow, which stops its job
        so that the workflow ends as Canceled, its job `cancelled` with the batch's reason. The cancellation is
        requested through an external handle: the item's own task awaits its end, and is never cancelled."""
        assert self._cancel is not None and self._batch is not None
        batch_id = self._batch.batch_id
        reason = f"batch {batch_id} cancelled" + (f": {self._cancel.reason}" if self._cancel.reason else "")
        try:
            await handle.signal(GenerationWorkflow.cancel, CancelRequest(
                reason=reason, actor=self._cancel.actor, temporal_cancel_follows=True))
            # Names the batch and the actor only: the reason a caller gave stays out of the history's clear text.
            await workflow.get_external_workflow_handle(handle.id).cancel(
                reason=f"cancelled with its batch {batch_id} by {self._cancel.actor}")
        except ApplicationError:
            pass  # the item ended as the signal or the cancellation went out: nothing left to cancel

    # --- the batch's end -------------------------------------------------------------------------

    async def _finish(self, never_started: int) -> None:
        assert self._state is not None and self._batch is not None
        self._state.tally.cancelled += never_started
        self._state.status = BatchStatus.cancelled if self._cancel is not None else BatchStatus.completed
        self._state.completed_at = workflow.now()
        await self._record()
        if self._batch.callback_url is None:
            return
        try:
            await workflow.start_child_workflow(
                WebhookDeliveryWorkflow.run,
                WebhookDeliveryInput(event=BATCH_COMPLETED, callback_url=self._batch.callback_url,
                                     batch=batch_webhook_body(self._state), request_id=self._batch.job.request_id),
                id=webhook_workflow_id(self._batch.batch_id, BATCH_COMPLETED),
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                cancellation_type=workflow.ChildWorkflowCancellationType.ABANDON,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            pass  # started before, by a run of this batch that was reset: one webhook

    def _reason(self) -> str | None:
        if self._cancel is None:
            return None
        return f"cancelled by {self._cancel.actor}" + (f": {self._cancel.reason}" if self._cancel.reason else "")

    async def _record(self) -> None:
        assert self._state is not None
        await workflow.execute_local_activity_method(
            BatchActivities.record_batch,
            RecordBatchInput(batch=self._state),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_RECORD_RETRY,
        )
