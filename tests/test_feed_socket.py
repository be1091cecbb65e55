"""One `WS /ws` connection's subscriptions (api.routes.feed) over the API's feed reader and a real database: a
socket that stops reading holds at most FEED_LISTENER_QUEUE events across its subscriptions, then is closed
with 4408, its subscriptions gone. And the event streams' send, which skips sse-starlette's per-send scope."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.routes.feed import CLOSE_TOO_FAR_BEHIND, _Connection
from app.auth import Principal, Role
from app.feed_log import latest_feed_id
from app.models import JobStatus
from tests.harness import assert_eventually
from tests.test_feed_reader import feed_of, run_job


class StuckSocket:
    """A client that reads the first few messages, then nothing: each send after those never returns."""

    def __init__(self, reads: int) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None
        self._reads = reads

    async def send_text(self, text: str) -> None:
        if len(self.sent) >= self._reads:
            await asyncio.Event().wait()
        self.sent.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_a_socket_that_stops_reading_is_closed_once_its_subscriptions_hold_too_much(
        engine: Engine, tmp_path: Path) -> None:
    owner = f"owner-{uuid.uuid4()}"
    with Session(engine) as session:
        since = latest_feed_id(session)
    for _ in range(20):  # 60 events in the log: each replaying subscription has pages to read
        await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), owner, [JobStatus.queued, JobStatus.running,
                                                                            JobStatus.succeeded])
    feed = feed_of(engine, tmp_path, queue_size=10)
    socket = StuckSocket(reads=5)  # the three `subscribed` and two events
    connection = _Connection(socket, feed, Principal(owner, Role.user))  # type: ignore[arg-type]
    subscribe: dict[str, Any] = {"type": "subscribe", "since": since}
    for name in ("a", "b", "c"):
        await connection.handle({**subscribe, "id": name})
    try:
        await assert_eventually(lambda: feed.listeners == 3 and feed.reads > 0, what="three subscriptions")
        await asyncio.sleep(0.3)
        assert socket.closed is None  # three replays' pages held, but no live event: within its bound
        # Four live events for each of three subscriptions: twelve, more than the socket's ten.
        for _ in range(2):
            await asyncio.to_thread(run_job, engine, str(uuid.uuid4()), owner, [JobStatus.queued, JobStatus.running])
        await assert_eventually(lambda: socket.closed is not None, what="the socket closed")
        assert socket.closed is not None and socket.closed[0] == CLOSE_TOO_FAR_BEHIND
        await assert_eventually(lambda: feed.listeners == 0, what="its subscriptions gone")
    finally:
        await connection.close()
    assert len(socket.sent) == 5


def test_event_streams_replace_sse_starlettes_send_with_timeout() -> None:
    # What _HeldStream overrides is sse-starlette's own: were it renamed, every send would open its cancel
    # scope again, unnoticed.
    from sse_starlette import EventSourceResponse

    from api.event_streams import _HeldStream

    assert "_send_with_timeout" in vars(EventSourceResponse) and "_send_with_timeout" in vars(_HeldStream)
    assert EventSourceResponse(iter(())).send_timeout is None
