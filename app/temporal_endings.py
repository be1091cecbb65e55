"""Jobs whose workflows Temporal itself ended (terminated by an operator, or timed out): such a workflow never
wrote its own end, so its job ends as `cancelled` with JOB_TERMINATED and the operator's reason."""

from __future__ import annotations

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistoryEventFilterType

from app.errors import ErrorCode
from app.models import JobError

_ENDED_BY_TEMPORAL = {
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.TIMED_OUT: "timed out",
}


def ended_by_temporal(status: WorkflowExecutionStatus | None) -> bool:
    return status in _ENDED_BY_TEMPORAL


def terminated_error(status: WorkflowExecutionStatus, reason: str) -> JobError:
    message = f"{_ENDED_BY_TEMPORAL[status]} in Temporal" + (f": {reason}" if reason else "")
    return JobError(code=ErrorCode.JOB_TERMINATED, message=message)


async def termination_reason(client: Client, workflow_id: str, run_id: str | None) -> str:
    """The operator's reason, from the close event of the run that was ended (empty for a timeout)."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    async for event in handle.fetch_history_events(event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT):
        if event.HasField("workflow_execution_terminated_event_attributes"):
            return event.workflow_execution_terminated_event_attributes.reason
    return ""
