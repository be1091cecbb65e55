"""Two ComfyUI backends (COMFYUI_URLS): the session's simulator as gpu1 and one of the test's own as gpu2. Jobs
spread over both, never beyond a backend's slots; a backend killed mid-job loses the job to the other, where it
runs once; a backend that comes back is used again; a tag routes to its backend; a prefetched prompt cancelled
is deleted from ComfyUI's queue; a retry polled by the wrong backend goes back to the prompt's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
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


@pytest.fixture
def gpu2(own_simulator: SimulatorProcess) -> SimulatorProcess:
    return own_simulator


@dataclass
class Fleet:
    api: httpx.AsyncClient
    gpu1: ComfyUITarget
    gpu2: SimulatorProcess

    def url(self, backend: str) -> str:
        return {"gpu1": self.gpu1.url, "gpu2": self.gpu2.url}[backend]

    async def submit(self, body: dict[str, Any]) -> str:
        response = await self.api.post("/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["jobId"]

    async def runs(self, job_id: str) -> dict[str, list[dict]]:
        """backend → the prompts it ran for the job (its /history)."""
        return {backend: await comfy_history_for_job(self.url(backend), job_id) for backend in ("gpu1", "gpu2")}


def fleet_settings(temporal_client: Client, task_queue: str, tmp_path: Path, gpu1: ComfyUITarget,
                   gpu2: SimulatorProcess, **overrides: Any):  # type: ignore[no-untyped-def]
    return gateway_settings(
        temporal_client, gpu1.url, tmp_path / "gateway", task_queue,
        comfyui_urls=f"gpu1={gpu1.url};slots=1,gpu2={gpu2.url};slots=1;tags=flux", **overrides)


@pytest.fixture
async def fleet(
    request: pytest.FixtureRequest, temporal_client: Client, task_queue: str, comfyui: ComfyUITarget,
    gpu2: SimulatorProcess, tmp_path: Path,
) -> AsyncIterator[Fleet]:
    """Worker and API over both backends (gpu2 tagged flux); `@pytest.mark.settings(...)` overrides settings."""
    marker = request.node.get_closest_marker("settings")
    overrides = dict(marker.kwargs if marker else {})
    settings = fleet_settings(temporal_client, task_queue, tmp_path, comfyui, gpu2, **overrides)
    migrate_database(settings)
    async with running_worker(temporal_client, settings), api_client(settings, temporal_client) as api:
        yield Fleet(api, comfyui, gpu2)


async def comfy_queue(url: str) -> tuple[list[str | None], list[str | None]]:
    """ComfyUI's running and pending prompts, as the ids of the jobs they belong to."""
    async with httpx.AsyncClient() as client:
        queue = (await client.get(f"{url}/queue")).json()
    return ([item[3].get("gateway_job_id") for item in queue["queue_running"]],
            [item[3].get("gateway_job_id") for item in queue["queue_pending"]])


async def test_a_burst_spreads_over_both_backends_and_never_exceeds_their_slots(fleet: Fleet) -> None:
    # slots=1 and COMFYUI_PREFETCH=1: each backend has at most one prompt running and one waiting.
    job_ids = await asyncio.gather(*(fleet.submit({"workflowJson": fleet.gpu1.slow_prompt(0.4)}) for _ in range(8)))
    most = {"gpu1": 0, "gpu2": 0}

    async def all_done() -> bool:
        for backend in most:
            running, pending = await comfy_queue(fleet.url(backend))
            assert len(running) <= 1, (backend, running)
            most[backend] = max(most[backend], len(running) + len(pending))
        jobs = [(await fleet.api.get(f"/jobs/{job_id}")).json() for job_id in job_ids]
        return all(job["status"] in DONE for job in jobs)

    await assert_eventually(all_done, timeout=60, interval=0.05)
    assert most["gpu1"] <= 2 and most["gpu2"] <= 2, most
    jobs = [(await fleet.api.get(f"/jobs/{job_id}")).json() for job_id in job_ids]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    placed = {job["jobId"]: job["backend"] for job in jobs}
    assert set(placed.values()) == {"gpu1", "gpu2"}, placed
    for job_id, backend in placed.items():
        runs = await fleet.runs(job_id)
        assert len(runs[backend]) == 1 and sum(map(len, runs.values())) == 1, runs
    listed = {backend["id"]: backend for backend in (await fleet.api.get("/backends")).json()["backends"]}
    assert set(listed) == {"gpu1", "gpu2"} and listed["gpu2"]["capacity"] == 2 and listed["gpu2"]["healthy"]


