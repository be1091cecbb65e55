"""ComfyUI failures, classified into the gateway's stable error codes."""

from __future__ import annotations

from typing import Any

from app.errors import ErrorCode, temporal_retries


# ComfyUI's messages can quote an input in full (a 900 KB string, a traceback); the failure must stay far
# below Temporal's payload limit and readable in a job's error.
MAX_MESSAGE_CHARS = 2000
MAX_DETAIL_STRING_CHARS = 1000


# The failure detail that carries when ComfyUI started the failed prompt (ms since the epoch, from its history):
# the workflow takes it for the job's startedAt and keeps it out of the job's public error.
STARTED_AT_MS_DETAIL = "startedAtMs"


class ComfyError(Exception):
    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> None:
        message = _shortened(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = _shortened_strings(details or {})

    @property
    def retryable(self) -> bool:
        return temporal_retries(self.code)


def _is_out_of_memory(exception_type: str, message: str) -> bool:
    # torch.OutOfMemoryError (ComfyUI's real OOM path) or the RuntimeError older torch builds raise.
    return "OutOfMemoryError" in exception_type or "out of memory" in message.lower()


def classify_execution_error(data: dict[str, Any]) -> ComfyError:
    """`execution_error` (WS message or last history message) → COMFYUI_OOM or COMFYUI_NODE_ERROR."""
    exception_type = str(data.get("exception_type", ""))
    message = str(data.get("exception_message", "")).strip()
    details = {
        "nodeId": data.get("node_id"),
        "nodeType": data.get("node_type"),
        "exceptionType": exception_type,
        "exceptionMessage": message,
        "executed": data.get("executed", []),
    }
    if _is_out_of_memory(exception_type, message):
        return ComfyError(ErrorCode.COMFYUI_OOM, f"ComfyUI ran out of memory in node {data.get('node_id')}", details)
    summary = message.splitlines()[0] if message else exception_type
    return ComfyError(
        ErrorCode.COMFYUI_NODE_ERROR,
        f"node {data.get('node_id')} ({data.get('node_type')}) failed: {summary}",
        details,
    )


def classify_interrupted(data: dict[str, Any]) -> ComfyError:
    return ComfyError(
        ErrorCode.COMFYUI_INTERRUPTED,
        "the prompt was interrupted on ComfyUI by someone other than the gateway",
        {"nodeId": data.get("node_id"), "nodeType": data.get("node_type")},
    )


def classify_prompt_rejection(status_code: int, body: Any) -> ComfyError:
    """`POST /prompt` 400: ComfyUI's own validation, with which node, which input and why."""
    if not isinstance(body, dict):
        return ComfyError(ErrorCode.VALIDATION_ERROR, f"ComfyUI rejected the prompt (HTTP {status_code})", {})
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    node_errors = body.get("node_errors") if isinstance(body.get("node_errors"), dict) else {}
    message = error.get("message") or "ComfyUI rejected the prompt"
    if error.get("details"):
        message = f"{message}: {error['details']}"
    reasons = [
        f"node {node_id} ({info.get('class_type')}): {item.get('message')} [{item.get('details')}]"
        for node_id, info in node_errors.items()
        for item in info.get("errors", [])
    ]
    if reasons:
        message = f"{message}: " + "; ".join(reasons)
    # extra_info may carry ComfyUI's own traceback: keep the reason, drop the internals.
    cleaned_node_errors = {
        node_id: {
            "classType": info.get("class_type"),
            "errors": [
                {"type": item.get("type"), "message": item.get("message"), "details": item.get("details"),
                 "input": (item.get("extra_info") or {}).get("input_name")}
                for item in info.get("errors", [])
            ],
        }
        for node_id, info in node_errors.items()
    }
    return ComfyError(
        ErrorCode.VALIDATION_ERROR,
        message,
        {"comfyError": {"type": error.get("type"), "message": error.get("message"), "details": error.get("details")},
         "nodeErrors": cleaned_node_errors},
    )


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def _shortened_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _shortened(value, MAX_DETAIL_STRING_CHARS)
    if isinstance(value, dict):
        return {key: _shortened_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shortened_strings(item) for item in value]
    return value
