"""Request bodies must be plain JSON: UTF-8 text of bounded size, nesting and number of values, finite
numbers that Python can hold, valid Unicode text.

Python's json module accepts NaN and Infinity, unpaired surrogates such as "\\ud800", and nesting as deep as
its recursion allows. None of these survive the way a job takes (Temporal's payloads, the database, ComfyUI):
a job nested 200 levels deep was accepted and then could not be decoded by the worker. So they are refused
up front, with the path to the offending value, before any route sees the body.

The number of values is bounded because parsing and validating a body cost in proportion to it, and both run
in C and Rust holding the interpreter's lock: on a worker thread or not, a body of a million keys stalled
every request for seconds. The values are counted before the body is parsed, in steps that let other threads
run.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response, validation_error
from app.errors import ErrorCode

# Deep enough for any ComfyUI graph (node → inputs → value → list), far below what breaks a payload.
MAX_DEPTH = 32
# Some twenty times what a graph of a thousand nodes holds (the bundled templates hold 30 to 200).
MAX_VALUES = 50_000
# Inline images (base64) make the largest bodies: several of up to INPUT_IMAGE_MAX_BYTES each.
MAX_BODY_BYTES = 64 * 1024 * 1024


def plain_json(raw: bytes) -> Any:
    """The value of a request body; ApiError (400) names what makes it not plain JSON. A large body takes a
    while: call this off the event loop."""
    text = _utf8_text(raw)
    if _holds_more_values_than(raw, MAX_VALUES):
        raise _refused("body", f"more than {MAX_VALUES} values (array items and object members)")
    try:
        value = json.loads(text, parse_int=_integer, parse_float=_decimal)
    except json.JSONDecodeError as error:
        raise _refused("body", f"not valid JSON ({error.msg} at character {error.pos})") from None
    except RecursionError:
        raise _refused("body", f"nested more than {MAX_DEPTH} levels deep") from None
    if (impurity := first_impurity(value)) is not None:
        path, reason = impurity
        raise _refused(path or "body", reason)
    return value


def _utf8_text(raw: bytes) -> str:
    # JSON exchanged between systems is UTF-8 without a byte order mark (RFC 8259); Python's json module
    # would also read UTF-16 and UTF-32, with or without one.
    encoding = json.detect_encoding(raw)
    if encoding == "utf-8-sig":
        raise _refused("body", "starts with a byte order mark; send UTF-8 without one")
    if encoding != "utf-8":
        raise _refused("body", f"looks like {encoding.upper()} text; send UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _refused("body", f"not UTF-8 text (byte {error.start} cannot be decoded)") from None


class _UnusableNumber:
    """What json.loads makes of a number Python cannot hold; first_impurity reports it with its path."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _integer(digits: str) -> int | _UnusableNumber:
    # Python refuses to convert an integer of more digits than this; json.loads would raise a ValueError that
    # names neither the value nor where it is.
    count, limit = len(digits.lstrip("-")), sys.get_int_max_str_digits()
    if limit and count > limit:
        return _UnusableNumber(f"an integer of {count} digits is too long (at most {limit})")
    return int(digits)


def _decimal(text: str) -> float | _UnusableNumber:
    value = float(text)
    if math.isinf(value):  # 1e400: not Infinity, which first_impurity refuses as such, but too large
        return _UnusableNumber("too large for a 64-bit floating-point number (at most about 1.8e308)")
    return value


def _refused(field: str, reason: str) -> ApiError:
    return validation_error([{"field": field, "message": reason}])


# Bytes read at most in one step of the count; each step holds the interpreter's lock for a few milliseconds.
_COUNT_STEP = 256 * 1024
_STRING_PART = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)  # up to the closing quote: escapes skipped
_BETWEEN_TOKENS = re.compile(rb'[^"\[{,]*+')  # up to a string, or a character that starts a value
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def _holds_more_values_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON text holds more than `limit` array items and object members, without parsing it: each
    follows a comma or the bracket of its container, outside strings. Text that is not JSON is counted all
    the same; parsing it then says what is wrong."""
    count, position, in_string = 0, 0, False
    while position < len(raw):
        step_end = min(position + _COUNT_STEP, len(raw))
        if in_string:
            position = _STRING_PART.match(raw, position, step_end).end()
            if position == step_end:
                continue
            if raw[position] == _BACKSLASH:  # an escape cut by the end of the step, or of the text
                if position + 1 == len(raw):
                    return False
                continue
            in_string = False
        else:
            position = _BETWEEN_TOKENS.match(raw, position, step_end).end()
            if position == step_end:
                continue
            if raw[position] == _QUOTE:
                in_string = True
            else:
                count += 1
                if count > limit:
                    return True
        position += 1
    return False


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
        elif isinstance(item, _UnusableNumber):
            return path, item.reason
    return None


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
