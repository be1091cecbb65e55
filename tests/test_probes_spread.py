"""The API's health probes of its backends: spread over the probe's period, not all at once, so that a fleet's
probes do not hold the event loop in one burst each second; a round probes at most BACKENDS_PER_ROUND of them,
the next ones in turn."""

from __future__ import annotations

import time

import httpx

from api.probes import BACKENDS_PER_ROUND, Probes
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


async def test_a_larger_fleet_is_probed_a_turn_a_round_and_keeps_the_others_last_answers() -> None:
    fleet = [Backend(id=f"gpu{number}", url=f"http://gpu{number}", slots=1) for number in range(10)]
    asked: list[str] = []
    down = {"gpu5"}

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        if request.url.host in down:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"system": {}, "devices": []} if request.url.path == "/system_stats"
                              else {"exec_info": {"queue_remaining": 0}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        probes = Probes(backends=fleet, queues={}, temporal=TemporalConnection(), http=http)
        await probes.refresh()  # all of them, as the API does once as it starts
        assert [backend for backend, answers in probes.latest.comfyui.items() if not answers] == ["gpu5"]
        down.clear()  # gpu5 answers again: seen once its turn comes
        rounds, gpu5 = [], []
        for _ in range(3):
            asked.clear()
            result = await probes.refresh(backends=probes._turn())
            rounds.append(sorted(set(asked), key=lambda host: int(host[3:])))
            assert list(result.comfyui) == [backend.id for backend in fleet]
            gpu5.append(result.comfyui["gpu5"])
    assert BACKENDS_PER_ROUND == 4
    assert rounds == [["gpu0", "gpu1", "gpu2", "gpu3"], ["gpu4", "gpu5", "gpu6", "gpu7"], ["gpu0", "gpu1", "gpu8", "gpu9"]]
    assert gpu5 == [False, True, True]  # its last answer until its turn, not a guess
