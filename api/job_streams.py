"""A job's live events (`GET /jobs/{id}/events`): what is read, and what is said.

What is read: one reader per job and API process (api.fanout), however many streams follow the job. It reads
the job every SSE_POLL_S while it lives: as `GET /jobs/{id}` does (api.job_reader, whose live views it shares
with the GETs, so Temporal is asked at most every LIVE_VIEW_SECONDS whatever SSE_POLL_S is), with the progress
of the row's live columns, which the worker writes as ComfyUI reports a change (a database read by primary
key); and at once when its workflow closes: it holds the job's one long poll for the close (api.job_waits).
A progress change so reaches a stream within the worker's row write (at most one per LIVE_ROW_WRITE_SECONDS)
and SSE_POLL_S, not the heartbeat's second.

What is said: `JobEvents` turns the job as read, again and again, into events (api.event_streams), each with
the fields of `GET /jobs/{id}` that changed since the last one (always `status` and `progress`): `queued`
(with `queuePosition`), `running` (`progress`, `currentNode`), `output` for each stored file, and the final
`succeeded`, `failed` or `cancelled`, after which the stream ends. An event's id is
`<n>.<status>.<progress>.<outputs>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

from api.fanout import Fanout
from api.event_streams import Changes, Event
from api.job_reader import JobReader
from api.job_waits import JobWaits
from app.jobstore import JobSnapshot, get_job_snapshot
from app.models import JobStatus

# Fields of a job that every event carries, changed or not.
_ALWAYS = ("status", "progress")
_FINAL = {status.value for status in JobStatus if status.is_terminal}
# The same whole job for a whole day: a long poll for the close is held that long at most, then taken anew.
_CLOSE_POLL_SECONDS = 24 * 3600.0


JobFeeds = Fanout[JobSnapshot]


def job_feeds(reader_for: Callable[[], JobReader], waits: JobWaits, poll_seconds: float) -> JobFeeds:
    """The API process's job readers, each reading its job every `poll_seconds` (SSE_POLL_S); `reader_for`
    makes the JobReader (it needs the app's state)."""

    async def read(job_id: str) -> AsyncIterator[JobSnapshot]:
        reader = reader_for()
        client = reader.temporal.client
        closed = (asyncio.create_task(waits.until_closed(client, job_id, _CLOSE_POLL_SECONDS, asyncio.Future()))
                  if client is not None else None)
        try:
            while True:
                recorded = await reader.db.run(get_job_snapshot, job_id)
                # Once the workflow has closed, the job is read anew: its row has its end.
                snapshot = _with_live_row(await reader.read(job_id, reuse_live=closed is None or not closed.done()),
                                          recorded)
                yield snapshot
                if snapshot.state.status.is_terminal:
                    return
                if closed is not None and not closed.done():
                    await asyncio.wait({closed}, timeout=poll_seconds)
                else:
                    await asyncio.sleep(poll_seconds)
        finally:
            if closed is not None:
                closed.cancel()
                with suppress(asyncio.CancelledError):
                    await closed

    return Fanout(read)


def _with_live_row(snapshot: JobSnapshot, recorded: JobSnapshot | None) -> JobSnapshot:
    """A live job's progress, node and queue position from its row's live columns, which the worker writes as
    soon as ComfyUI reports a change (activities.live_row), where the live view has them from the last
    heartbeat (sent at most once a second) as Temporal last described it (up to LIVE_VIEW_SECONDS ago). Its
    status, and everything else, stays the live view's: the row's status is not a live job's truth."""
    if snapshot.state.status.is_terminal or recorded is None or recorded.state.status.is_terminal:
        return snapshot
    row = recorded.live
    live = snapshot.live.model_copy(update={"percent": row.percent, "node": row.node,
                                            "queue_position": row.queue_position})
    return JobSnapshot(snapshot.state, live, snapshot.webhook)


class JobEvents:
    """The events of one stream, from the job as read each time (`GET /jobs/{id}`'s JSON)."""

    def __init__(self, last_event_id: str | None = None) -> None:
        # An id's marks: the job's progress and its stored files.
        self.changes = Changes(last_event_id, statuses={state.value for state in JobStatus}, final=_FINAL,
                               always=_ALWAYS, start=(-1, 0))

    @property
    def ended(self) -> bool:
        return self.changes.ended

    def after(self, job: dict[str, Any]) -> list[Event]:
        """The events that tell the client what is new in `job`: none when nothing is."""
        changes, events = self.changes, []
        seen_status, (_, seen_outputs) = changes.seen.status, changes.seen.marks
        outputs = job.get("outputs") or []
        marks = (job["progress"], len(outputs))
        if changes.resumed_without_news(job["status"], marks):
            return []
        moved = (job["status"], marks) != (seen_status, changes.seen.marks)
        for stored in range(seen_outputs, len(outputs)):
            # Files come with the job's end (collected, then recorded with it): each is its own event first,
            # under the status the client knows (its id must not say that the final event was had).
            events.append(changes.event("output", {"outputs": outputs[:stored + 1]}, job,
                                        status=seen_status or "queued", marks=(job["progress"], stored + 1)))
        changed = changes.changed(job)
        if job["status"] in _FINAL:
            events.append(changes.event(job["status"], changed, job, status=job["status"], marks=marks))
        elif moved or set(changed) - set(_ALWAYS):
            if job["status"] == JobStatus.queued.value:
                changed["queuePosition"] = job.get("queuePosition")
            else:
                changed["currentNode"] = job.get("currentNode")
            events.append(changes.event(job["status"], changed, job, status=job["status"], marks=marks))
        changes.told(job)
        return events
