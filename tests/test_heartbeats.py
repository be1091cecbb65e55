"""Heartbeats (activities.heartbeats) say news when there is some, and otherwise only keep the activity alive:
the time spent, changing every second, does not make each second's heartbeat new."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.testing import ActivityEnvironment

from activities.heartbeats import HEARTBEAT_CHECK_SECONDS, heartbeating, keepalive_seconds


async def heartbeats_while(news: list[str], heartbeat_timeout: timedelta, checks: int) -> list[Any]:
    """The heartbeats sent over CHECKS checks, the news changing to the next of NEWS at each check."""
    sent: list[Any] = []
    environment = ActivityEnvironment()
    environment.info = dataclasses.replace(environment.info, heartbeat_timeout=heartbeat_timeout)
    environment.on_heartbeat = lambda *details: sent.append(details[0])
    said = iter(news)
    current = next(said)

    @activity.defn
    async def follow() -> None:
        nonlocal current
        async with heartbeating(lambda: {"news": current}, news=lambda: current):
            for _ in range(checks):
                await asyncio.sleep(HEARTBEAT_CHECK_SECONDS)
                current = next(said, current)

    await environment.run(follow)
    return sent


def test_the_keepalive_is_a_quarter_of_the_heartbeat_timeout_and_at_most_ten_seconds() -> None:
    assert keepalive_seconds(timedelta(seconds=20)) == 5 and keepalive_seconds(timedelta(minutes=5)) == 10
    assert keepalive_seconds(None) == 10


async def test_nothing_new_is_said_once_in_the_keepalive_and_news_at_once() -> None:
    quiet, news = await asyncio.gather(heartbeats_while(["a"], timedelta(seconds=60), checks=3),
                                       heartbeats_while(["a", "a", "b", "b"], timedelta(seconds=60), checks=3))
    assert quiet == [{"news": "a"}]  # a heartbeat every second before
    assert news == [{"news": "a"}, {"news": "b"}]


async def test_a_short_heartbeat_timeout_keeps_a_heartbeat_every_second() -> None:
    assert len(await heartbeats_while(["a"], timedelta(seconds=2), checks=2)) >= 2
