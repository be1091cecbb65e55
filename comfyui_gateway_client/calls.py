"""Every JSON call of the gateway's API, described once: what request to send and how to read its answer.
`GatewayClient` and `AsyncGatewayClient` only execute these descriptions (blocking, or on an event loop), so
the two never differ in what they send or how they parse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode

import httpx
from pydantic import BaseModel

from comfyui_gateway_client.errors import UNEXPECTED_ANSWER, GatewayError, error_from_answer
from comfyui_gateway_client.models import (
    Base64Output,
    Batch,
    Capabilities,
    CancelledBatch,
    CancelledJob,
    Health,
    Job,
    JobLogs,
    JobPage,
    OutputList,
    SubmittedBatch,
    SubmittedJob,
    Workflow,
    WorkflowChange,
    WorkflowSummary,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer. `answers`: the statuses whose body is the result (others are
    errors): /health answers its report with 503 too."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    answers: frozenset[int] = frozenset({200, 201, 202, 204})
    waits: float = 0.0  # how long the gateway may hold the answer on purpose (`wait=`), beyond the timeout

    def result(self, response: httpx.Response) -> T:
        if response.status_code not in self.answers:
            raise error_from_answer(response)
        try:
            return self.read(response)
        except (ValueError, KeyError, TypeError) as error:  # not JSON, or JSON of another shape: not the gateway's
            raise GatewayError(UNEXPECTED_ANSWER, f"{self.method} {self.path}: {error}",
                               status=response.status_code) from error


def segment(value: str) -> str:
    """A path segment, escaped: an id or a file name never changes which route is called."""
    return quote(value, safe="")


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def _nothing(_: httpx.Response) -> None:
    return None


def _workflows(response: httpx.Response) -> list[WorkflowSummary]:
    return [WorkflowSummary.model_validate(entry) for entry in response.json()["workflows"]]


def _workflow(response: httpx.Response) -> Workflow:
    return Workflow.model_validate(response.json()["workflow"])


def _given(**values: Any) -> dict[str, Any]:
    """The fields a caller gave (None is "not given"), as the API spells them."""
    return {name: value for name, value in values.items() if value is not None}


def _instant(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def health() -> Call[Health]:
    return Call("GET", "/health", _model(Health), answers=frozenset({200, 503}))


def capabilities() -> Call[Capabilities]:
    return Call("GET", "/capabilities", _model(Capabilities))


def submit(
    template: str | None = None, inputs: Mapping[str, Any] | None = None, *, workflow_json: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None,
    retry: Mapping[str, Any] | None = None, timeout_seconds: float | None = None, callback_url: str | None = None,
    webhook_events: list[str] | None = None, output_format: str | None = None, quality: int | None = None,
    priority: str | int | None = None, backend_tag: str | None = None, idempotency_key: str | None = None,
) -> Call[SubmittedJob]:
    """`POST /jobs`: a template by id (`template`) or an inline graph (`workflow_json`), with its inputs."""
    body = _given(workflowId=template, workflowJson=workflow_json, inputs=inputs, params=params, metadata=metadata,
                  retry=retry, timeoutSeconds=timeout_seconds, callbackUrl=callback_url, webhookEvents=webhook_events,
                  outputFormat=output_format, quality=quality, priority=priority, backendTag=backend_tag)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call("POST", "/jobs", _model(SubmittedJob), json=body, headers=headers)


def get_job(job_id: str, *, wait: float | None = None) -> Call[Job]:
    """`GET /jobs/{jobId}`; `wait` (seconds) answers once the job has ended, or as it is when the wait runs out."""
    return Call("GET", f"/jobs/{segment(job_id)}", _model(Job), params=_given(wait=wait), waits=wait or 0.0)


def list_jobs(
    *, status: str | None = None, template: str | None = None, batch_id: str | None = None,
    after: datetime | str | None = None, before: datetime | str | None = None, limit: int | None = None,
    offset: int | None = None,
) -> Call[JobPage]:
    return Call("GET", "/jobs", _model(JobPage), params=_given(
        status=status, workflowId=template, batchId=batch_id, after=_instant(after), before=_instant(before),
        limit=limit, offset=offset))


def cancel_job(job_id: str, reason: str = "") -> Call[CancelledJob]:
    return Call("POST", f"/jobs/{segment(job_id)}/cancel", _model(CancelledJob), json={"reason": reason})


def job_logs(job_id: str) -> Call[JobLogs]:
    return Call("GET", f"/jobs/{segment(job_id)}/logs", _model(JobLogs))


def outputs(job_id: str) -> Call[OutputList]:
    return Call("GET", f"/outputs/{segment(job_id)}", _model(OutputList))


def output_base64(job_id: str, filename: str) -> Call[Base64Output]:
    return Call("GET", output_path(job_id, filename), _model(Base64Output), params={"format": "base64"})


def output_path(job_id: str, filename: str) -> str:
    return f"/outputs/{segment(job_id)}/{segment(filename)}"


def feed_path(status: str | Sequence[str] | None, workflow_id: str | None, batch_id: str | None) -> str:
    """`/events` with the feed's filters in its query (a stream is no Call: the clients follow it themselves)."""
    statuses = status if status is None or isinstance(status, str) else ",".join(status)
    query = urlencode(_given(status=statuses, workflowId=workflow_id, batchId=batch_id))
    return f"/events?{query}" if query else "/events"