@pytest.mark.settings(comfyui_prefetch=0)
async def test_a_backend_killed_mid_job_loses_it_to_the_other_and_is_used_again_once_back(fleet: Fleet) -> None:
    first, second = [await fleet.submit({"workflowJson": fleet.gpu1.slow_prompt(3)}) for _ in range(2)]

    async def both_running() -> dict[str, str] | None:
        jobs = [(await fleet.api.get(f"/jobs/{job_id}")).json() for job_id in (first, second)]
        return {job["backend"]: job["jobId"] for job in jobs} if all(j["status"] == "running" for j in jobs) else None

    placed = await assert_eventually(both_running, timeout=20)
    assert set(placed) == {"gpu1", "gpu2"}, placed
    lost = placed["gpu2"]
    fleet.gpu2.kill()
    job = await wait_for_job(fleet.api, lost, until=DONE, timeout=60)
    assert job["status"] == "succeeded" and job["backend"] == "gpu1" and job["attempts"] == 2, job
    [run] = await comfy_history_for_job(fleet.gpu1.url, lost)  # gpu2, killed, has lost its history
    assert run["status"]["status_str"] == "success" and run["prompt"][3]["gateway_attempt"] == 2
    logs = (await fleet.api.get(f"/jobs/{lost}/logs")).json()["events"]
    assert any(event["kind"] == "retry" and "gpu2 stopped answering" in event["message"] for event in logs), logs

    down = {backend["id"]: backend for backend in (await fleet.api.get("/backends")).json()["backends"]}
    assert down["gpu2"]["healthy"] is False and down["gpu1"]["healthy"] is True
    # gpu1 is kept busy (gpu2 is still down): the next job can only go to gpu2 once the worker finds it answers.
    busy = await fleet.submit({"workflowJson": fleet.gpu1.slow_prompt(3)})
    assert (await wait_for_job(fleet.api, busy, until={"running"}))["backend"] == "gpu1"
    fleet.gpu2.start()  # the same port: ComfyUI back, with an empty queue and history
    again = await wait_for_job(fleet.api, await fleet.submit({"workflowJson": fleet.gpu1.slow_prompt(0.2)}),
                               until=DONE, timeout=30)
    assert again["status"] == "succeeded" and again["backend"] == "gpu2", again
    assert len((await fleet.runs(again["jobId"]))["gpu2"]) == 1


@pytest.mark.settings(comfyui_prefetch=1)
async def test_a_prefetched_prompt_cancelled_is_deleted_from_comfyuis_queue_and_never_runs(fleet: Fleet) -> None:
    tagged = {"workflowJson": fleet.gpu1.slow_prompt(3), "backendTag": "flux"}
    running = await fleet.submit(tagged)
    await wait_for_job(fleet.api, running, until={"running"})
    prefetched = await fleet.submit({**tagged, "workflowJson": fleet.gpu1.slow_prompt(0.2)})

    async def waiting_in_comfyui() -> bool:
        return prefetched in (await comfy_queue(fleet.gpu2.url))[1]

    await assert_eventually(waiting_in_comfyui, timeout=10)
    assert (await fleet.api.post(f"/jobs/{prefetched}/cancel")).json()["status"] == "cancelled"
    assert prefetched not in (await comfy_queue(fleet.gpu2.url))[1]
    assert (await wait_for_job(fleet.api, running, until=DONE))["status"] == "succeeded"
    assert await fleet.runs(prefetched) == {"gpu1": [], "gpu2": []}


async def test_a_tag_of_the_job_or_its_template_routes_it_to_the_backend_that_has_it(fleet: Fleet) -> None:
    job_ids = await asyncio.gather(*(
        fleet.submit({"workflowJson": fleet.gpu1.slow_prompt(0.2), "backendTag": "flux"}) for _ in range(3)))
    jobs = [await wait_for_job(fleet.api, job_id, until=DONE) for job_id in job_ids]
    assert [(job["status"], job["backend"]) for job in jobs] == [("succeeded", "gpu2")] * 3
    template = {"id": "flux_only", "name": "Runs on flux", "workflowJson": fleet.gpu1.slow_prompt(0.2),
                "backendTag": "flux"}
    assert (await fleet.api.post("/workflows", json=template)).status_code == 201
    from_template = await wait_for_job(fleet.api, await fleet.submit({"workflowId": "flux_only"}), until=DONE)
    assert (from_template["status"], from_template["backend"]) == ("succeeded", "gpu2")
    refused = await fleet.api.post("/jobs", json={"workflowJson": fleet.gpu1.slow_prompt(0.2), "backendTag": "sd3"})
    assert refused.status_code == 400
    assert refused.json()["error"]["details"]["fields"][0]["field"] == "backendTag"


