"""The API's one feed reader (api.feed) over a real database: fan-out to every listener that matches, and a
listener that falls too far behind is dropped and resumes from the log."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.database import Database
from api.feed import REPLAY_PAGE, Feed, FeedEvent, ListenerDropped, _ReplayTurns
from app.feed_log import FeedFilter, latest_feed_id
from app.jobstore import record_job
from app.models import JobStatus
from app.settings import Settings
from app.storage import build_storage
from tests.harness import assert_eventually
from tests.test_jobstore import record, state

CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def feed_of(engine: Engine, tmp_path: Path, queue_size: int = 100) -> Feed:
    storage = build_storage(Settings(_env_file=None, data_dir=tmp_path))
    return Feed(Database(engine), storage, poll_s=0.05, window_s=300, replay_max=100, queue_size=queue_size)


def run_job(engine: Engine, job_id: str, owner: str, statuses: list[JobStatus]) -> None:
    with Session(engine) as session:
        for status in statuses:
            record_job(session, record(state(job_id, status, CREATED, owner=owner)))


async def collect(batches, into: list[FeedEvent], until: int) -> None:  # type: ignore[no-untyped-def]
    async for batch in batches:
        into.extend(batch)
        if len(into) >= until:
            return


async def test_one_reader_hands_each_event_to_every_listener_it_matches(engine: Engine, tmp_path: Path) -> None:
    feed = feed_of(engine, tmp_path)
    alice_job, bob_job = str(uuid.uuid4()), str(uuid.uuid4())
    everyone: list[list[FeedEvent]] = [[] for _ in range(20)]
    alices: list[FeedEvent] = []
    async with feed.listen(FeedFilter(owner="alice"), None) as alice_batches:
        listening = [feed.listen(FeedFilter(), None) for _ in everyone]
        all_batches = [await listener.__aenter__() for listener in listening]
        try:
            readers = [asyncio.create_task(collect(batches, heard, 6)) for batches, heard in zip(all_batches, everyone)]
            readers.append(asyncio.create_task(collect(alice_batches, alices, 3)))
            await assert_eventually(lambda: feed.reads > 0, what="the reader reading")
            await asyncio.to_thread(run_job, engine, alice_job, "alice", [JobStatus.queued, JobStatus.running,
                                                                           JobStatus.failed])
            await asyncio.to_thread(run_job, engine, bob_job, "bob", [JobStatus.queued, JobStatus.running,
                                                                       JobStatus.cancelled])
            await asyncio.wait_for(asyncio.gather(*readers), 20)
        finally:
            for listener in listening:
                await listener.__aexit__(None, None, None)
    assert [(event.data["jobId"], event.name) for event in alices] == [
        (alice_job, "queued"), (alice_job, "running"), (alice_job, "failed")]
    told = [[event.id for event in heard] for heard in everyone]
    assert all(ids == told[0] for ids in told) and told[0] == sorted(told[0]) and len(told[0]) == 6
    assert feed.listeners == 0


async def test_a_listener_too_far_behind_is_dropped_and_resumes_from_the_log(engine: Engine, tmp_path: Path) -> None:
    feed = feed_of(engine, tmp_path, queue_size=2)
    job_id = str(uuid.uuid4())
    statuses = [JobStatus.queued, JobStatus.running, JobStatus.succeeded]
    heard: list[FeedEvent] = []
    async with feed.listen(FeedFilter(), None) as batches:
        await assert_eventually(lambda: feed.reads > 0, what="the reader reading")
        # It reads nothing meanwhile: four events for a queue of two.
        await asyncio.to_thread(run_job, engine, job_id, "alice", statuses)
        await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), "alice", [JobStatus.queued])
        # A read that began after the writes had all committed has read them all: the second read from now (a
        # read in progress now may have begun before the last write).
        reads_after_writes = feed.reads
        await assert_eventually(lambda: feed.reads >= reads_after_writes + 2, what="the reader reading the events")
        try:
            async with asyncio.timeout(10):
                async for batch in batches:
                    heard.extend(batch)
        except ListenerDropped:
            pass
        else:
            raise AssertionError("the listener was not dropped")
    assert [event.name for event in heard] == ["queued", "running"]  # what its queue held
    resumed: list[FeedEvent] = []
    async with feed.listen(FeedFilter(job_ids=frozenset({job_id})), heard[-1].id) as batches:
        await asyncio.wait_for(collect(batches, resumed, 1), 10)
    assert [event.name for event in resumed] == ["succeeded"]


async def test_a_long_replay_comes_a_page_at_a_time_and_an_id_past_the_log_hears_what_comes(
        engine: Engine, tmp_path: Path) -> None:
    owner = f"owner-{uuid.uuid4()}"
    with Session(engine) as session:
        since = latest_feed_id(session)
    jobs = [str(uuid.uuid4()) for _ in range(70)]
    for job_id in jobs:  # 210 events: several pages, fewer than the replay's most (1,000 here)
        await asyncio.to_thread(run_job, engine, job_id, owner, [JobStatus.queued, JobStatus.running,
                                                                  JobStatus.succeeded])
    storage = build_storage(Settings(_env_file=None, data_dir=tmp_path))
    feed = Feed(Database(engine), storage, poll_s=0.05, window_s=300, replay_max=1000, queue_size=100)
    pages: list[list[FeedEvent]] = []
    async with feed.listen(FeedFilter(owner=owner), since) as batches, asyncio.timeout(20):
        async for batch in batches:
            pages.append(batch)
            if sum(map(len, pages)) >= 210:
                break
    # A client that reads nothing holds one page of its replay, not all of it.
    assert [len(page) for page in pages] == [REPLAY_PAGE] * (210 // REPLAY_PAGE) + [210 % REPLAY_PAGE]
    ids = [event.id for page in pages for event in page]
    assert ids == sorted(set(ids)) and {event.data["jobId"] for event in pages[0]} <= set(jobs)

    # An id past the log's last (a database restored since): what comes from now on, not silence.
    later = str(uuid.uuid4())
    async with feed.listen(FeedFilter(owner=owner), 10**15) as batches:
        await asyncio.to_thread(run_job, engine, later, owner, [JobStatus.queued])
        heard: list[FeedEvent] = []
        await asyncio.wait_for(collect(batches, heard, 1), 10)
    assert [(event.data["jobId"], event.name) for event in heard] == [(later, "queued")]



async def test_a_connections_listeners_share_one_backlog_one_too_many_drops_them_all(
        engine: Engine, tmp_path: Path) -> None:
    feed = feed_of(engine, tmp_path, queue_size=3)
    owner = f"owner-{uuid.uuid4()}"
    backlog = feed.backlog()
    async with (feed.listen(FeedFilter(owner=owner), None, backlog) as first,
                feed.listen(FeedFilter(owner=owner), None, backlog) as second,
                feed.listen(FeedFilter(owner=owner), None) as alone):
        await assert_eventually(lambda: feed.reads > 0, what="the reader reading")
        # Nobody writes meanwhile: two events for each of the connection's two listeners, four for its three.
        await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), owner, [JobStatus.queued, JobStatus.running])
        await assert_eventually(lambda: backlog.overflowed.is_set(), what="the connection too far behind")
        heard = {}
        for name, batches in (("first", first), ("second", second)):
            heard[name] = []
            with pytest.raises(ListenerDropped):
                async for batch in batches:
                    heard[name].extend(event.name for event in batch)
        alones: list[FeedEvent] = []
        await asyncio.wait_for(collect(alone, alones, 2), 10)  # its own backlog: not dropped
    # What each queue held when the fourth event was one too many.
    assert sorted(heard.values()) == [["queued"], ["queued", "running"]]
    assert [event.name for event in alones] == ["queued", "running"]


async def test_what_a_subscription_held_is_given_back_when_it_ends(engine: Engine, tmp_path: Path) -> None:
    """A WebSocket's backlog outlives each subscription: one that ends (unsubscribed) while it holds events, taken
    or not, no longer counts them, or a socket that subscribes and unsubscribes would be closed as too far behind."""
    feed = feed_of(engine, tmp_path, queue_size=3)
    owner = f"owner-{uuid.uuid4()}"
    backlog = feed.backlog()
    async with feed.listen(FeedFilter(owner=owner), None, backlog) as first:
        await assert_eventually(lambda: feed.reads > 0, what="the reader reading")
        await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), owner, [JobStatus.queued, JobStatus.running])
        await assert_eventually(lambda: backlog.held == 2, what="both events held")
        await anext(first)  # taken, not yet written: the subscription ends while it sends them
    assert backlog.held == 0 and not backlog.overflowed.is_set()
    async with feed.listen(FeedFilter(owner=owner), None, backlog) as second:
        await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), owner, [JobStatus.queued, JobStatus.running])
        heard: list[FeedEvent] = []
        await asyncio.wait_for(collect(second, heard, 2), 10)
    assert [event.name for event in heard] == ["queued", "running"] and not backlog.overflowed.is_set()


async def test_a_connection_that_stops_reading_holds_one_page_of_its_replays(engine: Engine, tmp_path: Path) -> None:
    owner = f"owner-{uuid.uuid4()}"
    with Session(engine) as session:
        since = latest_feed_id(session)
    for _ in range(10):  # 30 events: two pages for each replay
        await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), owner, [JobStatus.queued, JobStatus.running,
                                                                            JobStatus.succeeded])
    feed = feed_of(engine, tmp_path)
    backlog = feed.backlog()
    async with (feed.listen(FeedFilter(owner=owner), since, backlog) as one,
                feed.listen(FeedFilter(owner=owner), since, backlog) as other):
        firsts = {asyncio.ensure_future(anext(one)): one, asyncio.ensure_future(anext(other)): other}
        done, waiting = await asyncio.wait(firsts, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.3)  # time enough for the other's page, were it read
        assert len(done) == 1 and len(waiting) == 1 and len(done.pop().result()) == REPLAY_PAGE
        # Written (it asks for more): the other replay's page comes, before the first one's next.
        (had,) = [batches for future, batches in firsts.items() if future not in waiting]
        (had_not,) = [batches for future, batches in firsts.items() if future in waiting]
        after = asyncio.ensure_future(anext(had))
        assert len(await asyncio.wait_for(waiting.pop(), 10)) == REPLAY_PAGE
        await asyncio.sleep(0.3)
        assert not after.done()  # the other's page is not written yet
        other_after = asyncio.ensure_future(anext(had_not))
        assert len(await asyncio.wait_for(after, 10)) == 30 - REPLAY_PAGE
        other_after.cancel()
        await asyncio.gather(other_after, return_exceptions=True)



async def test_replay_turns_go_to_the_replays_that_have_read_fewest_pages_first() -> None:
    turns = _ReplayTurns(2)
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("long1", "long2", "third", "fourth", "new", "gone")}

    async def replay(name: str, pages_read: int) -> None:
        async with turns.turn(pages_read):
            order.append(name)
            await release[name].wait()

    tasks = {}
    for name, pages_read in (("long1", 5), ("long2", 5), ("third", 3), ("fourth", 3), ("gone", 0), ("new", 0)):
        tasks[name] = asyncio.create_task(replay(name, pages_read))
        await asyncio.sleep(0)
    assert order == ["long1", "long2"]  # two at once; the others wait
    tasks["gone"].cancel()  # a client that went away while it waited takes no turn
    await asyncio.sleep(0)
    for name in ("long1", "long2", "new", "third", "fourth"):
        release[name].set()
        await asyncio.sleep(0.01)
    # The one that had read no page went before those that had read three, which went in their order.
    assert order == ["long1", "long2", "new", "third", "fourth"]
    await asyncio.gather(*(task for name, task in tasks.items() if name != "gone"))
    async with turns.turn(9), turns.turn(9):  # every turn given back
        pass
