"""The feed of every job the caller may see: `GET /events` (Server-Sent Events) and `WS /ws` (WebSocket), both
from the API process's one feed reader (api.feed). An admin sees every job, a user its own."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from sse_starlette import EventSourceResponse

from api.auth import authenticate
from api.errors import ApiError, validation_error
from api.event_streams import StreamPlaces, ended_if_the_database_cannot_answer, event_schema, held_stream
from api.feed import Feed, ListenerDropped
from api.deps import PrincipalDep, SettingsDep
from api.http_server import step_aside
from api.rate_limits import limit_principal
from api.routes.events import StreamPlacesDep
from app.auth import Principal
from app.feed_log import FeedFilter
from app.models import JobStatus
from app.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"], dependencies=[Depends(limit_principal)])
# A WebSocket has no Request for the HTTP dependencies (rate limits, security schemes): it authenticates itself.
ws_router = APIRouter(tags=["events"])

_STATUSES = {status.value for status in JobStatus}
_MAX_SUBSCRIPTIONS = 100
# The feed's ids are the log's BIGINT ids: one past it is no id of the feed.
MAX_FEED_ID = 2**63 - 1
# A close frame's reason is at most 123 bytes.
_REASON_BYTES = 120

# WebSocket close codes (README, "The feed of all jobs").
CLOSE_BAD_MESSAGE = 4400
CLOSE_AUTH_FAILED = 4401
CLOSE_TRY_AGAIN = 1013  # every stream place is taken (TOO_MANY_STREAMS)
CLOSE_TOO_FAR_BEHIND = 4408  # the socket's subscriptions together fell FEED_LISTENER_QUEUE events behind

_FEED_STREAM = (
    "`text/event-stream` of every job the caller may see (an admin: all): each change of a job, as its own "
    "stream (`GET /jobs/{id}/events`) names it: `queued`, `running`, `output` (each stored file), `succeeded`, "
    "`failed`, `cancelled`. `data` is JSON with `jobId`, `status`, `progress`, `currentNode`, `queuePosition`, "
    "`attempts`, `workflowId`, `batchId`, `owner`, `at` (when the job's row changed), and, for `output` and the "
    "final events, `outputs` (and `error`). An event's `id` is the feed's, across jobs: reconnect with it as "
    "`Last-Event-ID` to be told what was missed within FEED_REPLAY_WINDOW_S (at most FEED_REPLAY_MAX_EVENTS). "
    "Comments (`: ping`) keep it open every SSE_KEEPALIVE_S seconds.")


async def get_feed(request: Request) -> Feed:
    return request.app.state.feed


FeedDep = Annotated[Feed, Depends(get_feed)]


def _statuses(given: str | list[str] | None, field: str) -> frozenset[str] | None:
    if given is None:
        return None
    names = [name.strip() for name in given.split(",")] if isinstance(given, str) else given
    unknown = [name for name in names if name not in _STATUSES]
    if unknown or not names:
        raise validation_error([{"field": field, "message": f"each of {', '.join(sorted(_STATUSES))}, "
                                                            f"comma-separated; not {', '.join(unknown) or 'empty'}"}])
    return frozenset(names)


def _owner_of(principal: Principal) -> str | None:
    return None if principal.is_admin else principal.id


_FEED_EVENT = event_schema(
    ["queued", "running", "output"] + [status.value for status in JobStatus if status.is_terminal],
    sorted(_STATUSES), {"jobId": {"type": "string"}, "progress": {"type": "integer", "minimum": 0, "maximum": 100}},
    "Job")


@router.get("/events", response_class=EventSourceResponse, responses={
    200: {"description": _FEED_STREAM, "content": {"text/event-stream": {"schema": _FEED_EVENT}}}})
async def feed_events(
    request: Request, principal: PrincipalDep, settings: SettingsDep, feed: FeedDep, places: StreamPlacesDep,
    status: Annotated[str | None, Query(description="only jobs in these statuses, comma-separated", max_length=200)
                      ] = None,
    workflow_id: Annotated[str | None, Query(alias="workflowId", max_length=128,
                                             description="only jobs of this template")] = None,
    batch_id: Annotated[str | None, Query(alias="batchId", max_length=64, description="only a batch's jobs")] = None,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", description="the id of the last event had: what came after it is told first")] = None,
) -> Response:
    """Every job the caller may see, live: the feed of all jobs' changes, resumable across jobs."""
    since = None
    if last_event_id is not None:
        if (not (last_event_id.isascii() and last_event_id.isdigit()) or len(last_event_id) > len(str(MAX_FEED_ID))
                or int(last_event_id) > MAX_FEED_ID):
            raise validation_error([{"field": "Last-Event-ID", "message": "an event id of this feed (digits)"}])
        since = int(last_event_id)
    feed_filter = FeedFilter(owner=_owner_of(principal), statuses=_statuses(status, "status"),
                             template_id=workflow_id, batch_id=batch_id)
    answer = held_stream(places, _sse(feed, feed_filter, since), settings.sse_keepalive_s)
    step_aside(request.scope)  # it lasts as long as the client stays: no place among the requests being answered
    return answer


