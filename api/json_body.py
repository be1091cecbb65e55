"""A route's JSON body is parsed, checked as plain JSON and validated against the route's model on a worker
thread, before FastAPI's own handling of the request.

FastAPI does all three on the event loop. A body of a million keys took it 12 to 22 s, most of it listing a
million errors, and every other request waited that long. Off the loop, the work of one body delays the
others only in the steps that hold the interpreter's lock (parsing in C, validating in Rust), each bounded
by plain_json's MAX_VALUES. FastAPI then validates the value once more, which for a value that passed costs
little.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from api.errors import request_validation_error
from api.plain_json import plain_json

if TYPE_CHECKING:
    from fastapi._compat import ModelField


class JsonBodyRoute(APIRoute):
    """The route class of every router whose routes take a body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        body_field = self.body_field
        if body_field is None:
            return handle

        async def handle_checked_body(request: Request) -> Response:
            request = _CheckedBodyRequest(request.scope, request.receive)
            if raw := await request.body():
                request.value = await run_in_threadpool(_checked_value, raw, body_field)
            return await handle(request)

        return handle_checked_body


class _CheckedBodyRequest(Request):
    """A request whose body is already parsed and checked: FastAPI asks for the value as `request.json()`."""

    value: Any

    async def json(self) -> Any:
        return self.value


def _checked_value(raw: bytes, body_field: ModelField) -> Any:
    value = plain_json(raw)
    _, errors = body_field.validate(value, loc=("body",))
    if errors:
        raise request_validation_error(errors)
    return value
