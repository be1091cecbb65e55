"""Prometheus metrics end to end: real jobs through the API, a worker and the ComfyUI simulator, then the API's
GET /metrics, the worker's endpoint (WORKER_METRICS_ADDRESS) and the Temporal SDK's (TEMPORAL_METRICS_ADDRESS)
scraped as Prometheus scrapes them, and the counters checked to have moved by what the jobs did."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment

from app.temporal_client import connect_temporal, process_runtime
from tests.harness import (
    ComfyUITarget,
    Gateway,
    api_alone,
    api_alone_settings,
    api_client,
    asgi_client,
    assert_eventually,
    free_port,
    gateway_settings,
    migrate_database,
    recorded_workflow,
    serve_locally,
)
from worker.main import running_worker

METRICS_TOKEN = "a scrape credential"
WEBHOOK_SECRET = "the operator's webhook secret"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parsed(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not there yet (a labelled counter appears at its first count)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class Scrapes:
    def __init__(self, gateway: Gateway, worker_url: str, sdk_url: str) -> None:
        self.gateway, self.worker_url, self.sdk_url = gateway, worker_url, sdk_url

    async def api(self) -> Samples:
        response = await self.gateway.api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return parsed(response.text)

    async def worker(self) -> Samples:
        return parsed(await _scrape(self.worker_url))

    async def sdk(self) -> Samples:
        return parsed(await _scrape(self.sdk_url))


async def _scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    return response.text


@pytest.fixture(scope="module")
async def scrapes(
    temporal_env: WorkflowEnvironment, comfyui: ComfyUITarget, tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Scrapes]:
    """One gateway for the module, its worker on a Temporal client of its own, whose SDK runtime serves metrics."""
    worker_address, sdk_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    settings = gateway_settings(
        temporal_env.client, comfyui.url, tmp_path_factory.mktemp("metrics"), f"test-{uuid.uuid4()}",
        metrics_token=METRICS_TOKEN, worker_metrics_address=worker_address, temporal_metrics_address=sdk_address,
        cache_enabled=True, webhook_secret=WEBHOOK_SECRET, webhook_allowed_domains="127.0.0.1",
        webhook_retry_first_interval_s=0.2,
    )
    migrate_database(settings)
    worker_client = await connect_temporal(settings, process_runtime(settings, serves_metrics=True))
    async with running_worker(worker_client, settings), api_client(settings, temporal_env.client) as api:
        yield Scrapes(Gateway(api, settings, comfyui), f"http://{worker_address}/metrics",
                      f"http://{sdk_address}/metrics")


async def test_jobs_move_the_counters_of_the_worker_and_the_api(scrapes: Scrapes) -> None:
    gateway = scrapes.gateway
    api_before, worker_before = await scrapes.api(), await scrapes.worker()
    solid = {"workflowId": "solid_color", "inputs": {"width": 16, "height": 16, "color": 77}}
    first = await gateway.run(solid)
    hit = await gateway.run(solid)  # the same request (its template draws no seed): the result cache answers it
    failed = await gateway.run({"workflowJson": recorded_workflow("fail.json")})
    assert (first["status"], hit["status"], failed["status"]) == ("succeeded", "succeeded", "failed")
    assert hit["cacheHit"] is True

    async def counted() -> Samples:
        worker = await scrapes.worker()
        moved = {key: worker.get(key, 0.0) - worker_before.get(key, 0.0) for key in worker}
        assert value(moved, "gateway_jobs_created_total", template="solid_color") == 2
        assert value(moved, "gateway_jobs_created_total", template="(raw)") == 1
        assert value(moved, "gateway_jobs_finished_total", template="solid_color", status="succeeded") == 2
        assert value(moved, "gateway_jobs_finished_total", template="(raw)", status="failed") == 1
        assert value(moved, "gateway_job_duration_seconds_count", template="solid_color", status="succeeded") == 2
        assert value(moved, "gateway_job_duration_seconds_count", template="(raw)", status="failed") == 1
        # The cache hit ran nothing: only the first job waited for ComfyUI.
        assert value(moved, "gateway_job_queue_wait_seconds_count", template="solid_color") == 1
        assert value(moved, "gateway_job_queue_wait_seconds_count", template="(raw)") == 1
        return worker

    worker = await assert_eventually(counted, timeout=10, what="the worker's counters moving by the jobs")
    assert value(worker, "gateway_job_duration_seconds_sum", template="solid_color", status="succeeded") > 0
    assert value(worker, "process_resident_memory_bytes") > 0

    api = await scrapes.api()
    assert value(api, "gateway_result_cache_lookups_total", result="hit") - value(
        api_before, "gateway_result_cache_lookups_total", result="hit") == 1
    polls = value(api, "gateway_http_requests_total", method="GET", route="/jobs/{job_id}", status="200") - value(
        api_before, "gateway_http_requests_total", method="GET", route="/jobs/{job_id}", status="200")
    assert polls >= 3  # gateway.run polls each job until it has ended
    assert value(api, "gateway_http_requests_total", method="POST", route="/jobs", status="202") - value(
        api_before, "gateway_http_requests_total", method="POST", route="/jobs", status="202") == 3
    assert value(api, "gateway_http_request_duration_seconds_count", method="POST", route="/jobs") - value(
        api_before, "gateway_http_request_duration_seconds_count", method="POST", route="/jobs") == 3
    # No series names a job.
    assert not [key for key in api if any(first["jobId"] in label for _, label in key[1])]
    # Each backend as the API's probe found it: the simulator answers, with its queue and its (CPU) memory.
    assert value(api, "gateway_backend_up", backend="comfyui-1") == 1
    assert ("gateway_backend_queue_remaining", frozenset({("backend", "comfyui-1")})) in api
    [(total, device)] = [(sample, dict(labels)["device"]) for (name, labels), sample in api.items()
                         if name == "gateway_backend_vram_total_bytes"]
    assert device == "cpu" and total > 0
    assert 0 < value(api, "gateway_backend_vram_used_bytes", backend="comfyui-1", device="cpu") <= total
    # The jobs table's live jobs: none are left.
    assert not [key for key, count in api.items() if key[0] == "gateway_jobs_unfinished" and count]


async def test_a_running_job_is_counted_as_running_from_the_jobs_table(scrapes: Scrapes) -> None:
    gateway = scrapes.gateway
    before = await scrapes.worker()
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(3)})

    async def running() -> bool:
        return value(await scrapes.api(), "gateway_jobs_unfinished", template="(raw)", status="running") == 1

    await assert_eventually(running, timeout=20, what="the job counted as running")
    response = await gateway.api.post(f"/jobs/{job_id}/cancel")
    assert response.status_code in (200, 202), response.text

    async def cancelled() -> bool:
        worker = await scrapes.worker()
        assert value(worker, "gateway_jobs_finished_total", template="(raw)", status="cancelled") - value(
            before, "gateway_jobs_finished_total", template="(raw)", status="cancelled") == 1
        return value(await scrapes.api(), "gateway_jobs_unfinished", template="(raw)", status="running") == 0

    await assert_eventually(cancelled, timeout=20, what="the job counted as cancelled")


async def test_webhook_attempts_are_counted_by_outcome(scrapes: Scrapes) -> None:
    answers = iter([500, 200])

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=next(answers))

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    before = await scrapes.worker()
    async with serve_locally(receiver) as url:
        job = await scrapes.gateway.run({"workflowJson": recorded_workflow("image.json"),
                                         "callbackUrl": f"{url}/hook", "webhookEvents": ["job.succeeded"]})
        assert job["status"] == "succeeded", job

        async def counted() -> bool:
            worker = await scrapes.worker()
            for outcome in ("failed", "delivered"):
                assert value(worker, "gateway_webhook_attempts_total", outcome=outcome) - value(
                    before, "gateway_webhook_attempts_total", outcome=outcome) == 1, outcome
            return True

        await assert_eventually(counted, timeout=20, what="a failed attempt, then a delivered one")


async def test_the_temporal_sdk_serves_its_own_worker_metrics(scrapes: Scrapes) -> None:
    def completed(sdk: Samples) -> float:
        return sum(count for (name, labels), count in sdk.items()
                   if name == "temporal_workflow_completed_total" and ("workflow_type", "GenerationWorkflow") in labels)

    before = await scrapes.sdk()
    job = await scrapes.gateway.run({"workflowId": "solid_color", "inputs": {"width": 8, "height": 8, "color": 1}})
    assert job["status"] == "succeeded", job
    # The job's workflow ran on a worker of this runtime, whose SDK counts it.
    await assert_eventually(lambda: _moved(scrapes, before, completed), timeout=10, what="the SDK counting the job")
    sdk = await scrapes.sdk()
    queue = scrapes.gateway.settings.temporal_task_queue
    assert [labels for (name, labels), _ in sdk.items()
            if name == "temporal_worker_task_slots_available" and ("task_queue", queue) in labels]


async def _moved(scrapes: Scrapes, before: Samples, measure: Callable[[Samples], float]) -> bool:
    return measure(await scrapes.sdk()) > measure(before)


async def test_metrics_need_the_metrics_token(scrapes: Scrapes) -> None:
    api = scrapes.gateway.api
    for headers in ({}, {"Authorization": "Bearer not the token"}, {"X-API-Key": METRICS_TOKEN}):
        response = await api.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "AUTH_FAILED"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_requests_are_labelled_by_route_template_not_by_path(tmp_path: Path) -> None:
    """Ids in paths, and paths that match no route, make no new series: one per route template."""
    settings = api_alone_settings(tmp_path, api_keys="a-key")  # every job route refuses before Temporal: 401
    async with api_alone(settings) as app, asgi_client(app) as client:
        before = parsed((await client.get("/metrics")).text)
        for _ in range(5):
            assert (await client.get(f"/jobs/{uuid.uuid4()}")).status_code == 401
            assert (await client.get(f"/no/such/{uuid.uuid4()}")).status_code == 404
        assert (await client.delete("/health")).status_code == 405
        after = parsed((await client.get("/metrics")).text)
    moved = {key: count - before.get(key, 0.0) for key, count in after.items()
             if key[0] == "gateway_http_requests_total" and count != before.get(key, 0.0)}
    assert moved == {
        ("gateway_http_requests_total", frozenset({("method", "GET"), ("route", "/jobs/{job_id}"),
                                                   ("status", "401")})): 5,
        ("gateway_http_requests_total", frozenset({("method", "GET"), ("route", "(unmatched)"),
                                                   ("status", "404")})): 5,
        ("gateway_http_requests_total", frozenset({("method", "DELETE"), ("route", "/health"),
                                                   ("status", "405")})): 1,
        ("gateway_http_requests_total", frozenset({("method", "GET"), ("route", "/metrics"),
                                                   ("status", "200")})): 1,
    }
