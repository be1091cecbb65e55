"""Cancelling a job at each stage: running on ComfyUI, queued in ComfyUI, waiting for a gateway slot."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from app.models import prompt_id_for
from tests.harness import (
    DONE,
    Gateway,
    assert_eventually,
    comfy_history_for_job,
    reset_job,
    wait_for_job,
)
from worker.reconciler import RECONCILE_EVERY_SECONDS


async def comfy_queue(gateway: Gateway) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{gateway.comfyui.url}/queue")).json()


def queued_job_ids(queue: dict) -> set[str]:
    items = queue["queue_running"] + queue["queue_pending"]
    return {item[3].get("gateway_job_id") for item in items}


async def in_comfyui_queue(gateway: Gateway, job_id: str) -> bool:
    return job_id in queued_job_ids(await comfy_queue(gateway))


async def workflow_status_is(handle: WorkflowHandle, status: WorkflowExecutionStatus) -> bool:
    return (await handle.describe()).status is status


async def listed_as_cancelled(gateway: Gateway, job_id: str) -> bool:
    listed = (await gateway.api.get("/jobs", params={"status": "cancelled"})).json()["jobs"]
    return job_id in {job["jobId"] for job in listed}


async def test_cancel_while_running_interrupts_the_prompt(gateway: Gateway, temporal_client: Client) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    surprise = await gateway.api.post(f"/jobs/{job_id}/cancel", json={"reason": "x", "surprise": 1})
    assert surprise.status_code == 400 and surprise.json()["error"]["details"]["fields"][0]["field"] == "surprise"
    response = await gateway.api.post(f"/jobs/{job_id}/cancel", json={"reason": "user left"})
    assert response.status_code == 200, response.text
    assert response.json() == {"jobId": job_id, "status": "cancelled", "message": "job cancelled"}
    job = (await gateway.api.get(f"/jobs/{job_id}")).json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "JOB_CANCELLED"
    assert job["error"]["message"] == "cancelled by anonymous: user left"
    [run] = await comfy_history_for_job(gateway.comfyui.url, job_id)
    assert run["status"]["messages"][-1][0] == "execution_interrupted"
    # The Web UI shows it as Canceled, with nothing left pending, and its row (what every reader reads) agrees.
    described = await temporal_client.get_workflow_handle(job_id).describe()
    assert described.status is WorkflowExecutionStatus.CANCELED
    assert not described.raw_description.pending_activities
    listed = (await gateway.api.get("/jobs", params={"status": "cancelled"})).json()["jobs"]
    assert [(listed_job["jobId"], listed_job["error"]) for listed_job in listed] == [(job_id, job["error"])]
    again = await gateway.api.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "JOB_ALREADY_FINISHED"


async def test_cancel_while_queued_in_comfyui_deletes_it_from_the_queue(gateway: Gateway) -> None:
    # Someone else's long prompt holds ComfyUI, so the job's prompt waits in ComfyUI's own queue.
    async with httpx.AsyncClient() as client:
        blocker = str(uuid.uuid4())
        posted = await client.post(f"{gateway.comfyui.url}/prompt",
                                   json={"prompt": gateway.comfyui.slow_prompt(10), "client_id": "other", "prompt_id": blocker})
        assert posted.status_code == 200
        try:
            job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(0.1)})
            await assert_eventually(lambda: in_comfyui_queue(gateway, job_id), timeout=10)
            job = (await gateway.api.get(f"/jobs/{job_id}")).json()
            assert job["status"] == "queued" and job["queuePosition"] in (1, None)
            response = await gateway.api.post(f"/jobs/{job_id}/cancel")
            assert response.json()["status"] == "cancelled"
            assert job_id not in queued_job_ids(await comfy_queue(gateway))
        finally:
            await client.post(f"{gateway.comfyui.url}/interrupt", json={"prompt_id": blocker})
    # A deleted pending prompt never runs, so ComfyUI keeps no history of it.
    assert await comfy_history_for_job(gateway.comfyui.url, job_id) == []


@pytest.mark.settings(comfyui_prefetch=0)
async def test_cancel_while_waiting_for_a_slot_never_reaches_comfyui(gateway: Gateway) -> None:
    # MAX_CONCURRENCY is 1 and nothing is prefetched: the second job waits in Temporal, not in ComfyUI.
    first = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, first, until={"running"})
    second = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(0.1)})
    assert second not in queued_job_ids(await comfy_queue(gateway))
    assert (await gateway.api.post(f"/jobs/{second}/cancel")).json()["status"] == "cancelled"
    assert (await gateway.api.post(f"/jobs/{first}/cancel")).json()["status"] == "cancelled"
    assert await comfy_history_for_job(gateway.comfyui.url, second) == []
    logs = (await gateway.api.get(f"/jobs/{second}/logs")).json()["events"]
    assert not any(event["kind"] == "submitted" for event in logs), logs


async def test_cancel_from_temporal_takes_the_same_path(gateway: Gateway, temporal_client: Client) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    await temporal_client.get_workflow_handle(job_id).cancel(reason="the GPU is needed elsewhere")
    job = await wait_for_job(gateway.api, job_id, until=DONE)
    # The operator's reason (the Web UI's and the CLI's cancel take one) is the job's.
    assert job["status"] == "cancelled" and job["error"]["message"] == "cancelled by temporal: the GPU is needed elsewhere"
    handle = temporal_client.get_workflow_handle(job_id)
    # The row is written before the workflow ends: Canceled follows.
    await assert_eventually(
        lambda: workflow_status_is(handle, WorkflowExecutionStatus.CANCELED), timeout=5, what="the workflow's end")
    [run] = await comfy_history_for_job(gateway.comfyui.url, job_id)
    assert run["status"]["messages"][-1][0] == "execution_interrupted"


@pytest.mark.settings(comfyui_heartbeat_timeout_s=60)  # the production default: heartbeats are not throttled to it
async def test_terminate_from_temporal_ends_the_job_and_stops_the_prompt(
    gateway: Gateway, temporal_client: Client
) -> None:
    """Terminate gives the workflow no chance to clean up: the prompt activity stops the prompt when its
    heartbeat finds the workflow gone, and the worker's reconciler closes the job's row, without anyone
    reading the job."""
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    await temporal_client.get_workflow_handle(job_id).terminate(reason="stuck, says the operator")

    await assert_eventually(lambda: listed_as_cancelled(gateway, job_id), timeout=10)
    job = (await gateway.api.get(f"/jobs/{job_id}")).json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "JOB_TERMINATED"
    assert job["error"]["message"] == "terminated in Temporal: stuck, says the operator"
    assert job["timing"]["completedAt"] is not None
    logs = (await gateway.api.get(f"/jobs/{job_id}/logs")).json()["events"]
    assert logs[-1]["data"]["error"]["code"] == "JOB_TERMINATED"
    again = await gateway.api.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "JOB_ALREADY_FINISHED"

    # The activity learns of it at its next heartbeat.
    [run] = await assert_eventually(lambda: comfy_history_for_job(gateway.comfyui.url, job_id), timeout=10)
    assert run["status"]["messages"][-1][0] == "execution_interrupted"


async def test_a_reset_job_goes_on_in_its_new_run_and_its_row_is_not_closed(
    gateway: Gateway, temporal_client: Client
) -> None:
    """A reset terminates the run it starts from, but the job goes on in the new run: the reconciler must
    not take the terminated run for the job's end."""
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(8)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    await reset_job(temporal_client, job_id)
    await asyncio.sleep(2.5 * RECONCILE_EVERY_SECONDS)  # the reconciler sees the terminated run while the job runs
    job = await wait_for_job(gateway.api, job_id, until=DONE, timeout=60)
    assert job["status"] == "succeeded", job["error"]
    logs = (await gateway.api.get(f"/jobs/{job_id}/logs")).json()["events"]
    assert not [event for event in logs if event["data"].get("status") == "cancelled"], logs
    # The new run's prompt has an id of its own (with a slot prefetched it is posted while the old run's still
    # runs); the old run's activity, finding its workflow gone, stopped only its own.
    runs = {entry["prompt"][1]: entry["status"]["status_str"]
            for entry in await comfy_history_for_job(gateway.comfyui.url, job_id)}
    assert list(runs.values()).count("success") == 1, runs
    assert runs.get(prompt_id_for(job_id, 1)) in (None, "error"), runs
