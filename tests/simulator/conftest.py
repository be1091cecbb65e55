"""Fixtures for the simulator tests: a fresh in-process simulator per test, and a WebSocket
client registered as "x", the client id the recordings were made with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .support import RunningSimulator, WsRecorder, start_simulator


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(tmp_path / "comfyui", time_scale=0.1)
    yield running
    await running.stop()


@pytest.fixture
async def ws(sim: RunningSimulator) -> AsyncIterator[WsRecorder]:
    recorder = await WsRecorder(sim, "x").connect()
    yield recorder
    await recorder.close()
