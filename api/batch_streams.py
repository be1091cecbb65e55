"""A batch's live events (`GET /batches/{id}/events`): what is read, and what is said.

What is read: one reader per batch and API process (api.fanout), however many streams follow it: the batch as
`GET /batches/{id}` shows it (its row, and its items' rows for its counts: the database, not Temporal, but for
a batch accepted a moment ago), every SSE_POLL_S until it has ended.

What is said (api.event_streams): events named by the batch's status, `queued`, `running`, then the final
`completed` or `cancelled`, after which the stream ends; each with the fields of `GET /batches/{id}` that
changed, always `status`, `counts` and `progress`. An event's id is `<n>.<status>.<progress>.<running>.<ended>`
(ended: its items that succeeded, failed or were cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from api.event_streams import Changes, Event
from api.fanout import Fanout
from app.batches import BatchStatus

BatchFeeds = Fanout[dict[str, Any]]

ALWAYS = ("status", "counts", "progress")
_FINAL = {status.value for status in BatchStatus if status.is_terminal}


def batch_feeds(read: Callable[[str], Awaitable[dict[str, Any]]], poll_seconds: float) -> BatchFeeds:
    """The API process's batch readers; `read` is the batch as `GET /batches/{id}` shows it, JSON."""

    async def follow(batch_id: str) -> AsyncIterator[dict[str, Any]]:
        while True:
            view = await read(batch_id)
            yield view
            if view["status"] in _FINAL:
                return
            await asyncio.sleep(poll_seconds)

    return Fanout(follow)


def _marks(batch: dict[str, Any]) -> tuple[int, int, int]:
    counts = batch["counts"]
    return batch["progress"], counts["running"], counts["succeeded"] + counts["failed"] + counts["cancelled"]


class BatchEvents:
    """The events of one stream, from the batch as read each time."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.changes = Changes(last_event_id, statuses={status.value for status in BatchStatus}, final=_FINAL,
                               always=ALWAYS, start=(-1, 0, 0))

    @property
    def ended(self) -> bool:
        return self.changes.ended

    def after(self, batch: dict[str, Any]) -> list[Event]:
        changes = self.changes
        marks = _marks(batch)
        if changes.resumed_without_news(batch["status"], marks) or changes.told_already(batch):
            return []
        event = changes.event(batch["status"], changes.changed(batch), batch, status=batch["status"], marks=marks)
        changes.told(batch)
        return [event]
