"""The activities of RetentionWorkflow: find a batch of expired jobs, leaving those whose workflow, or one of
their webhook deliveries, is still open in Temporal, and delete them. Both are idempotent: a job already gone, or
a file already deleted, is no error.

A job is deleted files first (its outputs, then the staged inputs no other job uses), then its closed workflows
in Temporal: its own (else the API would go on showing the job from there, until Temporal's own retention) and
its webhook deliveries' (whose input holds the job's state, metadata and callback URL); then its log, input
links and row in one transaction. A crash in between leaves the row, whose missing files show as OUTPUT_FILE_MISSING, and the next
run finishes the job's deletion.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from app.db import session_scope
from app.models import DeleteJobsInput, DeleteJobsResult, ExpiredJob, FindExpiredJobsInput, FindExpiredJobsResult
from app.retention import delete_job_records, expired_job_ids, input_used_elsewhere, inputs_left_unused
from app.storage import OutputStorage
from app.webhooks.events import EVENTS
from workflows_temporal.webhook_delivery import webhook_workflow_id

# Calls to Temporal at once while a batch is checked or deleted.
_CONCURRENT_CALLS = 20

T = TypeVar("T")
A = TypeVar("A")


async def _each(items: Iterable[A], call: Callable[[A], Awaitable[T]]) -> list[T]:
    turns = asyncio.Semaphore(_CONCURRENT_CALLS)

    async def in_turn(item: A) -> T:
        async with turns:
            return await call(item)

    return await asyncio.gather(*(in_turn(item) for item in items))


class RetentionActivities:
    def __init__(self, engine: Engine, storage: OutputStorage, client: Client) -> None:
        self._engine = engine
        self._storage = storage
        self._client = client

    @activity.defn(name="find_expired_jobs")
    async def find_expired_jobs(self, request: FindExpiredJobsInput) -> FindExpiredJobsResult:
        def expired() -> list[str]:
            with session_scope(self._engine) as session:
                return expired_job_ids(session, request.cutoff, request.after, request.limit)

        job_ids = await asyncio.to_thread(expired)
        # Each job's own workflow (id = job id) and one delivery workflow per webhook event it may have had.
        workflow_ids = [[job_id, *(webhook_workflow_id(job_id, event) for event in EVENTS)] for job_id in job_ids]
        every_id = [workflow_id for ids in workflow_ids for workflow_id in ids]
        runs = dict(zip(every_id, await _each(every_id, self._closed_run)))
        jobs: list[ExpiredJob] = []
        in_flight = 0
        for job_id, (own, *deliveries) in zip(job_ids, workflow_ids):
            if any(runs[workflow_id][0] for workflow_id in (own, *deliveries)):
                in_flight += 1  # a later run deletes it, once all of its workflows have closed
                continue
            jobs.append(ExpiredJob(
                job_id=job_id, run_id=runs[own][1],
                webhook_runs={workflow_id: run for workflow_id in deliveries if (run := runs[workflow_id][1])},
            ))
        return FindExpiredJobsResult(
            jobs=jobs, in_flight=in_flight, next_after=job_ids[-1] if len(job_ids) == request.limit else None,
        )

    async def _closed_run(self, workflow_id: str) -> tuple[bool, str | None]:
        """(is the workflow open, the run to delete). The row says the job ended, but its workflow may be
        running again, e.g. after a reset, and a webhook delivery may be retrying still: Temporal decides."""
        try:
            described = await self._client.get_workflow_handle(workflow_id).describe()
        except RPCError as error:
            if error.status is RPCStatusCode.NOT_FOUND:
                return False, None  # never started, or past Temporal's own retention
            raise
        return described.status is WorkflowExecutionStatus.RUNNING, described.run_id

    @activity.defn(name="delete_jobs")
    async def delete_jobs(self, request: DeleteJobsInput) -> DeleteJobsResult:
        job_ids = [job.job_id for job in request.jobs]
        result = DeleteJobsResult()
        # The storage SDKs block: off the event loop, one call at a time.
        for job_id in job_ids:
            result.output_files += await asyncio.to_thread(self._storage.delete_prefix, f"{job_id}/")
            activity.heartbeat()

        def unused_inputs() -> list[str]:
            with session_scope(self._engine) as session:
                return inputs_left_unused(session, job_ids)

        def used_elsewhere(key: str) -> bool:
            with session_scope(self._engine) as session:
                return input_used_elsewhere(session, key, job_ids)

        for key in await asyncio.to_thread(unused_inputs):
            # Unused when the batch was checked; a job sent since with the same image may be storing it now.
            if not await asyncio.to_thread(used_elsewhere, key):
                result.input_files += await asyncio.to_thread(self._storage.delete_prefix, key)
            activity.heartbeat()
        runs = [(job.job_id, job.run_id) for job in request.jobs if job.run_id]
        runs += [run for job in request.jobs for run in job.webhook_runs.items()]
        result.workflows = sum(await _each(runs, self._delete_workflow))

        def delete_records() -> int:
            with session_scope(self._engine) as session:
                return delete_job_records(session, job_ids)

        result.jobs = await asyncio.to_thread(delete_records)
        return result

    async def _delete_workflow(self, run: tuple[str, str]) -> bool:
        # That closed run only: deleting a running one would terminate it. Temporal deletes it in the
        # background (half a minute later on the dev server); until then the API still shows the job from it.
        workflow_id, run_id = run
        try:
            await self._client.workflow_service.delete_workflow_execution(DeleteWorkflowExecutionRequest(
                namespace=self._client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            ))
        except RPCError as error:
            if error.status is not RPCStatusCode.NOT_FOUND:
                raise
            return False
        return True
