"""A webhook's body: built once per event, as compact JSON that re-serialises to the same bytes.

Receivers such as n8n's Code node check a signature by parsing the body and serialising it again
(`JSON.stringify(JSON.parse(body))`), so the body is written the way JavaScript writes JSON: no spaces, UTF-8
not escaped, and whole numbers without `.0` (JavaScript has one number type; Python writes 1.0 for a float).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from app.models import JobState
from app.output_routes import output_route
from app.storage import OutputStorage


def webhook_body(
    event: str, state: JobState, storage: OutputStorage, base_url: str, progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A webhook's body: the job as its event saw it, shaped as `GET /jobs/{id}` shows it. Output URLs are the
    API's own route made absolute with PUBLIC_BASE_URL: they keep working for as long as the receiver retries
    and after (a presigned URL of the store's would expire). No inputs."""
    outputs = [
        {
            "filename": output.filename, "storagePath": storage.location(output.storage_key),
            "url": base_url + output_route(state.job_id, output.filename), "size": output.size,
            "sha256": output.sha256, "contentType": output.content_type, "nodeId": output.node_id,
            "animated": output.animated,
        }
        for output in state.outputs
    ]
    body: dict[str, Any] = {
        "event": event,
        "jobId": state.job_id,
        "status": state.status.value,
        "workflowId": state.template_id,
        "result": {"outputs": outputs},
        "error": state.error.model_dump(mode="json") if state.error else None,
        "metadata": state.metadata,
        "timing": {
            "createdAt": _instant(state.created_at), "startedAt": _instant(state.started_at),
            "completedAt": _instant(state.completed_at), "executionTimeMs": state.execution_time_ms,
        },
    }
    if progress is not None:
        body["progress"] = progress
    return body


def _instant(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _as_javascript_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _as_javascript_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_javascript_numbers(item) for item in value]
    return value


def compact_json(value: Any) -> str:
    """`value` as JSON that JSON.stringify(JSON.parse(...)) and Python's re-serialisation give back unchanged."""
    return json.dumps(_as_javascript_numbers(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
