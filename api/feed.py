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
1.6 GB and held a submission for 27 s); a WebSocket's subscriptions take that page in turns, and a listener that
has just come reads its first page before the long replays read their next (one waited 11.6 s behind a thousand
of them). A connection holds at most FEED_LISTENER_QUEUE events it has not written (a `Backlog`, across a
WebSocket's subscriptions): one that falls that far behind is dropped (its stream ends, its socket is closed),
and comes back with its last id, from the log again: it costs the process no memory beyond that and a page.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress
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


class Backlog:
    """What one connection holds and has not written yet: the events handed to its listeners (an SSE stream's
    one, a WebSocket's subscriptions together), from the reader's offer until the listener asks for more, at
    most `most` of them; one event more and every listener of it is dropped (`overflowed` is set, for whoever
    closes the connection). Its replays take turns, one page at a time: a socket of 100 replaying subscriptions
    that never reads holds one page, not 100."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.held = 0
        self.overflowed = asyncio.Event()
        self.replay_turn = asyncio.Lock()

    def add(self) -> bool:
        """One event more held; False, and overflowed, when that is one too many."""
        if self.overflowed.is_set():
            return False
        self.held += 1
        if self.held > self.most:
            self.overflowed.set()
            return False
        return True

    def written(self, count: int) -> None:
        self.held -= count


class _Listener:
    def __init__(self, feed_filter: FeedFilter, backlog: Backlog) -> None:
        self.filter = feed_filter
        # Bounded by the backlog, which may be shared with other listeners of one connection.
        self.queue: asyncio.Queue[FeedEvent] = asyncio.Queue()
        self.backlog = backlog

    def offer(self, event: FeedEvent) -> None:
        if self.filter.matches(event.row) and self.backlog.add():
            self.queue.put_nowait(event)
        # Dropped, it finds out when it has taken what its queue holds: a get never waits on it then.


class _ReplayTurns:
    """At most `turns` replays' pages read and encoded at once, the waiting ones served fewest pages first, so
    that a listener that has just come is told its first page before those a thousand long replays read next."""

    def __init__(self, turns: int) -> None:
        self._free = turns
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @asynccontextmanager
    async def turn(self, pages_read: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            granted = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (pages_read, next(self._arrivals), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._hand_on()  # granted just as it was cancelled: the turn goes to the next
                else:
                    self._waiting = [entry for entry in self._waiting if entry[2] is not granted]
                    heapq.heapify(self._waiting)
                raise
        try:
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        while self._waiting:
            granted = heapq.heappop(self._waiting)[2]
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1


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
        self._replay_turns = _ReplayTurns(_REPLAYS_AT_ONCE)
        self._starting = asyncio.Lock()
        self.reads = 0  # the reader's queries (gateway_feed_reads counts them for GET /metrics): one per poll

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def backlog(self) -> Backlog:
        """A connection's bound on what it holds unwritten (FEED_LISTENER_QUEUE events), for its listeners."""
        return Backlog(self._queue_size)

    @asynccontextmanager
    async def listen(self, feed_filter: FeedFilter, since: int | None, backlog: Backlog | None = None
                     ) -> AsyncIterator[AsyncIterator[list[FeedEvent]]]:
        """The events for `feed_filter` from now on, and first, with `since`, those after it that the log kept:
        in batches, each what has come since the listener last asked (sent at once, in one write). A listener
        asks for the next batch once it has written the one before. `backlog`: the connection's, when it has
        other listeners; by default the listener's own."""
        listener = _Listener(feed_filter, backlog or self.backlog())
        self._listeners.add(listener)
        FEED_LISTENERS.inc()
        try:
            await self._ensure_reader()
            # After the reader's start: what it will not read, the log still says. An id beyond the log's last
            # (one from a database since restored) is told what comes from now on, not nothing.
            if since is not None:
                since = min(since, await self._db.run(latest_feed_id))
            async with aclosing(self._events(listener, since)) as batches:
                yield batches
        finally:
            self._listeners.discard(listener)
            # What it never took: a WebSocket's backlog outlives one subscription (unsubscribed, say).
            listener.backlog.written(listener.queue.qsize())
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
            async with aclosing(self._replay(listener, since)) as pages:
                async for page in pages:
                    told = page[-1].id
                    yield page
        queue, backlog = listener.queue, listener.backlog
        while True:
            if backlog.overflowed.is_set() and queue.empty():
                raise ListenerDropped()
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            taken = len(batch)
            # What the replay told already, the reader may have read again.
            batch = [event for event in batch if event.id > told]
            try:
                if batch:
                    told = batch[-1].id
                    yield batch
            finally:
                backlog.written(taken)  # asked for more, or gone: what it was given no longer counts

    async def _replay(self, listener: _Listener, since: int) -> AsyncIterator[list[FeedEvent]]:
        """What a listener missed after `since`, a page at a time, each read when it has written the one before,
        one page of its connection's at a time."""
        feed_filter, pages_read = listener.filter, 0
        async with self._replay_turns.turn(pages_read):
            after = await self._db.run(replay_start, since, feed_filter, self._window_s, self._replay_max)
        while True:
            async with listener.backlog.replay_turn:
                async with self._replay_turns.turn(pages_read):
                    rows = await self._db.run(missed_page, after, feed_filter, self._window_s, REPLAY_PAGE)
                    page = await self._views(rows)
                pages_read += 1
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
