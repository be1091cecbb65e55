"""RetentionWorkflow: delete the jobs that ended more than RETENTION_DAYS ago, in batches. The worker's retention
schedule starts it every hour (worker/retention_schedule.py); it can be started by hand too.

Deterministic: the cutoff is counted back from the time the schedule meant the run for (or, started by hand,
from the workflow's start), never from a clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from activities.retention import RetentionActivities
    from app.models import DeleteJobsInput, FindExpiredJobsInput, RetentionInput, RetentionResult

# Set by Temporal on every workflow a schedule starts.
SCHEDULED_START_TIME = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")

_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1), maximum_attempts=10)


@workflow.defn
class RetentionWorkflow:
    @workflow.run
    async def run(self, request: RetentionInput) -> RetentionResult:
        scheduled: datetime = workflow.info().typed_search_attributes.get(SCHEDULED_START_TIME) or workflow.now()
        result = RetentionResult(cutoff=scheduled - timedelta(days=request.retention_days))
        after: str | None = ""
        while after is not None:
            found = await workflow.execute_activity_method(
                RetentionActivities.find_expired_jobs,
                FindExpiredJobsInput(cutoff=result.cutoff, after=after, limit=request.batch_size),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=_RETRY,
            )
            result.in_flight += found.in_flight
            if found.jobs:
                deleted = await workflow.execute_activity_method(
                    RetentionActivities.delete_jobs,
                    DeleteJobsInput(jobs=found.jobs),
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=timedelta(minutes=1),
                    retry_policy=_RETRY,
                )
                result.jobs += deleted.jobs
                result.output_files += deleted.output_files
                result.input_files += deleted.input_files
                result.workflows += deleted.workflows
            after = found.next_after
        workflow.logger.info(
            "retention: deleted %d jobs that ended before %s (%d output files, %d staged inputs, %d workflows); "
            "%d such jobs left alone, their workflows still open",
            result.jobs, result.cutoff.isoformat(), result.output_files, result.input_files, result.workflows,
            result.in_flight,
        )
        return result
