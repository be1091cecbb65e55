"""One reader per topic, however many subscribers: the live streams' fan-out (a job's events today; a batch's,
or a feed of all jobs, by giving it another reader).

A topic's reader runs while someone subscribes to it, and is cancelled when the last subscriber leaves. It
publishes values; a subscriber is handed the latest one each time it asks, never a backlog: a slow client skips
the values it was too slow for, and costs no memory for them (a stream of a job's state needs only the latest
state). When the reader ends, each subscriber still gets its last value, then the end; when it fails, each
subscriber gets the failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")

# Reads a topic's values, one after another, until it has no more to say (a job that ended).
Reader = Callable[[str], AsyncIterator[V]]


@dataclass
class _Topic(Generic[V]):
    task: asyncio.Task[None] | None = None
    subscribers: int = 0
    version: int = 0
    latest: V | None = None
    ended: bool = False
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Subscription(Generic[V]):
    def __init__(self, topic: _Topic[V]) -> None:
        self._topic = topic
        self._seen = 0

    async def __aiter__(self) -> AsyncIterator[V]:
        """Each value newer than the last one this subscriber got, until the reader ends."""
        topic = self._topic
        while True:
            if topic.version > self._seen:
                self._seen = topic.version
                yield topic.latest  # type: ignore[misc]
                continue
            if topic.error is not None:
                raise topic.error
            if topic.ended:
                return
            await topic.changed.wait()


class Fanout(Generic[V]):
    def __init__(self, read: Reader[V]) -> None:
        self._read = read
        self._topics: dict[str, _Topic[V]] = {}

    @property
    def readers(self) -> int:
        """Readers running now: one per topic that has subscribers."""
        return len(self._topics)

    @asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[Subscription[V]]:
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic()
            topic.task = asyncio.create_task(self._run(key, topic))
        topic.subscribers += 1
        try:
            yield Subscription(topic)
        finally:
            topic.subscribers -= 1
            if topic.subscribers == 0:
                if self._topics.get(key) is topic:
                    del self._topics[key]
                assert topic.task is not None
                topic.task.cancel()  # nobody listens any more: its reader goes
                with suppress(asyncio.CancelledError):
                    await topic.task

    async def _run(self, key: str, topic: _Topic[V]) -> None:
        try:
            async for value in self._read(key):
                topic.latest, topic.version = value, topic.version + 1
                topic.publish()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — the subscribers hear of it, each on its own stream
            topic.error = error
        finally:
            topic.ended = True
            topic.publish()
            # A subscriber that comes after the end gets a reader of its own, which reads the topic anew.
            if self._topics.get(key) is topic:
                del self._topics[key]
