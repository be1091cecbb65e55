"""One truth for a job under load: however often clients poll and however the reads interleave with the
workflow's end, a finished job's status never changes and no job is reported terminated that was not."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from temporalio import client as temporal

from tests.harness import (
    DONE,
    ComfyUITarget,
    Gateway,
    api_client,
    gateway_settings,
    migrate_database,
    recorded_workflow,
    wait_for_job,
)
from worker.main import running_worker

JOBS = 50
POLL_SECONDS = 0.01
# Reads of each job after its end, to see that the end stays put.
READS_AFTER_THE_END = 20


@pytest.mark.settings(max_concurrency=4)
async def test_fifty_jobs_polled_every_10_ms_never_change_their_end(gateway: Gateway) -> None:
    job_ids = await asyncio.gather(*(gateway.submit({"workflowJson": recorded_workflow("image.json")})
                                     for _ in range(JOBS)))
    seen: dict[str, list[str]] = {job_id: [] for job_id in job_ids}

    async def poll(job_id: str) -> None:
        after_the_end = 0
        while after_the_end < READS_AFTER_THE_END:
            response = await gateway.api.get(f"/jobs/{job_id}")
            assert response.status_code == 200, response.text
            job = response.json()
            assert job["error"] is None or job["error"]["code"] != "JOB_TERMINATED", job
            seen[job_id].append(job["status"])
            after_the_end += job["status"] in DONE
            await asyncio.sleep(POLL_SECONDS)

    await asyncio.wait_for(asyncio.gather(*(poll(job_id) for job_id in job_ids)), timeout=240)
    for job_id, statuses in seen.items():
        end = statuses.index("succeeded")  # every job ends as it really did
        assert set(statuses[end:]) == {"succeeded"}, (job_id, statuses)
        assert set(statuses[:end]) <= {"queued", "running"}, (job_id, statuses)
    listed = (await gateway.api.get("/jobs", params={"limit": 200})).json()["jobs"]
    assert {job["jobId"]: job["status"] for job in listed} == dict.fromkeys(job_ids, "succeeded")


class SlowReads(temporal.Interceptor):
    """Each describe and query waits before it reaches Temporal, so a read made of both spans the moments
    in which a workflow stores its outputs, records its end and closes."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def intercept_client(self, next: temporal.OutboundInterceptor) -> temporal.OutboundInterceptor:
        delay = self.delay

        class Slow(temporal.OutboundInterceptor):
            async def describe_workflow(self, input: temporal.DescribeWorkflowInput) -> Any:
                await asyncio.sleep(delay)
                return await super().describe_workflow(input)

            async def query_workflow(self, input: temporal.QueryWorkflowInput) -> Any:
                await asyncio.sleep(delay)
                return await super().query_workflow(input)

        return Slow(next)


async def test_reads_that_span_a_jobs_end_never_report_a_false_end(
    temporal_client: temporal.Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue)
    migrate_database(settings)
    slow_client = temporal.Client(**{**temporal_client.config(), "interceptors": [SlowReads(0.15)]})
    async with running_worker(temporal_client, settings), api_client(settings, slow_client) as api:
        job_ids = [(await api.post("/jobs", json={"workflowJson": comfyui.slow_prompt(0.5)})).json()["jobId"]
                   for _ in range(5)]
        jobs = await asyncio.gather(*(wait_for_job(api, job_id, until=DONE, timeout=60) for job_id in job_ids))
    assert [job["status"] for job in jobs] == ["succeeded"] * len(job_ids), jobs
