"""How `comfyui-gateway api` serves the API: uvicorn, with limits for clients that are slow or many.

Without them, 1,000 connections that sent a request line slowly were never closed, and a body shorter than
its Content-Length held its request for ever. uvicorn closes idle keep-alive connections (after 5 s) and
bounds a request's head (16 KB), but sets no deadline for the head to arrive, nor for a body that stops
arriving; `HeaderTimeoutProtocol` and `BodyReadTimeout` add them. `ConcurrencyLimit` refuses requests beyond
a number at once, with the API's JSON error: uvicorn's own limit answers in plain text, and counts the
connections that have not sent a request yet, so a crowd of slow clients would turn every request away.
`ReadsInTurn` lets reads take turns, so that polling cannot crowd out submissions. A request that waits for
a job to end (`wait=`, api.job_waits) steps aside from both once it starts waiting (`step_aside`): it costs
nothing while it waits, and a crowd of waiters must neither turn other requests away nor hold the read
turns; `API_MAX_CONCURRENT_WAITS` bounds the waiters instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from api.errors import error_response
from api.request_ids import RequestIds
from app.errors import ErrorCode, http_status
from app.settings import Settings

log = logging.getLogger(__name__)


# The scope's list of what gives back the request's places in the limits below, for `step_aside`.
_STEP_ASIDE = "gateway.step_aside"


def step_aside(scope: Scope) -> None:
    """The request gives back its place in the concurrency limit and its read turn for the rest of its life:
    it is about to wait long for something that costs the server nothing meanwhile."""
    for give_back in scope.pop(_STEP_ASIDE, []):
        give_back()


def _on_step_aside(scope: Scope, give_back: Callable[[], None]) -> Callable[[], None]:
    """`give_back`, to be called once: by `step_aside`, or when the request ends."""
    given = False

    def once() -> None:
        nonlocal given
        if not given:
            given = True
            give_back()

    scope.setdefault(_STEP_ASIDE, []).append(once)
    return once


def server_config(app: FastAPI, settings: Settings) -> ServerConfig:
    return ServerConfig(
        # The request id outermost: a request refused as one too many has one as well.
        RequestIds(ConcurrencyLimit(
            ReadsInTurn(BodyReadTimeout(app, settings.api_body_timeout_s), settings.api_concurrent_reads),
            settings.api_max_concurrent_requests,
        ), access_log=settings.access_log, routes=app.router.routes if settings.privacy_mode else None),
        header_timeout=settings.api_header_timeout_s,
        timeout_keep_alive=settings.api_keep_alive_s,
        host=settings.host,
        port=settings.port,
        # The process's logging (app.logs) sets uvicorn's levels and formats its lines; RequestIds writes the
        # access lines.
        log_config=None,
        log_level=None,
        access_log=False,
    )


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, with a deadline for each request's line and headers."""

    def __init__(self, app: ASGIApp, *, header_timeout: float, **options: Any) -> None:
        super().__init__(app, http=HeaderTimeoutProtocol, **options)
        self.header_timeout = header_timeout


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request line and headers have not all arrived
    `header_timeout` seconds after the connection opened, or after the first byte of a later request on it."""

    def __init__(self, config: ServerConfig, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout = config.header_timeout
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Between requests, uvicorn's keep-alive timer runs until a byte arrives; from then on, this one.
        if self.conn.their_state is h11.IDLE:
            self._await_head()
        else:
            self._stop_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.header_timeout, self._head_too_late)

    def _stop_waiting(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_late(self) -> None:
        self.head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: no request head within %g s", self.client, self.header_timeout)
            self.transport.close()


class BodyReadTimeout:
    """ASGI middleware: while a request's body is incomplete, each read waits at most `seconds` for more of it;
    then the request is refused with 408 and its connection closed. A slow body is fine; a stopped one is not."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_complete = False

        async def timed_receive() -> Message:
            nonlocal body_complete
            if body_complete:  # later reads wait for the client to disconnect, for as long as that takes
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                # FastAPI passes an HTTPException raised while it reads the body on to the error handlers.
                raise HTTPException(http_status(ErrorCode.REQUEST_TIMEOUT),
                                    f"the request body stopped arriving for {self.seconds:g} s",
                                    headers={"Connection": "close"}) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests at once; a request beyond them is refused at once with
    503 SERVER_BUSY rather than queued, so that a flood cannot grow the server's tasks without bound."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            busy = error_response(
                http_status(ErrorCode.SERVER_BUSY), ErrorCode.SERVER_BUSY.value,
                f"the API is handling {self.limit} requests already; try again shortly", headers={"Retry-After": "1"},
            )
            await busy(scope, receive, send)
            return
        self.in_flight += 1
        leave = _on_step_aside(scope, self._leave)
        try:
            await self.app(scope, receive, send)
        finally:
            leave()

    def _leave(self) -> None:
        self.in_flight -= 1


class _Turn:
    """One read's turn: held, set aside while the read awaits another service (`aside`), or over for good
    (the read ended, or stepped aside for the rest of its life)."""

    def __init__(self, turns: asyncio.Semaphore) -> None:
        self._turns = turns
        self.held = False
        self.over = False

    async def take(self) -> None:
        await self._turns.acquire()
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._turns.release()

    def end(self) -> None:
        self.over = True
        self.give_back()


_READ_TURN: ContextVar[_Turn | None] = ContextVar("gateway.read_turn", default=None)


@asynccontextmanager
async def turn_aside() -> AsyncIterator[None]:
    """The read in this context gives back its turn while it awaits another service (Temporal's describe,
    a workflow's query), and takes one again after, for the work on the answer. Waiting costs the API no CPU,
    and with the turn held, a read that Temporal answered in 300 ms kept every read behind it waiting: 20
    clients reading running jobs saw 4.6 s at p99 (bench/long_jobs.py). Outside a read, it does nothing."""
    turn = _READ_TURN.get()
    if turn is None or not turn.held:
        yield
        return
    turn.give_back()
    try:
        yield
    finally:
        if not turn.over:
            await turn.take()


class ReadsInTurn:
    """ASGI middleware: at most `slots` reads (GET, HEAD) are worked on at once; the others wait their turn,
    which costs nothing while they wait. Polling clients keep many reads coming; all of them worked on at
    once share the event loop with a submission at each of its steps, so that twenty clients polling every
    20 ms held `POST /jobs` for 210 ms at p99 (bench/polling.py); two at a time, for 72 ms. A read that
    awaits Temporal sets its turn aside meanwhile (`turn_aside`): the turns bound the work, not the waits."""

    def __init__(self, app: ASGIApp, slots: int) -> None:
        self.app = app
        self.turns = asyncio.Semaphore(slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        turn = _Turn(self.turns)
        await turn.take()
        end_turn = _on_step_aside(scope, turn.end)
        token = _READ_TURN.set(turn)
        try:
            await self.app(scope, receive, send)
        finally:
            _READ_TURN.reset(token)
            end_turn()
