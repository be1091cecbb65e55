"""X-Request-ID: every request has one, the client's when it is sane (1 to 128 letters, digits and `._:-`),
else one made here (uuid4 hex). Every answer carries it, errors included; every line logged while the request
is handled carries it (app.logs), and a job it creates carries it into its workflow, its activities' lines and
its webhooks. One access line per request, at INFO with ACCESS_LOG, else at DEBUG: the path, never the query
(a signed URL's secrets are there); under PRIVACY_MODE the route's template (`/jobs/{job_id}`), never the path,
whose ids and file names say who asked for what.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.request_metrics import route_template
from app.logs import log_fields

HEADER = "X-Request-ID"
MAX_LENGTH = 128
_SANE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}")
_SCOPE_KEY = "gateway.request_id"

log = logging.getLogger("api.access")


def sane_request_id(given: str | None) -> str:
    """The client's id if it is sane, else a new one: an id is copied into logs and headers, so it is bounded."""
    return given if given is not None and _SANE.fullmatch(given) else uuid.uuid4().hex


def request_id_of(scope: Scope) -> str | None:
    return scope.get(_SCOPE_KEY)


class RequestIds:
    """ASGI middleware: the request's id (see the module). Outermost: the server's own refusals carry it too.
    A request that has one already (the server's layers and the app both have this) passes through.
    With `routes` (PRIVACY_MODE), the access line names the route's template among them, not the path."""

    def __init__(self, app: ASGIApp, *, access_log: bool, routes: list[BaseRoute] | None = None) -> None:
        self.app = app
        self.access_level = logging.INFO if access_log else logging.DEBUG
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = sane_request_id(given.decode("latin-1") if given is not None else None)
        scope[_SCOPE_KEY] = request_id
        status: int | None = None
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        with log_fields(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                took = round((time.perf_counter() - started) * 1000)
                path = scope["path"] if self.routes is None else route_template(scope, self.routes)
                log.log(self.access_level, "%s %s %s in %d ms", scope["method"], path, status or "-", took,
                        extra={"method": scope["method"], "path": path, "status": status, "duration_ms": took})