@pytest.mark.parametrize("killed", ["once its heartbeat named the backend", "as ComfyUI queued the prompt"])
async def test_a_retry_polled_by_another_backend_goes_back_to_the_prompts_own(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, gpu2: SimulatorProcess, tmp_path: Path,
    killed: str,
) -> None:
    """The worker dies mid-prompt: its lease on the prompt's backend lives on until it expires, so the retry is
    polled by the other backend's worker, which must not post the prompt there. Killed as ComfyUI queues the
    prompt, the worker has most likely not sent the heartbeat that names the backend (heartbeats wait up to a
    second after the one before): the prompt's lease row names it."""
    settings = fleet_settings(temporal_client, task_queue, tmp_path, comfyui, gpu2, comfyui_prefetch=0)
    migrate_database(settings)
    crashing = WorkerProcess(settings)
    crashing.start()
    try:
        async with api_client(settings, temporal_client) as api:
            fleet = Fleet(api, comfyui, gpu2)
            job_id = await fleet.submit({"workflowJson": comfyui.slow_prompt(5)})

            async def followed() -> str | None:  # the heartbeat that names the prompt's backend reached Temporal
                heartbeat = await prompt_heartbeat(temporal_client, job_id)
                return heartbeat.backend if heartbeat is not None and heartbeat.submitted and heartbeat.node else None

            async def queued_on() -> str | None:
                for name in ("gpu1", "gpu2"):
                    running, pending = await comfy_queue(fleet.url(name))
                    if job_id in running + pending:
                        return name
                return None

            if killed == "as ComfyUI queued the prompt":
                backend = await assert_eventually(queued_on, timeout=30, interval=0.01)
            else:
                backend = await assert_eventually(followed, timeout=30)
            crashing.kill()
            async with running_worker(temporal_client, settings):
                job = await wait_for_job(api, job_id, until=DONE, timeout=60)
            assert job["status"] == "succeeded" and job["attempts"] == 1 and job["backend"] == backend, job
            runs = await fleet.runs(job_id)
            assert len(runs[backend]) == 1 and sum(map(len, runs.values())) == 1, runs
            logs = (await api.get(f"/jobs/{job_id}/logs")).json()["events"]
            # Killed as ComfyUI queued the prompt, the worker may not have written its `submitted` line yet.
            submitted = sum(event["kind"] == "submitted" for event in logs)
            assert submitted == 1 or (submitted == 0 and killed == "as ComfyUI queued the prompt"), logs
            assert any(event["kind"] == "placement" for event in logs) and any(
                event["kind"] == "reattached" for event in logs), logs
    finally:
        crashing.stop()


async def test_the_wait_in_comfyuis_queue_behind_another_job_does_not_count_against_the_time_limit(
    fleet: Fleet,
) -> None:
    # gpu2 (the only flux backend) has one slot and one prefetched prompt: the second job's prompt waits in
    # ComfyUI's queue for the first's 2 s, then runs 2 s of its own within its 3 s limit.
    first = await fleet.submit({"workflowJson": fleet.gpu2.slow_prompt(2), "backendTag": "flux"})

    async def first_running() -> bool:
        running, _ = await comfy_queue(fleet.gpu2.url)
        return running == [first]

    await assert_eventually(first_running, timeout=30)
    second = await fleet.submit({"workflowJson": fleet.gpu2.slow_prompt(2), "backendTag": "flux",
                                 "timeoutSeconds": 3})

    async def second_waiting_in_comfyui() -> bool:
        return (await comfy_queue(fleet.gpu2.url)) == ([first], [second])

    await assert_eventually(second_waiting_in_comfyui, timeout=30)
    jobs = [await wait_for_job(fleet.api, job_id, until=DONE, timeout=30) for job_id in (first, second)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], jobs
