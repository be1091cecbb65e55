"""The activities of RetentionWorkflow: find a batch of expired jobs, leaving those whose workflow is still open
in Temporal, and delete them. Both are idempotent: a job already gone, or a file already deleted, is no error.

A job is deleted files first (its outputs, then the staged inputs no other job uses), then its log, input links
and row in one transaction. A crash in between leaves the row, whose missing files show as OUTPUT_FILE_MISSING,
and the next run finishes the job's deletion.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from app.db import session_scope
from app.models import DeleteJobsInput, DeleteJobsResult, FindExpiredJobsInput, FindExpiredJobsResult
from app.retention import delete_job_records, expired_job_ids, inputs_left_unused
from app.storage import OutputStorage

# Describe calls to Temporal at once while a batch is checked.
_CONCURRENT_DESCRIBES = 20


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
        turns = asyncio.Semaphore(_CONCURRENT_DESCRIBES)

        async def is_open(job_id: str) -> bool:
            async with turns:
                return await self._workflow_is_open(job_id)

        open_ = await asyncio.gather(*(is_open(job_id) for job_id in job_ids))
        return FindExpiredJobsResult(
            job_ids=[job_id for job_id, still_open in zip(job_ids, open_) if not still_open],
            in_flight=sum(open_),
            next_after=job_ids[-1] if len(job_ids) == request.limit else None,
        )

    async def _workflow_is_open(self, job_id: str) -> bool:
        # The row says the job ended, but its workflow (id = job id) may still be running, e.g. a new attempt
        # after a reset: Temporal decides.
        try:
            described = await self._client.get_workflow_handle(job_id).describe()
        except RPCError as error:
            if error.status is RPCStatusCode.NOT_FOUND:
                return False  # never started, or past Temporal's own retention
            raise
        return described.status is WorkflowExecutionStatus.RUNNING

    @activity.defn(name="delete_jobs")
    def delete_jobs(self, request: DeleteJobsInput) -> DeleteJobsResult:
        # Sync: the storage SDKs block; this runs on the worker's activity thread pool.
        result = DeleteJobsResult()
        for job_id in request.job_ids:
            result.output_files += self._storage.delete_prefix(f"{job_id}/")
            activity.heartbeat()
        with session_scope(self._engine) as session:
            unused = inputs_left_unused(session, request.job_ids)
        for key in unused:
            result.input_files += self._storage.delete_prefix(key)
            activity.heartbeat()
        with session_scope(self._engine) as session:
            result.jobs = delete_job_records(session, request.job_ids)
        return result
