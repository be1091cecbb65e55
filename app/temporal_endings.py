"""Jobs whose workflows Temporal itself ended (terminated by an operator, or timed out): such a workflow never
wrote its own end, so its job ends as `cancelled` with JOB_TERMINATED and the operator's reason.

A workflow that ended as Canceled is not one of them: a cancellation (the API's, the Web UI's) is the workflow's
to carry out, and it records the job's end (`cancelled`, who and why) before it ends so; Completed and Failed
likewise. Its job is read from its row, as theirs are."""

from __future__ import annotations

from typing import TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowHistoryEventFilterType
from temporalio.service import RPCError, RPCStatusCode

from app.errors import ErrorCode
from app.models import GenerationInput, JobError

_Input = TypeVar("_Input")

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


async def started_input(client: Client, handle: WorkflowHandle) -> GenerationInput:
    """What the job's workflow was started with: the first event of its history (a terminated workflow's too)."""
    return await started_with(client, handle, GenerationInput)


async def started_with(client: Client, handle: WorkflowHandle, input_type: type[_Input]) -> _Input:
    """What a workflow's run was started with (a job's GenerationInput, a batch's BatchInput): the first event of
    its history."""
    async for event in handle.fetch_history_events(page_size=1):
        [started] = await client.data_converter.decode(
            event.workflow_execution_started_event_attributes.input.payloads, [input_type]
        )
        return started
    raise RPCError("the workflow has no history", RPCStatusCode.NOT_FOUND, b"")
