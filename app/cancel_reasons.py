"""A job's cancel as Temporal's own cancellation request: its reason carries who cancelled the job and why.

The API cancels a job by requesting the cancellation of its workflow (not by a signal, as releases before the
console patch did), so that the workflow, having stopped the prompt and recorded the job's end, ends as Canceled
and the Web UI shows what happened. The request's reason is the only thing it carries to the workflow: the API
writes the `CancelRequest` there as JSON (readable in the Web UI's history), and the workflow reads it back. A
cancellation from the Web UI or the CLI carries the operator's words, or nothing.

No I/O: the workflow imports this module.
"""

from __future__ import annotations

import json

from app.models import CancelRequest

# Whoever cancels the workflow through Temporal itself (Web UI, CLI) rather than through the gateway's API.
TEMPORAL_ACTOR = "temporal"
_NO_REASON = "cancelled through Temporal"


def temporal_cancel_reason(request: CancelRequest) -> str:
    return json.dumps({"actor": request.actor, "reason": request.reason})


def cancel_request_from(reason: str | None) -> CancelRequest:
    """The CancelRequest the API wrote into the reason; an operator's own reason (or none) otherwise."""
    try:
        written = json.loads(reason or "")
    except ValueError:
        written = None
    if isinstance(written, dict) and isinstance(written.get("actor"), str) and isinstance(written.get("reason"), str):
        return CancelRequest(actor=written["actor"], reason=written["reason"])
    return CancelRequest(actor=TEMPORAL_ACTOR, reason=reason or _NO_REASON)
