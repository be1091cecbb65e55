"""Following a job's or a batch's Server-Sent Events across dropped connections, the same way for both clients.

The gateway keeps nothing per client: a reconnect that sends the last event's id as `Last-Event-ID` is told only
what is new since, and `204` once that id was the final event. So resuming is the client's part: remember the id,
reconnect after a pause, stop after the final event, and give up after a few reconnects in a row that got nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from comfyui_gateway_client.config import MAX_RETRY_AFTER_S
from comfyui_gateway_client.errors import UNEXPECTED_ANSWER, GatewayError, GatewayUnreachable, TryLater
from comfyui_gateway_client.models import Event

JOB_FINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})
BATCH_FINAL_EVENTS = frozenset({"completed", "cancelled"})
# Transport failures that end a stream early: the connection broke, or went silent past the read timeout.
STREAM_BROKEN = (httpx.TransportError, httpx.StreamError)


def tells_progress(event: Event, job: Mapping[str, Any]) -> bool:
    """Whether `on_progress` hears of the job as `event` left it: always but once it has ended, when only the
    final event tells (the events just before it, an output's, carry the final status already)."""
    return event.event in JOB_FINAL_EVENTS or job.get("status") not in JOB_FINAL_EVENTS


class EventCursor:
    """Where a stream got to: its last event's id, whether it has ended, and how often it failed in a row."""

    def __init__(self, url: str, final_events: frozenset[str], reconnects: int) -> None:
        self.url = url
        self.final_events = final_events
        self.reconnects = reconnects
        self.last_event_id: str | None = None
        self.ended = False
        self.failures = 0

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to hand on, or None for what carries none (a retry hint, an event without data)."""
        if not sse.data:
            return None
        self.failures = 0
        self.last_event_id = sse.id or self.last_event_id
        try:
            data = json.loads(sse.data)
        except ValueError as error:
            raise GatewayError(UNEXPECTED_ANSWER, f"{self.url}: an event whose data is not JSON: {sse.data[:200]!r}"
                               ) from error
        event = Event(event=sse.event, id=sse.id, data=data)
        self.ended = sse.event in self.final_events
        return event

    def broken(self, reason: str) -> float:
        """The stream stopped before its final event: seconds to wait before reconnecting, or, after
        `reconnects` failures in a row, GatewayUnreachable."""
        self.failures += 1
        if self.failures > self.reconnects:
            raise GatewayUnreachable(self.url, f"the event stream broke {self.failures} times in a row ({reason})")
        return min(0.2 * 2 ** (self.failures - 1), 5.0)

    def refused(self, error: TryLater) -> float:
        """The gateway refused the stream for now (TOO_MANY_STREAMS, SERVER_BUSY): its Retry-After, counted as a
        failure; the error itself when it gave none, or after `reconnects` failures in a row."""
        self.failures += 1
        if error.retry_after is None or self.failures > self.reconnects or error.retry_after > MAX_RETRY_AFTER_S:
            raise error
        return error.retry_after
