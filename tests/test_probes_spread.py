"""The API's health probes of its backends: spread over the probe's period, not all at once, so that a fleet's
probes do not hold the event loop in one burst each second; each backend is still probed once a round."""

from __future__ import annotations

import time

import httpx

from api.probes import Probes
from api.temporal_connection import TemporalConnection
from app.comfy.backends import Backend

BACKENDS = [Backend(id=f"gpu{number}", url=f"http://gpu{number}", slots=1) for number in range(4)]


def _answering(asked: list[tuple[float, str]]) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        asked.append((time.monotonic(), f"{request.url.host}{request.url.path}"))
        if request.url.path == "/prompt":
            return httpx.Response(200, json={"exec_info": {"queue_remaining": 2}})
        return httpx.Response(200, json={"system": {}, "devices": []})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


async def test_a_spread_round_probes_each_backend_once_one_after_another() -> None:
    asked: list[tuple[float, str]] = []
    async with _answering(asked) as http:
        probes = Probes(backends=BACKENDS, queues={}, temporal=TemporalConnection(), http=http)
        began = time.monotonic()
        result = await probes.refresh(spread_seconds=0.8)
    assert result.comfyui == {backend.id: True for backend in BACKENDS}
    assert {backend.id: probes.readings[backend.id].queue_remaining for backend in BACKENDS} == dict.fromkeys(
        (backend.id for backend in BACKENDS), 2)
    stats = [(at - began, where) for at, where in asked if where.endswith("/system_stats")]
    assert [where for _, where in stats] == [f"gpu{number}/system_stats" for number in range(4)]
    # The n-th no sooner than n quarters of the spread in (0, 0.2, 0.4, 0.6 s).
    for number, (after, _) in enumerate(stats):
        assert after >= number * 0.2 - 0.01


async def test_without_a_spread_every_backend_is_probed_at_once() -> None:
    asked: list[tuple[float, str]] = []
    async with _answering(asked) as http:
        probes = Probes(backends=BACKENDS, queues={}, temporal=TemporalConnection(), http=http)
        began = time.monotonic()
        await probes.refresh()
    assert len(asked) == 2 * len(BACKENDS) and max(at for at, _ in asked) - began < 0.4