def list_workflows() -> Call[list[WorkflowSummary]]:
    return Call("GET", "/workflows", _workflows)


def get_workflow(template: str) -> Call[Workflow]:
    return Call("GET", f"/workflows/{segment(template)}", _workflow)


def create_workflow(
    template: str, workflow_json: Mapping[str, Any], *, name: str | None = None, description: str | None = None,
    input_schema: Mapping[str, Any] | None = None, default_params: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None, backend_tag: str | None = None,
) -> Call[WorkflowChange]:
    """`POST /workflows` (admin): register a graph in ComfyUI's API format as template `template`."""
    body = _given(id=template, name=name or template, description=description, workflowJson=workflow_json,
                  inputSchema=input_schema, defaultParams=default_params, limits=limits, backendTag=backend_tag)
    return Call("POST", "/workflows", _model(WorkflowChange), json=body)


def update_workflow(
    template: str, *, name: str | None = None, description: str | None = None,
    workflow_json: Mapping[str, Any] | None = None, input_schema: Mapping[str, Any] | None = None,
    default_params: Mapping[str, Any] | None = None, limits: Mapping[str, Any] | None = None,
    backend_tag: str | None = None,
) -> Call[WorkflowChange]:
    """`PUT /workflows/{id}` (admin): the fields given replace the current ones in a new version."""
    body = _given(name=name, description=description, workflowJson=workflow_json, inputSchema=input_schema,
                  defaultParams=default_params, limits=limits, backendTag=backend_tag)
    return Call("PUT", f"/workflows/{segment(template)}", _model(WorkflowChange), json=body)


def delete_workflow(template: str) -> Call[None]:
    return Call("DELETE", f"/workflows/{segment(template)}", _nothing)


def submit_batch(
    template: str, items: list[Mapping[str, Any]], *, priority: str | int | None = None,
    callback_url: str | None = None, metadata: Mapping[str, Any] | None = None,
) -> Call[SubmittedBatch]:
    body = _given(workflowId=template, items=items, priority=priority, callbackUrl=callback_url, metadata=metadata)
    return Call("POST", "/batches", _model(SubmittedBatch), json=body)


def get_batch(batch_id: str) -> Call[Batch]:
    return Call("GET", f"/batches/{segment(batch_id)}", _model(Batch))


def batch_jobs(batch_id: str, *, status: str | None = None, limit: int | None = None,
               offset: int | None = None) -> Call[JobPage]:
    return Call("GET", f"/batches/{segment(batch_id)}/jobs", _model(JobPage),
                params=_given(status=status, limit=limit, offset=offset))


def cancel_batch(batch_id: str, reason: str = "") -> Call[CancelledBatch]:
    return Call("POST", f"/batches/{segment(batch_id)}/cancel", _model(CancelledBatch), json={"reason": reason})
