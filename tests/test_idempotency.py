"""Idempotent submission end to end: a key (Idempotency-Key, or metadata.requestId) names one job, which
runs once however often and however concurrently it is submitted; another body under the key is a 409."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from sqlalchemy import delete
from sqlmodel import col
from temporalio.client import Client

from api.deps import get_principal
from app.auth import Principal, Role
from app.db import make_engine
from app.idempotency import idempotent_job_id
from app.tables import JobRow
from tests.harness import DONE, Gateway, api_client, assert_eventually, comfy_history_for_job, error_of, wait_for_job

SOLID = {"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}}


async def post(api: httpx.AsyncClient, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return await api.post("/jobs", json=body, headers={"Idempotency-Key": key} if key is not None else {})


async def workflow_runs(temporal: Client, job_id: str) -> int:
    return len([run async for run in temporal.list_workflows(f"WorkflowId = '{job_id}'")])


async def test_twenty_concurrent_duplicates_make_one_job_one_workflow_and_one_prompt(
    gateway: Gateway, temporal_client: Client
) -> None:
    answers = await asyncio.gather(*(post(gateway.api, SOLID, "order-20") for _ in range(20)))
    assert {answer.status_code for answer in answers} == {202}, [answer.text for answer in answers]
    [job_id] = {answer.json()["jobId"] for answer in answers}
    assert job_id == idempotent_job_id("anonymous", "order-20")
    job = await wait_for_job(gateway.api, job_id, until=DONE)
    assert job["status"] == "succeeded", job

    await assert_eventually(lambda: workflow_runs(temporal_client, job_id), what="the job in Temporal's visibility")
    assert await workflow_runs(temporal_client, job_id) == 1
    assert len(await comfy_history_for_job(gateway.comfyui.url, job_id)) == 1

    # After the job finished, the key still names it: the answer is the job as it is, nothing runs again.
    late = await post(gateway.api, SOLID, "order-20")
    assert late.status_code == 202 and late.json()["jobId"] == job_id and late.json()["status"] == "succeeded"
    assert await workflow_runs(temporal_client, job_id) == 1
    assert len(await comfy_history_for_job(gateway.comfyui.url, job_id)) == 1

    # Its row gone (deleted by hand here), the closed workflow still holds the key: Temporal refuses a new run.
    engine = make_engine(gateway.settings.resolved_database_url)
    with engine.begin() as connection:
        connection.execute(delete(JobRow).where(col(JobRow.job_id) == job_id))
    engine.dispose()
    rowless = await post(gateway.api, SOLID, "order-20")
    assert rowless.status_code == 202 and rowless.json()["jobId"] == job_id and rowless.json()["status"] == "succeeded"
    assert await workflow_runs(temporal_client, job_id) == 1
    assert len(await comfy_history_for_job(gateway.comfyui.url, job_id)) == 1


async def test_a_key_reused_with_another_body_is_a_conflict_even_when_both_race(gateway: Gateway) -> None:
    other = {**SOLID, "inputs": {"width": 16, "height": 8}}
    answers = await asyncio.gather(*(post(gateway.api, body, "reused") for body in [SOLID, other] * 4))
    accepted = [answer for answer in answers if answer.status_code == 202]
    refused = [answer for answer in answers if answer.status_code != 202]
    # Whichever body started the job first owns the key; every request with the other body is refused.
    assert len(accepted) == 4 and len(refused) == 4, [answer.text for answer in answers]
    [job_id] = {answer.json()["jobId"] for answer in accepted}
    for answer in refused:
        assert answer.status_code == 409
        assert error_of(answer)["code"] == "IDEMPOTENCY_CONFLICT" and error_of(answer)["details"] == {"jobId": job_id}

    await wait_for_job(gateway.api, job_id, until=DONE)
    loser = other if json.loads(accepted[0].request.content) == SOLID else SOLID
    after = await post(gateway.api, loser, "reused")  # answered from the job's row, after it finished
    assert after.status_code == 409 and error_of(after)["code"] == "IDEMPOTENCY_CONFLICT"


async def test_metadata_request_id_is_the_key_when_there_is_no_header(gateway: Gateway) -> None:
    body = {**SOLID, "metadata": {"requestId": "n8n-run-7"}}
    first = (await post(gateway.api, body)).json()
    again = (await post(gateway.api, body)).json()
    by_header = (await post(gateway.api, body, "n8n-run-7")).json()
    assert first["jobId"] == again["jobId"] == by_header["jobId"] == idempotent_job_id("anonymous", "n8n-run-7")
    await wait_for_job(gateway.api, first["jobId"], until=DONE)
    assert len(await comfy_history_for_job(gateway.comfyui.url, first["jobId"])) == 1

    refused = await post(gateway.api, {**SOLID, "metadata": {"requestId": 7}})
    assert refused.status_code == 400 and error_of(refused)["details"]["fields"][0]["field"] == "metadata.requestId"
    for bad_key in ("", "k" * 256):
        refused = await post(gateway.api, SOLID, bad_key)
        assert refused.status_code == 400 and error_of(refused)["details"]["fields"][0]["field"] == "Idempotency-Key"


async def test_keys_are_scoped_to_the_caller(gateway: Gateway, temporal_client: Client) -> None:
    async with (
        api_client(gateway.settings, temporal_client, {get_principal: lambda: Principal("alice", Role.user)}) as alice,
        api_client(gateway.settings, temporal_client, {get_principal: lambda: Principal("bob", Role.user)}) as bob,
    ):
        ids = [(await post(api, SOLID, "same-key")).json()["jobId"] for api in (alice, bob, gateway.api)]
    assert len(set(ids)) == 3
    assert ids[:2] == [idempotent_job_id("alice", "same-key"), idempotent_job_id("bob", "same-key")]
    for job_id in ids:
        assert (await wait_for_job(gateway.api, job_id, until=DONE))["status"] == "succeeded"

