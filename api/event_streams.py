"""What the live streams share (`GET /jobs/{id}/events`, `GET /batches/{id}/events`): how a view read again and
again becomes events, what an event id says, and how a stream is served and bounded.

A stream's source is a view of one thing (a job, a batch), as its `GET` shows it, JSON, handed over again and
again by that thing's one reader (api.fanout). `Changes` keeps what the client was told: each event carries the
fields that changed since the stream's previous event, always the stream's own few (`status` and `progress`,
for a batch `counts` too), and is named by the status. Its id says how far the client got:
`<n>.<status>.<mark>...`, the marks being a few counts of the view (a job's progress and its stored files, a
batch's progress and its ended items), so that a client that reconnects with `Last-Event-ID` is told only what
is new since, by any API process: nothing is kept per client.

`API_MAX_CONCURRENT_STREAMS` bounds the streams an API process serves at once: each holds a place from its
request until its answer ends, refused with 503 TOO_MANY_STREAMS when none is free.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Header
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from api.errors import DATABASE_ERRORS, ApiError, database_unavailable
from api.fanout import Subscription
from app.errors import ErrorCode

log = logging.getLogger(__name__)

V = TypeVar("V")

LastEventId = Annotated[str | None, Header(
    alias="Last-Event-ID", description="the id of the last event had (an EventSource sends it when it reconnects): "
                                       "only what is new since is sent")]

ENDED_RESPONSE = {204: {"description": "the Last-Event-ID was the final event: there is nothing more to say, and "
                                       "an EventSource that gets this stops reconnecting"}}


def event_schema(names: list[str], statuses: list[str], always: dict[str, Any], about: str) -> dict[str, Any]:
    """An event as OpenAPI 3.2 describes one of a text/event-stream: its name, its id, and its `data`, JSON of
    some of the fields of `about`, always those of `always` (their schemas)."""
    return {
        "type": "object", "required": ["event", "id", "data"],
        "properties": {
            "event": {"type": "string", "enum": names},
            "id": {"type": "string", "description": "say it back as Last-Event-ID to resume from there"},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
                "type": "object", "required": list(always), "description": f"the fields of `{about}` that changed",
                "properties": {"status": {"type": "string", "enum": statuses}, **always}}},
        },
    }


@dataclass(frozen=True)
class Event:
    name: str
    id: str
    data: dict[str, Any]


@dataclass
class Seen:
    """How far a client got: what an event id says."""

    count: int = 0
    status: str | None = None
    marks: tuple[int, ...] = ()

    def id(self) -> str:
        return ".".join([str(self.count), str(self.status), *map(str, self.marks)])

    @classmethod
    def parse(cls, event_id: str | None, statuses: set[str], width: int, start: tuple[int, ...]) -> "Seen":
        """The id of an event this stream sent; anything else (none, or not ours) starts from the beginning."""
        try:
            count, status, *marks = (event_id or "").split(".")
            if status not in statuses or len(marks) != width:
                raise ValueError(status)
            return cls(int(count), status, tuple(int(mark) for mark in marks))
        except ValueError:
            return cls(marks=start)


class Changes:
    """What one stream told its client, and so what it says next (see the module's docstring)."""

    def __init__(self, last_event_id: str | None, *, statuses: set[str], final: set[str], always: tuple[str, ...],
                 start: tuple[int, ...]) -> None:
        self.seen = Seen.parse(last_event_id, statuses, len(start), start)
        self._final = final
        self._always = always
        # What the client was last told, field by field; None: it may know nothing, so it is told everything.
        self._told: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        """The client has had the final event (on this stream or, by its Last-Event-ID, on an earlier one)."""
        return self.seen.status in self._final

    def resumed_without_news(self, status: str, marks: tuple[int, ...]) -> bool:
        """Resumed where the client left off, and nothing new yet (once something is, it is told everything)."""
        return self._told is None and self.seen.count > 0 and (status, marks) == (self.seen.status, self.seen.marks)

    def changed(self, view: dict[str, Any]) -> dict[str, Any]:
        """The fields of `view` the client was not told, with the stream's own always."""
        told = self._told
        if told is None:
            return dict(view)
        return {name: value for name, value in view.items() if name in self._always or told.get(name) != value}

    def event(self, name: str, data: dict[str, Any], view: dict[str, Any], status: str, marks: tuple[int, ...]
              ) -> Event:
        seen = self.seen
        seen.count, seen.status, seen.marks = seen.count + 1, status, marks
        return Event(name=name, id=seen.id(), data={**{name: view[name] for name in self._always}, **data})

    def told_already(self, view: dict[str, Any]) -> bool:
        return self._told == view

    def told(self, view: dict[str, Any]) -> None:
        self._told = view


class StreamEvents(Protocol):
    """The events of one stream: `after(view)` is what tells the client what is new in `view`."""

    @property
    def ended(self) -> bool: ...

    def after(self, view: dict[str, Any]) -> list[Event]: ...


@dataclass
class StreamPlaces:
    """The streams an API process serves at once, at most `limit`."""

    limit: int
    open: int = 0

    def check(self) -> None:
        if self.open >= self.limit:
            raise ApiError(ErrorCode.TOO_MANY_STREAMS, f"{self.limit} event streams are open already; try again "
                                                       "shortly", {"limit": self.limit}, headers={"Retry-After": "1"})

    @contextmanager
    def place(self) -> Iterator[None]:
        self.check()
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class _HeldStream(EventSourceResponse):
    """A stream that holds its place among the open streams until its answer ends, however it ends."""

    def __init__(self, places: StreamPlaces, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._places = places

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._places.place():
            await super().__call__(scope, receive, send)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """sse-starlette's, without the cancel scope it opens around every send for a `send_timeout` these
        streams never set (held_stream sets none): a sixth of the API's CPU per SSE event and listener
        (bench.feed_listeners, 1,000 SSE listeners: 24 us before, 20 us after)."""
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as sse-starlette marks a send that never completed
            raise


def held_stream(places: StreamPlaces, events: AsyncIterator[ServerSentEvent], keepalive_s: float
                ) -> EventSourceResponse:
    """The answer that streams `events`, holding a place among the open streams while it lasts; the place is
    checked now, so that a full house is a 503 rather than a stream that ends at once."""
    places.check()
    return _HeldStream(places, events, ping=keepalive_s)


@contextmanager
def ended_if_the_database_cannot_answer(what: str) -> Iterator[None]:
    """A stream that has begun ends when the database cannot answer now (its 503 can no longer be sent): the
    client's reconnect, with its Last-Event-ID, goes on from where it was. Any other database error is the
    gateway's own fault, and goes on to the server's log with its traceback."""
    try:
        yield
    except DATABASE_ERRORS as error:
        if not database_unavailable(error):
            raise
        log.warning("%s: its event stream ends early: the database cannot answer (%s)", what,
                    type(getattr(error, "orig", None) or error).__name__)


def stream_response(
    places: StreamPlaces, subscribe: AbstractAsyncContextManager[Subscription[V]],
    view: Callable[[V], Awaitable[dict[str, Any]]], events: StreamEvents, what: str, keepalive_s: float,
) -> EventSourceResponse:
    """The answer that streams `events` of the values `subscribe` hands over, each shown by `view`, until the
    final event. The place is checked now, so that a full house is a 503 rather than a stream that ends at
    once."""
    return held_stream(places, _serve(subscribe, view, events, what), keepalive_s)


async def _serve(subscribe: AbstractAsyncContextManager[Subscription[V]],
                 view: Callable[[V], Awaitable[dict[str, Any]]], events: StreamEvents, what: str) -> AsyncIterator[ServerSentEvent]:
    with ended_if_the_database_cannot_answer(what):
        async with subscribe as subscription:
            try:
                async for value in subscription:
                    for event in events.after(await view(value)):
                        yield ServerSentEvent(json.dumps(event.data), event=event.name, id=event.id)
                    if events.ended:
                        return
            except ApiError as error:
                # Temporal cannot answer just now: the stream ends, and the client's reconnect (with its
                # Last-Event-ID) goes on from where it was.
                log.warning("%s: its event stream ends early: %s", what, error.message)

