"""The one logging set-up of every entry point (`comfyui-gateway api|worker|dev|...`): one JSON object per line
(LOG_FORMAT=json) or a line for people (text), at LOG_LEVEL, quiet by default.

Each line carries what is known where it was logged: the request id and job of an API request (`log_fields`,
a context variable the API's middleware and routes set), the job, template and request id a workflow's
activities run for (carried to them in a Temporal header, worker.log_context), and the Temporal workflow, run,
activity type and attempt (from `activity.info()`, or the `extra` of temporalio's `workflow.logger`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from datetime import datetime, timezone
from enum import Enum
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from temporalio import activity, workflow


class LogFormat(str, Enum):
    json = "json"
    text = "text"


# The fields a line may carry, in the order a text line shows them.
CONTEXT_FIELDS = ("request_id", "job_id", "batch_id", "template_id", "workflow_id", "run_id", "activity", "attempt")

_fields: ContextVar[Mapping[str, Any]] = ContextVar("gateway_log_fields", default={})

# Libraries that log a line per request or per message at INFO or DEBUG: a ComfyUI poll a second per waiting
# prompt would drown what the gateway has to say. sse_starlette narrates each event stream's chunks and
# disconnects, PIL each image plugin it loads. Their warnings still show.
_CHATTY = ("httpx", "httpcore", "websockets", "hpack", "multipart", "sse_starlette", "PIL")
# The `extra` temporalio's loggers add, and uvicorn's colored copy of its message: read, never printed as is.
_NOT_PRINTED = ("temporal_activity", "temporal_workflow", "color_message")


@contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Every line logged in the block (in this task and those it starts) carries `fields`; None ones are left out."""
    token = _fields.set({**_fields.get(), **{name: value for name, value in fields.items() if value is not None}})
    try:
        yield
    finally:
        # A workflow's coroutine closed by the garbage collector (its run evicted) ends in another context, where
        # there is nothing to restore.
        with suppress(ValueError):
            _fields.reset(token)


class ContextFilter(logging.Filter):
    """Puts the context's fields on each record as it is logged, in the thread and task that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        found: dict[str, Any] = {}
        temporal = getattr(record, "temporal_workflow", None) or getattr(record, "temporal_activity", None)
        if temporal is None and activity.in_activity():
            temporal = _activity_details(activity.info())
        if temporal:
            found |= {"workflow_id": temporal.get("workflow_id"),
                      "run_id": temporal.get("run_id") or temporal.get("workflow_run_id"),
                      "activity": temporal.get("activity_type"),
                      "attempt": temporal.get("attempt") if "activity_type" in temporal else None}
        found |= _fields.get()
        for name, value in found.items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


def _activity_details(info: activity.Info) -> dict[str, Any]:
    return {"workflow_id": info.workflow_id, "workflow_run_id": info.workflow_run_id,
            "activity_type": info.activity_type, "attempt": info.attempt}


class JsonLines(JsonFormatter):
    """`{"time": ..., "level": ..., "logger": ..., "message": ..., <fields>}`; time in ISO 8601, UTC, to the ms."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message"], rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time", reserved_attrs=[*RESERVED_ATTRS, *_NOT_PRINTED], json_ensure_ascii=False,
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # A field is there when it is known: an `extra` of None (a job without a template) is left out.
        time = _iso_utc(log_data.pop("time").timestamp())
        return {"time": time, **{name: value for name, value in log_data.items() if value is not None}}


class TextLines(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message> [field=value ...]`, for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return _iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        shown = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        if not shown:
            return line
        head, newline, traceback = line.partition("\n")
        return f"{head} [{shown}]{newline}{traceback}"


def _iso_utc(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` lines with their context's fields to `stream` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonLines() if log_format is LogFormat.json else TextLines())
    return handler


def configure_logging(level: str, log_format: LogFormat) -> None:
    """The process's logging: one handler on the root logger, at `level`, the chatty libraries at WARNING."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(log_handler(log_format))
    root.setLevel(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Alembic narrates every schema check at INFO (its plugins, its dialect); `migrate` prints what it did.
    logging.getLogger("alembic").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # uvicorn's lines come here (api.http_server gives it no logging config of its own); at INFO it narrates
    # its start-up and shutdown, which `comfyui-gateway api` says in a line of its own once the port listens.
    logging.getLogger("uvicorn.error").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # The lines carry the workflow and activity as fields; temporalio would also append them to the message.
    activity.logger.activity_info_on_message = False
    workflow.logger.workflow_info_on_message = False