async def _sse(feed: Feed, feed_filter: FeedFilter, since: int | None) -> AsyncIterator[bytes]:
    with ended_if_the_database_cannot_answer("the feed"):
        async with feed.listen(feed_filter, since) as batches:
            try:
                async for batch in batches:
                    yield b"".join(event.sse for event in batch)
            except ListenerDropped:
                # It fell too far behind: its stream ends, and its EventSource reconnects with its Last-Event-ID.
                return


class Subscribe(BaseModel):
    """`{"type": "subscribe", ...}`: the events of some jobs, from now on (after `since`, with what was missed)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: str
    id: str | None = Field(None, max_length=64, description="the subscription's name, for unsubscribe; the "
                                                            "server makes one when none is given")
    job_id: str | list[str] | None = Field(None, alias="jobId")
    batch_id: str | None = Field(None, alias="batchId", max_length=64)
    workflow_id: str | None = Field(None, alias="workflowId", max_length=128)
    status: str | list[str] | None = None
    since: StrictInt | None = Field(None, ge=0, le=MAX_FEED_ID)

    @field_validator("job_id")
    @classmethod
    def _few_jobs(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 0 < len(value) <= 1000:
            raise ValueError("1 to 1000 job ids")
        return value

    def feed_filter(self, owner: str | None) -> FeedFilter:
        jobs = [self.job_id] if isinstance(self.job_id, str) else self.job_id
        return FeedFilter(owner=owner, statuses=_statuses(self.status, "status"), template_id=self.workflow_id,
                          batch_id=self.batch_id, job_ids=frozenset(jobs) if jobs is not None else None)


class _BadMessage(Exception):
    pass


class _Connection:
    """One WebSocket's subscriptions, each a feed listener pumping into it."""

    def __init__(self, websocket: WebSocket, feed: Feed, principal: Principal) -> None:
        self._websocket = websocket
        self._feed = feed
        self._owner = _owner_of(principal)
        self._subscriptions: dict[str, asyncio.Task[None]] = {}
        self._sending = asyncio.Lock()
        self._made = 0
        # What its subscriptions hold unwritten, together: a socket that stops reading holds at most that.
        self._backlog = feed.backlog()
        self._watch = asyncio.create_task(self._close_when_too_far_behind())

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message))

    async def send_text(self, text: str) -> None:
        async with self._sending:
            await self._websocket.send_text(text)

    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "subscribe":
            await self._subscribe(message)
        elif kind == "unsubscribe":
            name = message.get("id")
            task = self._subscriptions.pop(name, None) if isinstance(name, str) else None
            if task is None:
                raise _BadMessage(f"no subscription {name!r} to unsubscribe")
            await _stopped(task)
            await self.send({"type": "unsubscribed", "id": name})
        elif kind == "auth":
            raise _BadMessage("already authenticated: a connection's caller does not change")
        else:
            raise _BadMessage(f"unknown message type {kind!r}: subscribe, unsubscribe, ping or auth")

    async def _subscribe(self, message: dict[str, Any]) -> None:
        try:
            subscribe = Subscribe.model_validate(message)
            feed_filter = subscribe.feed_filter(self._owner)
        except ValidationError as error:
            first = error.errors()[0]
            raise _BadMessage(f"{'.'.join(map(str, first['loc'])) or 'message'}: {first['msg']}") from None
        except ApiError as error:
            raise _BadMessage(error.message) from None
        name = subscribe.id or self._new_name()
        if name in self._subscriptions:
            raise _BadMessage(f"subscription {name!r} exists already")
        if len(self._subscriptions) >= _MAX_SUBSCRIPTIONS:
            raise _BadMessage(f"at most {_MAX_SUBSCRIPTIONS} subscriptions per connection")
        await self.send({"type": "subscribed", "id": name})
        self._subscriptions[name] = asyncio.create_task(self._pump(name, feed_filter, subscribe.since))

    def _new_name(self) -> str:
        while True:  # one the client has not taken for a subscription of its own
            self._made += 1
            if (name := f"s{self._made}") not in self._subscriptions:
                return name

    async def _pump(self, name: str, feed_filter: FeedFilter, since: int | None) -> None:
        try:
            prefix = f'{{"type": "event", "subscription": {json.dumps(name)}, "id": '
            async with self._feed.listen(feed_filter, since, self._backlog) as batches:
                async for batch in batches:
                    async with self._sending:
                        for event in batch:
                            await self._websocket.send_text(
                                f'{prefix}{event.id}, "event": "{event.name}", "data": {event.data_json}}}')
        except ListenerDropped:
            pass  # the socket fell too far behind: _close_when_too_far_behind closes it
        except Exception as error:  # noqa: BLE001 — a closed socket or an unreadable database end this subscription
            self._subscriptions.pop(name, None)
            log.info("a feed subscription ends: %s", error)

    async def _close_when_too_far_behind(self) -> None:
        """A socket whose subscriptions together hold FEED_LISTENER_QUEUE events unwritten is closed, as an SSE
        stream that far behind ends: the client subscribes again with each subscription's last id as `since`."""
        await self._backlog.overflowed.wait()
        await self._stop_subscriptions()
        with suppress(Exception):  # one that never reads: its close handshake times out, and the socket goes
            await self._websocket.close(CLOSE_TOO_FAR_BEHIND, f"more than {self._backlog.most} events behind; "
                                                              "subscribe again with since")

    async def close(self) -> None:
        if asyncio.current_task() is not self._watch:
            await _stopped(self._watch)
        await self._stop_subscriptions()

    async def _stop_subscriptions(self) -> None:
        # Taken first: a subscription whose send fails meanwhile removes itself from the connection's.
        subscriptions, self._subscriptions = self._subscriptions, {}
        for task in subscriptions.values():
            await _stopped(task)


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


