"""`wait=` on POST /jobs and GET /jobs/{id}: the answer comes when the job ends (its workflow's close, long-polled
from Temporal), or when the wait runs out; the requests waiting on one job share one long poll."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import TimeoutError as PoolTimeout
from temporalio.client import Client

from api.database import Database
from api.deps import get_database
from app.db import make_engine
from app.jobstore import get_job_snapshot
from app.queue_estimates import estimate
from tests.harness import DONE, Gateway, api_client, assert_eventually, error_of, recorded_workflow, wait_for_job
from tests.test_auth import ADMIN, ALICE_KEY, API_KEYS, BOB

T = TypeVar("T")


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def long_polls() -> float:
    return metric("gateway_job_wait_polls_total")


def unique_image() -> dict[str, Any]:
    """image.json in a colour of its own: ComfyUI's cache cannot serve it, and it is not an earlier job's."""
    prompt = recorded_workflow("image.json")
    prompt["1"]["inputs"]["color"] = uuid.uuid4().int % 0xFFFFFF
    return {"workflowJson": prompt}


async def test_a_post_that_waits_answers_200_with_the_job_once_it_has_succeeded(gateway: Gateway) -> None:
    waiting = asyncio.create_task(
        gateway.api.post("/jobs", params={"wait": 30}, json={"workflowJson": gateway.comfyui.slow_prompt(1.5)}))
    [listed] = (await assert_eventually(lambda: _listed(gateway), timeout=10, what="the job listed"))
    running = await wait_for_job(gateway.api, listed["jobId"], until={"running"})
    assert not waiting.done()  # still waiting while the job runs
    answer = await waiting
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["jobId"] == running["jobId"] and job["status"] == "succeeded" and job["progress"] == 100
    assert job["timing"]["completedAt"] is not None and len(job["outputs"]) == 1
    assert job == (await gateway.api.get(f"/jobs/{job['jobId']}")).json()  # exactly what GET says


async def _listed(gateway: Gateway) -> list[dict[str, Any]]:
    jobs = (await gateway.api.get("/jobs")).json()["jobs"]
    assert jobs
    return jobs


async def test_a_wait_that_runs_out_answers_as_without_wait(gateway: Gateway) -> None:
    answer = await gateway.api.post("/jobs", params={"wait": 0.5}, json={"workflowJson": gateway.comfyui.slow_prompt(20)})
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert set(accepted) == {"jobId", "status", "etaSeconds", "pollUrl", "cacheHit", "temporalUiUrl"}
    assert accepted["status"] in ("queued", "running")
    job_id = accepted["jobId"]
    await wait_for_job(gateway.api, job_id, until={"running"})
    read = await gateway.api.get(f"/jobs/{job_id}", params={"wait": 0.5})
    assert read.status_code == 200 and read.json()["status"] == "running", read.text
    at_once = await gateway.api.get(f"/jobs/{job_id}", params={"wait": 0})
    assert at_once.status_code == 200 and at_once.json()["status"] == "running"

    # A cancel while a read waits: the wait answers with the job cancelled.
    waiting = asyncio.create_task(gateway.api.get(f"/jobs/{job_id}", params={"wait": 30}))
    await assert_eventually(lambda: metric("gateway_job_waits") >= 1, timeout=10, what="the read waiting")
    cancel = await gateway.api.post(f"/jobs/{job_id}/cancel", json={"reason": "enough"})
    assert cancel.status_code == 200, cancel.text
    cancelled = await waiting
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert cancelled.json()["error"]["code"] == "JOB_CANCELLED"


async def test_a_failed_job_answers_failed(gateway: Gateway) -> None:
    answer = await gateway.api.post("/jobs", params={"wait": 30}, json={"workflowJson": recorded_workflow("fail.json")})
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_OOM"
    again = await gateway.api.get(f"/jobs/{job['jobId']}", params={"wait": 30})  # ended: answered at once
    assert again.status_code == 200 and again.json() == job


async def test_many_requests_waiting_on_one_job_share_one_long_poll(gateway: Gateway) -> None:
    polls = long_polls()
    key = f"wait-{uuid.uuid4()}"
    body = {"workflowJson": gateway.comfyui.slow_prompt(2)}
    submissions = [asyncio.create_task(gateway.api.post("/jobs", params={"wait": 30}, json=body,
                                                        headers={"Idempotency-Key": key}))
                   for _ in range(3)]
    [listed] = await assert_eventually(lambda: _listed(gateway), timeout=10, what="the job listed")
    reads = [asyncio.create_task(gateway.api.get(f"/jobs/{listed['jobId']}", params={"wait": 30})) for _ in range(20)]
    answers = await asyncio.gather(*submissions, *reads)
    assert {(answer.status_code, answer.json()["status"], answer.json()["jobId"]) for answer in answers} == {
        (200, "succeeded", listed["jobId"])}
    assert long_polls() == polls + 1
    assert metric("gateway_job_wait_polls_open") == 0 and metric("gateway_job_waits") == 0

    # A repeat of the key after the job ended answers at once, with no poll.
    repeat = await gateway.api.post("/jobs", params={"wait": 30}, json=body, headers={"Idempotency-Key": key})
    assert repeat.status_code == 200 and repeat.json() == answers[0].json()
    assert long_polls() == polls + 1


async def test_a_client_that_goes_away_leaves_no_poll_behind(gateway: Gateway) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(20)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    waiting = [asyncio.create_task(gateway.api.get(f"/jobs/{job_id}", params={"wait": 30})) for _ in range(3)]
    await assert_eventually(lambda: metric("gateway_job_waits") == 3, timeout=10, what="three reads waiting")
    assert metric("gateway_job_wait_polls_open") == 1
    for request in waiting:
        request.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert metric("gateway_job_waits") == 0
    await assert_eventually(lambda: metric("gateway_job_wait_polls_open") == 0, timeout=5, what="the poll closed")
    await gateway.api.post(f"/jobs/{job_id}/cancel")


@pytest.mark.settings(cache_enabled=True)
async def test_a_cached_result_answers_200_at_once(gateway: Gateway) -> None:
    body = unique_image()
    ran = await gateway.api.post("/jobs", params={"wait": 30}, json=body)
    assert ran.status_code == 200 and ran.json()["status"] == "succeeded" and ran.json()["cacheHit"] is False
    hit = await gateway.api.post("/jobs", params={"wait": 30}, json=body)
    assert hit.status_code == 200, hit.text
    assert hit.json()["status"] == "succeeded" and hit.json()["cacheHit"] is True
    assert hit.json()["jobId"] != ran.json()["jobId"]
    assert [o["sha256"] for o in hit.json()["outputs"]] == [o["sha256"] for o in ran.json()["outputs"]]


@pytest.mark.settings(max_wait_seconds=10)
async def test_a_wait_that_is_no_number_of_seconds_within_the_limit_is_400(gateway: Gateway) -> None:
    job = await gateway.submit(unique_image())
    for wait in ["-1", "10.5", "abc", "", "nan", "inf", "1e400", "true", "0x10"]:
        for answer in (await gateway.api.post("/jobs", params={"wait": wait}, json=unique_image()),
                       await gateway.api.get(f"/jobs/{job}", params={"wait": wait})):
            assert answer.status_code == 400, (wait, answer.text)
            error = error_of(answer)
            assert error["code"] == "VALIDATION_ERROR", (wait, error)
            assert [field["field"] for field in error["details"]["fields"]] == ["wait"], (wait, error)
    assert (await gateway.api.get("/jobs")).json()["count"] == 1  # the refused submissions created nothing
    await wait_for_job(gateway.api, job, until=DONE)


@pytest.mark.settings(api_max_concurrent_waits=2)
async def test_waits_beyond_the_limit_are_refused_before_anything_is_created(gateway: Gateway) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(20)})
    waiting = [asyncio.create_task(gateway.api.get(f"/jobs/{job_id}", params={"wait": 30})) for _ in range(2)]
    await assert_eventually(lambda: metric("gateway_job_waits") == 2, timeout=10, what="two reads waiting")
    for refused in (await gateway.api.get(f"/jobs/{job_id}", params={"wait": 30}),
                    await gateway.api.post("/jobs", params={"wait": 30}, json=unique_image())):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert error_of(refused)["code"] == "TOO_MANY_WAITS"
    assert (await gateway.api.get("/jobs")).json()["count"] == 1
    assert (await gateway.api.get(f"/jobs/{job_id}")).status_code == 200  # without wait, as ever
    await gateway.api.post(f"/jobs/{job_id}/cancel")
    assert {(await request).json()["status"] for request in waiting} == {"cancelled"}


@pytest.mark.settings(api_keys=API_KEYS)
async def test_only_who_may_read_a_job_may_wait_on_it(gateway: Gateway) -> None:
    api = gateway.api
    api.headers["X-API-Key"] = ALICE_KEY  # every request is alice's unless it says otherwise
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(1.5)})
    polls = long_polls()
    refused = await api.get(f"/jobs/{job_id}", params={"wait": 30}, headers=BOB)
    assert refused.status_code == 404 and error_of(refused)["code"] == "JOB_NOT_FOUND"
    assert long_polls() == polls  # refused before any wait
    answers = await asyncio.gather(api.get(f"/jobs/{job_id}", params={"wait": 30}),
                                   api.get(f"/jobs/{job_id}", params={"wait": 30}, headers=ADMIN))
    assert [(answer.status_code, answer.json()["status"]) for answer in answers] == [(200, "succeeded")] * 2


@dataclass(frozen=True)
class _DatabaseAwayAfterTheStart(Database):
    """The route's database, which cannot answer the reads a submission makes once its workflow has started:
    its ETA, and its row after a wait."""

    async def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if work in (estimate, get_job_snapshot):
            raise PoolTimeout("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00")
        return await super().run(work, *args, **kwargs)


async def test_a_database_away_once_the_workflow_started_costs_the_eta_never_the_jobs_202(
    gateway: Gateway, temporal_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 there would have the client send the job again, and run it twice."""
    away = _DatabaseAwayAfterTheStart(make_engine(gateway.settings.resolved_database_url))
    async with api_client(gateway.settings, temporal_client, {get_database: lambda: away}) as api:
        with caplog.at_level(logging.WARNING, logger="api.routes.jobs"):
            plain = await api.post("/jobs", json=unique_image())
            waited = await api.post("/jobs", params={"wait": 0.01}, json={"workflowJson": gateway.comfyui.slow_prompt(1)})
    for answer in (plain, waited):
        assert answer.status_code == 202, answer.text
        assert answer.json()["etaSeconds"] is None
    assert sum("the job is accepted without it" in record.getMessage() for record in caplog.records) == 3
    jobs = [await wait_for_job(gateway.api, answer.json()["jobId"], until=DONE) for answer in (plain, waited)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    assert (await gateway.api.get("/jobs")).json()["count"] == 2
    away.engine.dispose()
