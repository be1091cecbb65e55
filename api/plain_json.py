"""Request bodies must be plain JSON: bounded size and nesting, finite numbers, valid Unicode text.

Python's json module accepts NaN and Infinity, unpaired surrogates such as "\\ud800", and nesting as deep as
its recursion allows. None of these survive the way a job takes (Temporal's payloads, the database, ComfyUI):
a job nested 200 levels deep was accepted and then could not be decoded by the worker. So they are refused
up front, with the path to the offending value, before any route sees the body.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, validation_error
from app.errors import ErrorCode

# Deep enough for any ComfyUI graph (node → inputs → value → list), far below what breaks a payload.
MAX_DEPTH = 32
# Inline images (base64) make the largest bodies: several of up to INPUT_IMAGE_MAX_BYTES each.
MAX_BODY_BYTES = 64 * 1024 * 1024


def first_impurity(value: Any) -> tuple[str, str] | None:
    """(path, reason) of the first value that is not plain JSON, or None."""
    pending: list[tuple[Any, str, int]] = [(value, "", 0)]
    while pending:
        item, path, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                return path, f"nested more than {MAX_DEPTH} levels deep"
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and not _is_unicode(key):
                    return _join(path, _printable(key)), "the name is not valid Unicode text (an unpaired surrogate)"
                pending.append((child, _join(path, str(key) if isinstance(key, int) else _printable(key)), depth + 1))
        elif isinstance(item, str) and not _is_unicode(item):
            return path, "not valid Unicode text (an unpaired surrogate)"
        elif isinstance(item, float) and not math.isfinite(item):
            return path, "NaN and Infinity are not JSON numbers"
    return None


async def require_plain_json(request: Request) -> None:
    """A router dependency: FastAPI has parsed the body by now; refuse it if it is not plain JSON."""
    if not await request.body():
        return
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return  # not JSON, or past the parser's nesting limit: the route's own validation says so, if it has a body
    if (impurity := first_impurity(body)) is not None:
        path, reason = impurity
        raise validation_error([{"field": path or "body", "message": reason}])


class BodySizeLimit:
    """ASGI middleware: a body over MAX_BODY_BYTES is refused with 413 as it streams in, whether or not the
    client declared its length, so an oversized body is never read whole into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await body_too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI passes an HTTPException raised while it reads the body on to the error handlers.
                raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)


def body_too_large(max_bytes: int) -> JSONResponse:
    return error_response(
        413, ErrorCode.REQUEST_TOO_LARGE.value, f"the request body is larger than {max_bytes} bytes",
        {"fields": [{"field": "body", "message": f"larger than {max_bytes} bytes"}]},
    )


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
