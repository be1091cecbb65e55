"""The API as `comfyui-gateway api` serves it, against clients that send too much: a body of a million keys
must neither stall other requests nor get an answer of its own size."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api.plain_json import MAX_VALUES
from tests.harness import ApiProcess, error_of, free_port, gateway_settings, migrate_database


@pytest.fixture(scope="module")
async def api_server(temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The API alone, without a worker; its URL."""
    settings = gateway_settings(temporal_env.client, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("api"),
                                f"test-{uuid.uuid4()}")
    migrate_database(settings)
    server = ApiProcess(settings)
    await server.start()
    yield server.url
    server.stop()


def unknown_fields(count: int) -> bytes:
    return json.dumps({"workflowId": "solid_color", **{f"k{index:07d}": 0 for index in range(count)}}).encode()


async def test_huge_bodies_get_small_answers_while_other_requests_go_on(api_server: str) -> None:
    """A body of a million keys once got an answer of 104 MB after 12 to 22 s, and /health waited 11 s."""
    bodies = {"a million keys": unknown_fields(1_000_000), "just under the limit": unknown_fields(MAX_VALUES - 10)}
    health_latencies: list[float] = []
    async with httpx.AsyncClient(base_url=api_server, timeout=60) as client:
        stop = asyncio.Event()

        async def poll_health() -> None:
            while not stop.is_set():
                started = time.monotonic()
                await client.get("/health")
                health_latencies.append(time.monotonic() - started)

        poller = asyncio.create_task(poll_health())
        answers = {}
        for name, body in bodies.items():
            started = time.monotonic()
            answers[name] = await client.post("/jobs", content=body, headers={"content-type": "application/json"})
            print(f"{name}: {len(body)} bytes, {len(answers[name].content)} in answer, {time.monotonic() - started:.2f} s")
        stop.set()
        await poller
    for name, answer in answers.items():
        assert answer.status_code == 400 and len(answer.content) < 64_000, (name, len(answer.content))
    assert error_of(answers["a million keys"])["details"]["fields"] == [
        {"field": "body", "message": f"more than {MAX_VALUES} values (array items and object members)"}]
    assert error_of(answers["just under the limit"])["details"]["moreFields"] == MAX_VALUES - 10 - 50
    print(f"/health: {len(health_latencies)} answers, slowest {max(health_latencies):.3f} s")
    assert len(health_latencies) > 5 and max(health_latencies) < 1.0, sorted(health_latencies)[-5:]
