"""Crashes: the worker killed mid-prompt, ComfyUI restarted mid-prompt, the gateway down for longer than the
job's own time limit. The job still succeeds, and its prompt runs once (or again, when ComfyUI lost it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from temporalio.client import Client

from tests.harness import (
    DONE,
    ComfyUITarget,
    SimulatorProcess,
    WorkerProcess,
    api_client,
    assert_eventually,
    comfy_history_for_job,
    gateway_settings,
    migrate_database,
    prompt_heartbeat,
    wait_for_job,
)
from worker.main import running_worker


async def _job_across_a_worker_crash(
    comfyui: ComfyUITarget,
    temporal_client: Client,
    task_queue: str,
    tmp_path: Path,
    *,
    prompt_seconds: float,
    downtime: float = 0.0,
    timeout_seconds: float | None = None,
    while_down: Callable[[], None] | None = None,
) -> tuple[dict, list[dict]]:
    """A job whose worker process is SIGKILLed while it follows the prompt, and a worker started again after
    `downtime`; `while_down` runs in between. Returns the finished job and its log. The worker that comes back
    runs in this process: the same worker, without the seconds a process of its own takes to import it."""
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue)
    migrate_database(settings)
    worker = WorkerProcess(settings)
    worker.start()
    try:
        async with api_client(settings, temporal_client) as api:
            body = {"workflowJson": comfyui.slow_prompt(prompt_seconds), "timeoutSeconds": timeout_seconds}
            job_id = (await api.post("/jobs", json={k: v for k, v in body.items() if v is not None})).json()["jobId"]

            async def followed() -> bool:  # its heartbeat, which says the prompt was queued, reached Temporal
                heartbeat = await prompt_heartbeat(temporal_client, job_id)
                return heartbeat is not None and heartbeat.submitted and heartbeat.node is not None

            await assert_eventually(followed, timeout=60)
            worker.kill()
            if while_down is not None:
                while_down()
            await asyncio.sleep(downtime)
            async with running_worker(temporal_client, settings):
                job = await wait_for_job(api, job_id, until=DONE, timeout=60)
            return job, (await api.get(f"/jobs/{job_id}/logs")).json()["events"]
    finally:
        worker.stop()


async def test_worker_killed_mid_prompt_reattaches_and_the_prompt_runs_once(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    job, logs = await _job_across_a_worker_crash(comfyui, temporal_client, task_queue, tmp_path, prompt_seconds=4)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    [run] = await comfy_history_for_job(comfyui.url, job["jobId"])
    assert run["status"]["status_str"] == "success"
    assert sum(event["kind"] == "submitted" for event in logs) == 1
    assert any(event["kind"] == "reattached" for event in logs)


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


# The gateway stays down longer than the job's own limit: that time must not count against the job.
_DOWNTIME_SECONDS = 5.0
_JOB_TIMEOUT_SECONDS = 4.0


async def test_a_prompt_that_finished_while_the_gateway_was_down_is_collected(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    job, logs = await _job_across_a_worker_crash(
        comfyui, temporal_client, task_queue, tmp_path, prompt_seconds=1.5, downtime=_DOWNTIME_SECONDS,
        timeout_seconds=_JOB_TIMEOUT_SECONDS,
    )
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and len(job["outputs"]) == 1
    assert sum(event["kind"] == "submitted" for event in logs) == 1
    [run] = await comfy_history_for_job(comfyui.url, job["jobId"])
    assert run["status"]["status_str"] == "success"


async def test_a_prompt_comfyui_lost_while_the_gateway_was_down_is_resubmitted(
    temporal_client: Client, task_queue: str, own_simulator: SimulatorProcess, tmp_path: Path
) -> None:
    job, logs = await _job_across_a_worker_crash(
        own_simulator, temporal_client, task_queue, tmp_path, prompt_seconds=1.5, downtime=_DOWNTIME_SECONDS,
        timeout_seconds=_JOB_TIMEOUT_SECONDS, while_down=own_simulator.restart,
    )
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert any("lost prompt" in event["message"] for event in logs)
    [run] = await comfy_history_for_job(own_simulator.url, job["jobId"])
    assert run["prompt"][3]["gateway_attempt"] == 2
