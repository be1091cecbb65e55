"""Priorities and fairness end to end, on one ComfyUI slot with nothing prefetched: while a job holds the slot
the others wait in Temporal, and the order they then start in is Temporal's dispatch order (the dev server's
matcher with priority and fairness, app.devserver)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from tests.harness import DONE, Gateway, assert_eventually, wait_for_job
from tests.test_auth import ADMIN_KEY, ALICE_KEY, API_KEYS, BOB_KEY

ONE_SLOT = {"max_concurrency": 1, "comfyui_prefetch": 0}


def _prompt(gateway: Gateway, seconds: float) -> dict[str, Any]:
    return {"workflowJson": gateway.comfyui.slow_prompt(seconds)}


async def _start_order(gateway: Gateway, job_ids: list[str]) -> list[str]:
    """The jobs, once all have ended, in the order ComfyUI started them."""
    jobs = [await wait_for_job(gateway.api, job_id, until=DONE, timeout=60) for job_id in job_ids]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    return [job["jobId"] for job in sorted(jobs, key=lambda job: datetime.fromisoformat(job["timing"]["startedAt"]))]


async def _hold_the_slot(gateway: Gateway, seconds: float = 60) -> str:
    blocker = await gateway.submit(_prompt(gateway, seconds))
    await wait_for_job(gateway.api, blocker, until={"running"})
    return blocker


async def _free_the_slot(gateway: Gateway, temporal: Client, blocker: str, waiting: list[str]) -> None:
    """Cancel the blocker once every waiting job's prompt waits in Temporal for the slot: however slowly the
    jobs were submitted, the slot frees up only when all of them are in line."""
    async def in_line() -> bool:
        for job_id in waiting:
            description = await temporal.get_workflow_handle(job_id).describe()
            pending = [activity.activity_type.name for activity in description.raw_description.pending_activities]
            assert pending == ["run_prompt"], (job_id, pending)
        return True

    await assert_eventually(in_line, timeout=20, what="every job waiting for the slot")
    cancelled = await gateway.api.post(f"/jobs/{blocker}/cancel")
    assert cancelled.json()["status"] == "cancelled", cancelled.text


@pytest.mark.settings(**ONE_SLOT)
async def test_waiting_jobs_start_by_priority_then_in_the_order_they_came(
    gateway: Gateway, temporal_client: Client
) -> None:
    blocker = await _hold_the_slot(gateway)
    submitted = {}
    for name, priority in (("low", "low"), ("normal-1", "normal"), ("high", "high"), ("normal-2", 3), ("two", 2)):
        submitted[name] = await gateway.submit({**_prompt(gateway, 0.2), "priority": priority})
    await _free_the_slot(gateway, temporal_client, blocker, list(submitted.values()))
    order = await _start_order(gateway, list(submitted.values()))
    names = {job_id: name for name, job_id in submitted.items()}
    assert [names[job_id] for job_id in order] == ["high", "two", "normal-1", "normal-2", "low"]


@pytest.mark.settings(api_keys=API_KEYS, **ONE_SLOT)
async def test_one_owner_s_flood_does_not_starve_another_at_the_same_priority(
    gateway: Gateway, temporal_client: Client
) -> None:
    gateway.api.headers["X-API-Key"] = ALICE_KEY
    blocker = await _hold_the_slot(gateway)
    alices = [await gateway.submit(_prompt(gateway, 0.2)) for _ in range(4)]
    gateway.api.headers["X-API-Key"] = BOB_KEY
    bobs = [await gateway.submit(_prompt(gateway, 0.2)) for _ in range(2)]
    gateway.api.headers["X-API-Key"] = ADMIN_KEY  # who reads (and cancels) every job
    await _free_the_slot(gateway, temporal_client, blocker, [*alices, *bobs])
    order = await _start_order(gateway, [*alices, *bobs])
    owners = ["alice" if job_id in alices else "bob" for job_id in order]
    # First come, first served would run all four of alice's first; shared fairly, they take turns.
    assert owners == ["alice", "bob", "alice", "bob", "alice", "alice"], owners


@pytest.mark.settings(**ONE_SLOT)
async def test_a_waiting_job_knows_its_place_and_when_it_should_be_done(gateway: Gateway) -> None:
    timed = await gateway.run(_prompt(gateway, 1.0))  # what the estimates time this graph's jobs by
    run_time = timed["timing"]["executionTimeMs"] / 1000
    blocker = await _hold_the_slot(gateway, 3.0)
    running = (await gateway.api.get(f"/jobs/{blocker}")).json()
    assert running["queuePosition"] == 0 and 0 <= running["etaSeconds"] <= run_time, running
    first = await gateway.submit(_prompt(gateway, 1.0))

    async def listed() -> bool:
        # Its workflow records its row a moment after the 202: from then on, later jobs count it.
        return first in {job["jobId"] for job in (await gateway.api.get("/jobs?status=queued")).json()["jobs"]}

    await assert_eventually(listed, timeout=10, what="the first job's row")
    accepted = (await gateway.api.post("/jobs", json=_prompt(gateway, 1.0))).json()
    second = accepted["jobId"]

    async def behind_the_blocker_and_the_first() -> dict[str, Any]:
        job = (await gateway.api.get(f"/jobs/{second}")).json()
        assert job["status"] == "queued" and job["queuePosition"] == 2, job
        return job

    job = await assert_eventually(behind_the_blocker_and_the_first, timeout=10, what="the second's place")
    # What the blocker has left (at most one run), the first's run, then its own.
    for eta in (job["etaSeconds"], accepted["etaSeconds"]):
        assert 2 * run_time <= eta <= 3 * run_time, (eta, run_time)
    await _start_order(gateway, [blocker, first, second])
    done = (await gateway.api.get(f"/jobs/{second}")).json()
    assert (done["queuePosition"], done["etaSeconds"]) == (None, None), done


@pytest.mark.settings(max_concurrency=1, comfyui_prefetch=1)
async def test_a_prompt_already_in_comfyui_s_queue_keeps_its_place(gateway: Gateway, temporal_client: Client) -> None:
    blocker = await _hold_the_slot(gateway)
    prefetched = await gateway.submit({**_prompt(gateway, 0.2), "priority": "low"})

    async def in_comfyui_s_queue() -> bool:
        async with httpx.AsyncClient() as client:
            pending = (await client.get(f"{gateway.comfyui.url}/queue")).json()["queue_pending"]
        return any(entry[3].get("gateway_job_id") == prefetched for entry in pending)

    await assert_eventually(in_comfyui_s_queue, timeout=10, what="the low job prefetched")
    urgent = await gateway.submit({**_prompt(gateway, 0.2), "priority": "high"})
    await _free_the_slot(gateway, temporal_client, blocker, [prefetched, urgent])
    assert await _start_order(gateway, [urgent, prefetched]) == [prefetched, urgent]
