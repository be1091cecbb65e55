"""Faults are visible and quiet: a job waiting for a ComfyUI that does not answer says so, the worker logs the
outage once and the recovery once, a file gone from storage is a 404 of its own, and /ready tells whether a
worker is there to run jobs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from tests.harness import (
    DONE,
    ExternalComfyUI,
    Gateway,
    SimulatorProcess,
    api_client,
    assert_eventually,
    gateway_settings,
    migrate_database,
    recorded_workflow,
    wait_for_job,
)
from worker.main import running_worker


async def test_an_outage_is_logged_once_and_its_end_once_while_jobs_wait_it_out(
    temporal_client: Client, task_queue: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "comfyui").mkdir()
    comfyui = SimulatorProcess(tmp_path / "comfyui", time_scale=0.1)  # started only once the jobs wait for it
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path / "gateway", task_queue, max_concurrency=2)
    migrate_database(settings)
    caplog.set_level(logging.INFO)
    try:
        async with running_worker(temporal_client, settings), api_client(settings, temporal_client) as api:
            job_ids = [(await api.post("/jobs", json={"workflowJson": recorded_workflow("image.json")})).json()["jobId"]
                       for _ in range(2)]

            async def both_warned() -> bool:
                jobs = [(await api.get(f"/jobs/{job_id}")).json() for job_id in job_ids]
                return all((job["warning"] or {}).get("code") == "COMFYUI_UNREACHABLE" for job in jobs)

            await assert_eventually(both_warned, timeout=10)
            comfyui.start()
            jobs = [await wait_for_job(api, job_id, until=DONE, timeout=60) for job_id in job_ids]
    finally:
        comfyui.kill()
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    outage = [(record.levelname, record.getMessage()) for record in caplog.records
              if record.name == "comfyui_gateway.backends"]
    assert [level for level, _ in outage] == ["WARNING", "INFO"], outage
    assert "unreachable" in outage[0][1] and "answers again" in outage[1][1]
    tracebacks = [record for record in caplog.records if record.exc_info and record.levelno >= logging.WARNING]
    assert tracebacks == []


async def test_an_output_whose_file_is_gone_is_a_404_of_its_own(gateway: Gateway) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow("image.json")})
    [output] = job["outputs"]
    (gateway.settings.resolved_storage_path / output["storagePath"]).unlink()
    for params in ({}, {"format": "base64"}):
        response = await gateway.api.get(output["url"], params=params)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "OUTPUT_FILE_MISSING" and error["details"]["storagePath"] == output["storagePath"]


@pytest.fixture
async def no_worker(temporal_client: Client, task_queue: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    """The API on a queue that no worker polls (yet)."""
    settings = gateway_settings(temporal_client, "http://127.0.0.1:9", tmp_path, task_queue)
    migrate_database(settings)
    async with api_client(settings, temporal_client) as api:
        yield Gateway(api, settings, ExternalComfyUI(settings.comfyui_url))


async def test_ready_waits_for_a_worker_polling_the_job_queues(
    no_worker: Gateway, temporal_client: Client, task_queue: str
) -> None:
    health, ready = await no_worker.api.get("/health"), await no_worker.api.get("/ready")
    assert health.json()["temporal"]["reachable"] is True
    assert ready.status_code == 503 and ready.json()["ready"] is False

    async def is_ready() -> dict | None:
        response = await no_worker.api.get("/ready")
        return response.json() if response.status_code == 200 else None

    async with running_worker(temporal_client, no_worker.settings):
        body = await assert_eventually(is_ready, timeout=15)
    assert body["ready"] is True and set(body["workers"]["queues"]) == {
        task_queue, f"{task_queue}.comfyui", f"{task_queue}.comfyui-1"}


async def test_with_no_worker_a_job_reads_as_accepted_and_a_terminated_one_as_ended(
    no_worker: Gateway, temporal_client: Client
) -> None:
    api = no_worker.api
    job_id = (await api.post("/jobs", json={"workflowJson": recorded_workflow("image.json")})).json()["jobId"]
    started = time.monotonic()
    job = (await api.get(f"/jobs/{job_id}")).json()
    assert time.monotonic() - started < 10  # not Temporal's 30 s wait for a query no worker takes
    assert job["status"] == "queued" and job["attempts"] == 0 and job["error"] is None
    await temporal_client.get_workflow_handle(job_id).terminate(reason="never ran")

    async def ended_job() -> dict | None:
        job = (await api.get(f"/jobs/{job_id}")).json()
        return job if job["status"] != "queued" else None

    ended = await assert_eventually(ended_job, timeout=5)  # a live job's view is reused for 250 ms
    assert ended["status"] == "cancelled" and ended["error"]["code"] == "JOB_TERMINATED"
    assert ended["error"]["message"] == "terminated in Temporal: never ran"
