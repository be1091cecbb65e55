"""Counts and times every API request by its route's template (`/jobs/{job_id}`), never the path a client sent:
ids, and paths that match no route, make no new series (gateway_http_requests, _duration_seconds in app.metrics).

Outermost of the API's middleware, so that the answers other middleware gives themselves (429, 413, 503,
CORS preflights) are counted too, under the route they were meant for. A request is timed to its answer's
start: an event stream or a `wait=` is timed to when it opens or answers, not for as long as it stays open.
"""

from __future__ import annotations

import time

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

UNMATCHED = "(unmatched)"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The template of the route that took the request (FastAPI's scope["route"]), or of the one whose path it
    matches (answered before routing: a rate limit, a method the route lacks); UNMATCHED for any other path."""
    route = scope.get("route")
    if route is None:
        route = next((candidate for candidate in routes if candidate.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", None) or UNMATCHED


class RequestMetrics:
    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes  # the app's, read at each request: routers are included after the middleware is added

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered = False

        def observe(status: int) -> None:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = route_template(scope, self.routes)
            HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            HTTP_REQUEST_DURATION.labels(method=method, route=route).observe(time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:  # a cancellation (the client went away) is no answer, and not counted
            if not answered:
                observe(500)  # what Starlette's outermost middleware answers for it
            raise
