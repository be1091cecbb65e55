"""The REST contract: JSON errors with stable codes, listing, health and capabilities."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.harness import DONE, Gateway, error_of, recorded_workflow, wait_for_job


@pytest.mark.parametrize("path", ["/jobs/{id}", "/jobs/{id}/logs", "/outputs/{id}", "/outputs/{id}/a.png"])
async def test_unknown_jobs_are_404(gateway: Gateway, path: str) -> None:
    response = await gateway.api.get(path.format(id=uuid.uuid4()))
    assert response.status_code == 404 and error_of(response)["code"] == "JOB_NOT_FOUND"
    cancel = await gateway.api.post(f"/jobs/{uuid.uuid4()}/cancel", json={"reason": "x"})
    assert cancel.status_code == 404 and error_of(cancel)["code"] == "JOB_NOT_FOUND"


async def test_submit_answers_at_once_and_lists_filter(gateway: Gateway) -> None:
    response = await gateway.api.post("/jobs", json={"workflowId": "solid_color", "inputs": {"width": 64, "height": 64}})
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["pollUrl"] == f"/jobs/{accepted['jobId']}"
    assert set(accepted) == {"jobId", "status", "etaSeconds", "pollUrl", "cacheHit", "temporalUiUrl"}
    template_job = await wait_for_job(gateway.api, accepted["jobId"], until=DONE)
    inline_job = await gateway.run({"workflowJson": recorded_workflow("fail.json")})

    everything = (await gateway.api.get("/jobs")).json()
    assert everything["count"] == 2
    succeeded = (await gateway.api.get("/jobs", params={"status": "succeeded"})).json()
    assert [job["jobId"] for job in succeeded["jobs"]] == [template_job["jobId"]]
    by_template = (await gateway.api.get("/jobs", params={"workflowId": "solid_color"})).json()
    assert by_template["count"] == 1
    failed = (await gateway.api.get("/jobs", params={"status": "failed", "limit": 1})).json()
    assert [job["jobId"] for job in failed["jobs"]] == [inline_job["jobId"]]
    after = (await gateway.api.get("/jobs", params={"after": template_job["timing"]["createdAt"]})).json()
    assert [job["jobId"] for job in after["jobs"]] == [inline_job["jobId"]]
    eta = (await gateway.api.post("/jobs", json={"workflowId": "solid_color"})).json()["etaSeconds"]
    assert eta is not None and eta >= 0


async def test_unknown_output_file_is_404(gateway: Gateway) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow("image.json")})
    response = await gateway.api.get(f"/outputs/{job['jobId']}/nope.png")
    assert response.status_code == 404 and error_of(response)["code"] == "OUTPUT_NOT_FOUND"


async def test_job_log_tells_the_story(gateway: Gateway) -> None:
    prompt = recorded_workflow("image.json")
    prompt["1"]["inputs"]["color"] = uuid.uuid4().int % 0xFFFFFF  # unlike earlier prompts: ComfyUI's cache can't serve it
    job = await gateway.run({"workflowJson": prompt})
    events = (await gateway.api.get(f"/jobs/{job['jobId']}/logs")).json()["events"]
    kinds = [event["kind"] for event in events]
    assert kinds[0] == "status" and "submitted" in kinds and "node" in kinds
    assert events[-1]["data"]["status"] == "succeeded"


async def test_health_capabilities_and_docs(gateway: Gateway) -> None:
    health = (await gateway.api.get("/health")).json()
    assert health["ok"] is True and health["comfyui"] == {"reachable": True, "url": gateway.comfyui.url}
    assert health["temporal"]["reachable"] is True and health["uptime"] >= 0 and health["version"]
    capabilities = (await gateway.api.get("/capabilities")).json()
    assert "solid_color" in capabilities["workflows"]
    assert capabilities["maxSize"] == 2048 and capabilities["maxBatch"] == 4 and capabilities["storageProvider"] == "local"
    assert capabilities["outputFormats"] == ["png", "jpg", "webp"]
    assert (await gateway.api.get("/docs")).status_code == 200
    assert "/jobs" in (await gateway.api.get("/openapi.json")).json()["paths"]


async def _stored_inputs(gateway: Gateway, job_id: str) -> dict:
    from app.db import make_engine, session_scope
    from app.jobstore import get_job

    engine = make_engine(gateway.settings.resolved_database_url)
    with session_scope(engine) as session:
        row = get_job(session, job_id)
        assert row is not None
        return row.inputs


async def test_inputs_are_stored_with_the_job(gateway: Gateway) -> None:
    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 32, "height": 32, "color": 7}})
    # Complete: the template's defaults are stored too, so the values reproduce the job.
    assert await _stored_inputs(gateway, job["jobId"]) == {"width": 32, "height": 32, "color": 7,
                                                           "filename_prefix": "gateway"}


# PRIVACY_MODE needs keys; this fixture's Temporal client has no codec (tests/test_privacy.py runs with one).
@pytest.mark.settings(privacy_mode=True, encryption_keys="test:" + "A" * 43 + "=")
async def test_privacy_mode_keeps_inputs_out_of_stored_records(gateway: Gateway) -> None:
    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 32, "height": 32, "color": 7}})
    assert job["status"] == "succeeded"
    assert await _stored_inputs(gateway, job["jobId"]) == {}
    events = (await gateway.api.get(f"/jobs/{job['jobId']}/logs")).json()["events"]
    # Compare whole values: a substring test would trip over ids that happen to contain "32".
    assert not {32, "32"} & set(_leaf_values([event["data"] for event in events]))


def _leaf_values(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaf_values(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaf_values(item)]
    return [value]


async def test_parallel_submits_never_wait_on_the_database_on_the_event_loop(gateway: Gateway) -> None:
    # More submits at once than the connection pool holds (5 + 10): they once froze the whole API.
    body = {"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}}
    responses = await asyncio.gather(*(gateway.api.post("/jobs", json=body) for _ in range(40)))
    assert [response.status_code for response in responses] == [202] * 40


async def test_a_body_sent_to_a_route_that_takes_none_is_ignored(gateway: Gateway) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await gateway.api.request("GET", "/jobs", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