async def _authenticated(websocket: WebSocket, settings: Settings) -> Principal:
    """The caller, by the API's headers (X-API-Key, Authorization: Bearer) or else by a first message
    `{"type": "auth", "token": <key or JWT>}` within WS_AUTH_TIMEOUT_S; ApiError AUTH_FAILED otherwise."""
    api_key = websocket.headers.get("x-api-key")
    authorization = websocket.headers.get("authorization")
    bearer = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None
    if api_key is not None or bearer is not None or settings.open_mode:
        return authenticate(settings, api_key, bearer)
    try:
        message = json.loads(await asyncio.wait_for(websocket.receive_text(), settings.ws_auth_timeout_s))
    except (TimeoutError, ValueError, RecursionError, KeyError):  # no JSON (or too deep, or a huge number)
        message = None
    token = message.get("token") if isinstance(message, dict) and message.get("type") == "auth" else None
    if not isinstance(token, str) or not token:
        return authenticate(settings, None, None)  # the one refusal: nothing to verify
    # A JWT is three dot-separated parts; an API key is anything else.
    principal = authenticate(settings, None, token) if token.count(".") == 2 else authenticate(settings, token, None)
    await websocket.send_text(json.dumps({"type": "authenticated"}))
    return principal


def _close_reason(error: Exception) -> str:
    reason = str(error) if isinstance(error, _BadMessage) else "a message is a JSON object with a type"
    return reason.encode()[:_REASON_BYTES].decode(errors="ignore")


@ws_router.websocket("/ws")
async def feed_socket(websocket: WebSocket) -> None:
    """The feed of all jobs over WebSocket (README, "The feed of all jobs")."""
    app = websocket.app
    settings: Settings = app.state.settings
    places: StreamPlaces = app.state.stream_places
    await websocket.accept()
    try:
        principal = await _authenticated(websocket, settings)
    except ApiError:
        await websocket.close(CLOSE_AUTH_FAILED, "authentication failed")
        return
    except WebSocketDisconnect:
        return
    if places.open >= places.limit:
        await websocket.close(CLOSE_TRY_AGAIN, "too many event streams open; try again shortly")
        return
    connection = _Connection(websocket, app.state.feed, principal)
    with places.place():
        try:
            while True:
                received = await websocket.receive()
                if received["type"] == "websocket.disconnect":
                    break
                try:
                    if received.get("text") is None:
                        raise _BadMessage("a message is JSON text, not binary")
                    message = json.loads(received["text"])
                    if not isinstance(message, dict):
                        raise _BadMessage("a message is a JSON object with a type")
                    await connection.handle(message)
                except (ValueError, RecursionError, _BadMessage) as error:  # ValueError: no JSON, or a huge number
                    await connection.close()
                    await websocket.close(CLOSE_BAD_MESSAGE, _close_reason(error))
                    return
        except WebSocketDisconnect:
            pass
        finally:
            await connection.close()
