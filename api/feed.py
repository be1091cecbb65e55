"""The feed of every job a caller may see (`GET /events`, `WS /ws`): one reader per API process, however many
listeners.

The reader tails the feed log (app.feed_log) while anyone listens: one query every FEED_POLL_S for everyone's
events after the last it read, each event turned into its public JSON once (output URLs by the storage provider)
and handed to each listener whose filter it matches. 1,000 listeners cost the database, Temporal and the worker
what one does: Temporal and the worker nothing at all, the database one indexed query per poll.

A listener that says where it left off (`Last-Event-ID`, a WebSocket `since`) first registers, so that nothing
read from then on passes it by, then is told what it missed from the log itself (its own query, filtered by its
owner and filters, within FEED_REPLAY_WINDOW_S and at most FEED_REPLAY_MAX_EVENTS of the newest), then the
reader's events after those. That replay is read a page at a time, the next page only once the listener has sent
the one before, and only a few listeners' pages at once: a client that connects with an old id and never reads
holds one page, not its whole replay (a thousand such clients, each told 1,000 events at once, took the API to
1.6 GB and held a submission for 27 s). Its queue holds FEED_LISTENER_QUEUE events: a listener that falls that
far behind is dropped (its stream ends), and comes back with its last id, from the log again: it costs the
process no memory beyond its queue and a page.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from sse_starlette import ServerSentEvent

from api.database import Database
from app.feed_log import FeedFilter, feed_after, latest_feed_id, missed_page, prune_feed, replay_start
from app.metrics import FEED_LISTENERS, FEED_READS
from app.models import OutputRef
from app.storage import OutputStorage
from app.tables import JobFeedRow
from api.job_views import output_file

log = logging.getLogger(__name__)

# Events read per query: a burst of more is read over several polls, one right after the other.
_READ_AT_ONCE = 1000
_PRUNE_EVERY_S = 60.0
# A replay's page, and how many listeners' pages are read and encoded at once.
REPLAY_PAGE = 25
_REPLAYS_AT_ONCE = 4


@dataclass(frozen=True)
class FeedEvent:
    id: int
    name: str
    row: JobFeedRow
    data: dict[str, Any]
    # Encoded once for every listener: `data` as JSON, and the whole Server-Sent Event.
    data_json: str
    sse: bytes


class ListenerDropped(Exception):
    """The listener fell FEED_LISTENER_QUEUE events behind: its stream ends, and it resumes from its last id."""


class _Listener:
    def __init__(self, feed_filter: FeedFilter, queue_size: int) -> None:
        self.filter = feed_filter
        self.queue: asyncio.Queue[FeedEvent] = asyncio.Queue(queue_size)
        self.dropped = False

    def offer(self, event: FeedEvent) -> None:
        if self.dropped or not self.filter.matches(event.row):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            # Woken, it finds itself dropped: a get never waits on a full queue.


class Feed:
    def __init__(self, db: Database, storage: OutputStorage, *, poll_s: float, window_s: float, replay_max: int,
                 queue_size: int) -> None:
        self._db = db
        self._storage = storage
        self._poll_s = poll_s
        self._window_s = window_s
        self._replay_max = replay_max
        self._queue_size = queue_size
        self._listeners: set[_Listener] = set()
        self._reader: asyncio.Task[None] | None = None
        self._replaying = asyncio.Semaphore(_REPLAYS_AT_ONCE)
        self._starting = asyncio.Lock()
        self.reads = 0  # the reader's queries (gateway_feed_reads counts them for GET /metrics): one per poll

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    @asynccontextmanager
    async def listen(self, feed_filter: FeedFilter, since: int | None
                     ) -> AsyncIterator[AsyncIterator[list[FeedEvent]]]:
        """The events for `feed_filter` from now on, and first, with `since`, those after it that the log kept:
        in batches, each what has come since the listener last asked (sent at once, in one write)."""
        listener = _Listener(feed_filter, self._queue_size)
        self._listeners.add(listener)
        FEED_LISTENERS.inc()
        try:
            await self._ensure_reader()
            # After the reader's start: what it will not read, the log still says. An id beyond the log's last
            # (one from a database since restored) is told what comes from now on, not nothing.
            if since is not None:
                since = min(since, await self._db.run(latest_feed_id))
            yield self._events(listener, since)
        finally:
            self._listeners.discard(listener)
            FEED_LISTENERS.dec()
            if not self._listeners and self._reader is not None:
                # Whoever listens next starts a reader of its own, from the latest event then.
                reader, self._reader = self._reader, None
                reader.cancel()
                with suppress(asyncio.CancelledError):
                    await reader

    async def _ensure_reader(self) -> None:
        async with self._starting:
            if self._reader is None or self._reader.done():
                start = await self._db.run(latest_feed_id)
                self._reader = asyncio.create_task(self._read(start))

    async def prune(self) -> None:
        """Every minute, whether anyone listens or not, the events past FEED_REPLAY_WINDOW_S go: the workers
        write the log all the time. (Each API process prunes; a second delete finds nothing.)"""
        while True:
            try:
                await self._db.run(prune_feed, self._window_s)
            except Exception as error:  # noqa: BLE001 — it is tried again in a minute
                log.warning("the job feed could not be pruned: %s", error)
            await asyncio.sleep(_PRUNE_EVERY_S)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader

    async def _events(self, listener: _Listener, since: int | None) -> AsyncIterator[list[FeedEvent]]:
        told = 0
        if since is not None:
            told = since
            async for page in self._replay(listener.filter, since):
                told = page[-1].id
                yield page
        queue = listener.queue
        while True:
            if listener.dropped and queue.empty():
                raise ListenerDropped()
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            # What the replay told already, the reader may have read again.
            batch = [event for event in batch if event.id > told]
            if batch:
                told = batch[-1].id
                yield batch

    async def _replay(self, feed_filter: FeedFilter, since: int) -> AsyncIterator[list[FeedEvent]]:
        """What a listener missed after `since`, a page at a time, each read when it has sent the one before."""
        async with self._replaying:
            after = await self._db.run(replay_start, since, feed_filter, self._window_s, self._replay_max)
        while True:
            async with self._replaying:
                rows = await self._db.run(missed_page, after, feed_filter, self._window_s, REPLAY_PAGE)
                page = await self._views(rows)
            if page:
                yield page
            if len(rows) < REPLAY_PAGE:
                return
            after = rows[-1].id  # type: ignore[assignment]  # a stored row has its id

    async def _read(self, last_id: int) -> None:
        while True:
            try:
                rows = await self._db.run(feed_after, last_id, _READ_AT_ONCE)
                self.reads += 1
                FEED_READS.inc()
            except Exception as error:  # noqa: BLE001 — the database comes back; the listeners wait meanwhile
                log.warning("the job feed could not be read: %s", error)
                await asyncio.sleep(self._poll_s)
                continue
            for event in await self._views(rows):
                for listener in list(self._listeners):
                    listener.offer(event)
            if rows:
                last_id = rows[-1].id  # type: ignore[assignment]  # a stored row has its id
            if len(rows) < _READ_AT_ONCE:
                await asyncio.sleep(self._poll_s)

    async def _views(self, rows: list[JobFeedRow]) -> list[FeedEvent]:
        """The events' public JSON, on a thread when the store signs its URLs with its SDK (boto3 is not for the
        event loop)."""
        if rows and self._storage.signs_urls:
            return await asyncio.to_thread(self._events_of, rows)
        return self._events_of(rows)

    def _events_of(self, rows: list[JobFeedRow]) -> list[FeedEvent]:
        events = []
        for row in rows:
            try:
                events.append(self._event(row))
            except Exception:  # noqa: BLE001 — one event that cannot be told must not stop the feed for everyone
                log.exception("feed event %s of job %s could not be told; it is left out", row.id, row.job_id)
        return events

    def _event(self, row: JobFeedRow) -> FeedEvent:
        data = {"jobId": row.job_id, "status": row.status, "workflowId": row.template_id, "batchId": row.batch_id,
                "owner": row.owner, "at": row.at.isoformat(), **row.data}
        if "outputs" in data:
            data["outputs"] = [output_file(row.job_id, OutputRef.model_validate(output), self._storage)
                               .model_dump(mode="json", by_alias=True) for output in row.data["outputs"]]
        assert row.id is not None
        data_json = json.dumps(data)
        return FeedEvent(row.id, row.event, row, data, data_json,
                         ServerSentEvent(data_json, event=row.event, id=str(row.id)).encode())
