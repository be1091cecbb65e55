"""Bursts of requests cost ComfyUI and Temporal nothing extra: /health and /ready answer from a probe refreshed
in the background, and concurrent reads of what ComfyUI has share one call."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from temporalio.client import Client

from app.comfy.models import MODEL_LOADERS
from tests.harness import api_client, gateway_settings, migrate_database, serve_locally

BURST = 1000


@pytest.fixture
async def counted_comfyui() -> AsyncIterator[tuple[str, Counter]]:
    """A ComfyUI that answers /system_stats and /object_info, slowly, and counts what it was asked."""
    calls: Counter = Counter()

    async def system_stats(request: web.Request) -> web.Response:
        calls["system_stats"] += 1
        await asyncio.sleep(0.05)
        return web.json_response({"system": {"comfyui_version": "0.3.64"}, "devices": []})

    async def object_info(request: web.Request) -> web.Response:
        calls["object_info"] += 1
        await asyncio.sleep(0.05)
        node = request.match_info.get("node")
        loaders = {loader: (kind, name) for kind, (loader, name) in MODEL_LOADERS.items()}
        if node in loaders:
            return web.json_response({node: {"input": {"required": {loaders[node][1]: [["a.safetensors"], {}]}}}})
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/system_stats", system_stats)
    app.router.add_get("/object_info/{node}", object_info)
    async with serve_locally(app) as url:
        yield url, calls


async def test_a_burst_of_health_checks_asks_comfyui_once_a_second_and_all_answer(
    counted_comfyui: tuple[str, Counter], temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    url, calls = counted_comfyui
    settings = gateway_settings(temporal_client, url, tmp_path, task_queue)
    migrate_database(settings)
    async with api_client(settings, temporal_client) as api:
        for _ in range(2):  # a second burst finds the API as the first left it
            asked_before, started = calls["system_stats"], time.monotonic()
            answers = await asyncio.gather(*(api.get("/health") for _ in range(BURST)))
            elapsed = time.monotonic() - started
            assert [answer.status_code for answer in answers] == [200] * BURST
            assert all(answer.json()["comfyui"]["reachable"] for answer in answers)
            # The probe's own pace, about once a second, not a call per request.
            assert calls["system_stats"] - asked_before <= elapsed + 2


async def test_a_burst_of_model_listings_asks_comfyui_once(
    counted_comfyui: tuple[str, Counter], temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    url, calls = counted_comfyui
    settings = gateway_settings(temporal_client, url, tmp_path, task_queue)
    migrate_database(settings)
    async with api_client(settings, temporal_client) as api:
        answers = await asyncio.gather(*(api.get("/models") for _ in range(200)))
    assert {answer.status_code for answer in answers} == {200}
    assert answers[0].json()["checkpoints"] == ["a.safetensors"]
    assert calls["object_info"] == len(MODEL_LOADERS)
