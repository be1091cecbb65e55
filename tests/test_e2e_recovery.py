"""Crashes: the worker killed mid-prompt, ComfyUI restarted mid-prompt. The job still succeeds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from tests.harness import (
    DONE,
    ComfyUITarget,
    SimulatorProcess,
    WorkerProcess,
    api_client,
    comfy_history_for_job,
    gateway_settings,
    migrate_database,
    wait_for_job,
)
from worker.main import running_worker


@pytest.fixture
def own_simulator(tmp_path: Path) -> Iterator[SimulatorProcess]:
    (tmp_path / "comfyui").mkdir()
    process = SimulatorProcess(tmp_path / "comfyui", time_scale=0.1)
    process.start()
    yield process
    process.kill()


async def test_worker_killed_mid_prompt_reattaches_and_the_prompt_runs_once(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue)
    migrate_database(settings)
    worker = WorkerProcess(settings)
    worker.start()
    try:
        async with api_client(settings, temporal_client) as api:
            job_id = (await api.post("/jobs", json={"workflowJson": comfyui.slow_prompt(4)})).json()["jobId"]
            await wait_for_job(api, job_id, until={"running"}, timeout=60)
            await asyncio.sleep(0.5)
            worker.kill()
            worker.start()
            job = await wait_for_job(api, job_id, until=DONE, timeout=60)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1
            [run] = await comfy_history_for_job(comfyui.url, job_id)
            assert run["status"]["status_str"] == "success"
            logs = (await api.get(f"/jobs/{job_id}/logs")).json()["events"]
            assert sum(event["kind"] == "submitted" for event in logs) == 1
            assert any(event["kind"] == "reattached" for event in logs)
    finally:
        worker.stop()


async def test_comfyui_restarted_mid_prompt_is_resubmitted(
    temporal_client: Client, task_queue: str, own_simulator: SimulatorProcess, tmp_path: Path
) -> None:
    settings = gateway_settings(temporal_client, own_simulator.url, tmp_path, task_queue)
    migrate_database(settings)
    async with running_worker(temporal_client, settings), api_client(settings, temporal_client) as api:
        job_id = (await api.post("/jobs", json={"workflowJson": own_simulator.slow_prompt(2)})).json()["jobId"]
        await wait_for_job(api, job_id, until={"running"})
        own_simulator.restart()  # the real ComfyUI forgets its queue and history on restart too
        job = await wait_for_job(api, job_id, until=DONE, timeout=60)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        [run] = await comfy_history_for_job(own_simulator.url, job_id)
        assert run["prompt"][3]["gateway_attempt"] == 2
        logs = (await api.get(f"/jobs/{job_id}/logs")).json()["events"]
        assert any("lost prompt" in event["message"] for event in logs)
