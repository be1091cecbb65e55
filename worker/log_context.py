"""The job, batch, template and request id of a workflow on the log lines of its activities (app.logs).

A workflow's input names them (`log_fields()` of GenerationInput, BatchInput, WebhookDeliveryInput); the
workflow sends them in a Temporal header with each activity and child workflow it starts, and the activity's
lines carry them. Headers are not compared on replay, and the fields are ids, never inputs (PRIVACY_MODE).
"""

from __future__ import annotations

from typing import Any

from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    StartActivityInput,
    StartChildWorkflowInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from app.logs import log_fields

HEADER = "gateway-log-fields"
# What a header may set: ids. Anything else in one (any client may start a workflow with headers) is ignored.
_CARRIED = ("request_id", "job_id", "batch_id", "template_id")


def _carried(fields: Any) -> dict[str, str]:
    if not isinstance(fields, dict):
        return {}
    return {name: value for name, value in fields.items() if name in _CARRIED and isinstance(value, str)}


class LogContextInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _WorkflowInbound


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        payload = input.headers.get(HEADER)
        fields = _carried(activity.payload_converter().from_payload(payload, dict)) if payload else {}
        with log_fields(**fields):  # a thread-pool activity runs in a copy of this context
            return await self.next.execute_activity(input)


class _WorkflowInbound(WorkflowInboundInterceptor):
    """One per workflow run: what it learns from its input, its outbound half sends on."""

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        self.fields: dict[str, str] = {}
        self.next.init(_WorkflowOutbound(outbound, self.fields))

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        payload = input.headers.get(HEADER)
        if payload:  # a child's parent's fields: the template of a job whose webhook this is
            self.fields.update(_carried(workflow.payload_converter().from_payload(payload, dict)))
        own = getattr(input.args[0], "log_fields", None) if input.args else None
        if callable(own):
            self.fields.update(_carried({name: value for name, value in own().items() if value is not None}))
        with log_fields(**self.fields):  # workflow.logger's lines (skipped on replay) carry them too
            return await self.next.execute_workflow(input)


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def __init__(self, next: WorkflowOutboundInterceptor, fields: dict[str, str]) -> None:
        super().__init__(next)
        self.fields = fields

    def _headers(self, headers: Any) -> dict[str, Payload]:
        if not self.fields:
            return dict(headers)
        return {**headers, HEADER: workflow.payload_converter().to_payload(self.fields)}

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._headers(input.headers)
        return self.next.start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._headers(input.headers)
        return self.next.start_local_activity(input)

    async def start_child_workflow(self, input: StartChildWorkflowInput) -> workflow.ChildWorkflowHandle[Any, Any]:
        input.headers = self._headers(input.headers)
        return await self.next.start_child_workflow(input)
