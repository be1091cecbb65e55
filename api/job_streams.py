"""A job's live events (`GET /jobs/{id}/events`): what is read, and what is said.

What is read: one reader per job and API process (api.fanout), however many streams follow the job. It reads
the job as `GET /jobs/{id}` does (api.job_reader, whose live views it shares with the GETs), every
LIVE_VIEW_SECONDS while the job lives, and at once when its workflow closes: it holds the job's one long poll
for the close (api.job_waits). A job's progress is its prompt activity's last heartbeat, which the worker sends
at most once a second (worker.main); it reaches a stream within that second plus twice LIVE_VIEW_SECONDS
(a read every LIVE_VIEW_SECONDS, of a live view at most that old).

What is said: `JobEvents` turns the job as read, again and again, into events, each with the fields of
`GET /jobs/{id}` that changed since the last one (always `status` and `progress`): `queued` (with
`queuePosition`), `running` (`progress`, `currentNode`), `output` for each stored file, and the final
`succeeded`, `failed` or `cancelled`, after which the stream ends. An event's id says how far the client got
(`<n>.<status>.<progress>.<outputs>`), so a client that reconnects with `Last-Event-ID` is told only what is
new since, in any API process: nothing is kept per client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from api.fanout import Fanout
from api.job_reader import LIVE_VIEW_SECONDS, JobReader
from api.job_waits import JobWaits
from app.jobstore import JobSnapshot
from app.models import JobStatus

# Fields of a job that every event carries, changed or not.
_ALWAYS = ("status", "progress")
_FINAL = {status.value for status in JobStatus if status.is_terminal}
# The same whole job for a whole day: a long poll for the close is held that long at most, then taken anew.
_CLOSE_POLL_SECONDS = 24 * 3600.0


JobFeeds = Fanout[JobSnapshot]


def job_feeds(reader_for: Callable[[], JobReader], waits: JobWaits) -> JobFeeds:
    """The API process's job readers; `reader_for` makes the JobReader (it needs the app's state)."""

    async def read(job_id: str) -> AsyncIterator[JobSnapshot]:
        reader = reader_for()
        client = reader.temporal.client
        closed = (asyncio.create_task(waits.until_closed(client, job_id, _CLOSE_POLL_SECONDS, asyncio.Future()))
                  if client is not None else None)
        try:
            while True:
                # Once the workflow has closed, the job is read anew: its row has its end.
                snapshot = await reader.read(job_id, reuse_live=closed is None or not closed.done())
                yield snapshot
                if snapshot.state.status.is_terminal:
                    return
                if closed is not None and not closed.done():
                    await asyncio.wait({closed}, timeout=LIVE_VIEW_SECONDS)
                else:
                    await asyncio.sleep(LIVE_VIEW_SECONDS)
        finally:
            if closed is not None:
                closed.cancel()
                with suppress(asyncio.CancelledError):
                    await closed

    return Fanout(read)


@dataclass(frozen=True)
class Event:
    name: str
    id: str
    data: dict[str, Any]


@dataclass
class _Seen:
    """How far a client got: what an event id says."""

    count: int = 0
    status: str | None = None
    progress: int = -1
    outputs: int = 0

    def id(self) -> str:
        return f"{self.count}.{self.status}.{self.progress}.{self.outputs}"

    @classmethod
    def parse(cls, event_id: str | None) -> "_Seen":
        """The id of an event this stream sent; anything else (none, or not ours) starts from the beginning."""
        try:
            count, status, progress, outputs = (event_id or "").split(".")
            if status not in {state.value for state in JobStatus}:
                raise ValueError(status)
            return cls(int(count), status, int(progress), int(outputs))
        except ValueError:
            return cls()


class JobEvents:
    """The events of one stream, from the job as read each time (`GET /jobs/{id}`'s JSON)."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self._seen = _Seen.parse(last_event_id)
        # What the client was last told, field by field; None: it may know nothing, so it is told everything.
        self._told: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        """The client has had the final event (on this stream or, by its Last-Event-ID, on an earlier one)."""
        return self._seen.status in _FINAL

    def after(self, job: dict[str, Any]) -> list[Event]:
        """The events that tell the client what is new in `job`: none when nothing is."""
        seen, events = self._seen, []
        outputs = job.get("outputs") or []
        moved = (job["status"], job["progress"], len(outputs)) != (seen.status, seen.progress, seen.outputs)
        if self._told is None and seen.count and not moved:
            return []  # resumed where the client left off: nothing new yet (and it is told everything once it is)
        for stored in range(seen.outputs, len(outputs)):
            # Files come with the job's end (collected, then recorded with it): each is its own event first,
            # under the status the client knows (its id must not say that the final event was had).
            events.append(self._event("output", {"outputs": outputs[:stored + 1]}, status=seen.status or "queued",
                                      progress=job["progress"], outputs=stored + 1, job=job))
        changed = self._changed(job)
        if job["status"] in _FINAL:
            events.append(self._event(job["status"], changed, job=job))
        elif moved or set(changed) - set(_ALWAYS):
            if job["status"] == JobStatus.queued.value:
                changed["queuePosition"] = job.get("queuePosition")
            else:
                changed["currentNode"] = job.get("currentNode")
            events.append(self._event(job["status"], changed, job=job))
        self._told = job
        return events

    def _changed(self, job: dict[str, Any]) -> dict[str, Any]:
        told = self._told
        if told is None:
            return dict(job)
        return {name: value for name, value in job.items() if name in _ALWAYS or told.get(name) != value}

    def _event(self, name: str, data: dict[str, Any], *, job: dict[str, Any], status: str | None = None,
               progress: int | None = None, outputs: int | None = None) -> Event:
        seen = self._seen
        seen.count += 1
        seen.status = status if status is not None else job["status"]
        seen.progress = progress if progress is not None else job["progress"]
        seen.outputs = outputs if outputs is not None else len(job.get("outputs") or [])
        return Event(name=name, id=seen.id(), data={**{field: job[field] for field in _ALWAYS}, **data})
