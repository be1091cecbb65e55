"""The REST contract: JSON errors with stable codes, listing, health and capabilities."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from fastapi import FastAPI
from httpx import ASGITransport

from api.errors import install_error_handlers
from api.plain_json import MAX_BODY_BYTES, BodySizeLimit
from tests.harness import DONE, Gateway, recorded_workflow, wait_for_job


def error_of(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"workflowId": "solid_color", "workflowJson": {"1": {}}}, "body"),
        ({"workflowId": "solid_color", "surprise": 1}, "surprise"),
        ({"workflowId": "solid_color", "inputs": []}, "inputs"),
        ({"workflowId": "solid_color", "retry": {"retryOn": ["NOPE"]}}, "retry.retryOn.0"),
        ({"workflowId": "solid_color", "retry": {"maxAttempts": 0}}, "retry.maxAttempts"),
        ({"workflowId": "solid_color", "timeoutSeconds": -1}, "timeoutSeconds"),
        ({"workflowId": "solid_color", "timeoutSeconds": True}, "timeoutSeconds"),
        ({"workflowId": "solid_color", "retry": {"max_attempts": 3}}, "retry.max_attempts"),
        ({"workflowId": "solid_color", "retry": {"maxAttempts": "3"}}, "retry.maxAttempts"),
        ({"workflowId": "solid_color", "retry": {"retryOn": ["VALIDATION_ERROR"]}}, "retry.retryOn"),
        ({"workflowId": "solid_color", "inputs": {"width": 99999}}, "inputs.width"),
        ({"workflowJson": recorded_workflow("invalid_bad_value.json")}, "workflowJson.1.inputs.width"),
        ({"workflowJson": {"1": {"inputs": {}}}}, "workflowJson.1"),
        ({"workflowJson": {"1": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}}}},
         "workflowJson.1.inputs.images"),
        ({"workflowJson": {"1": {"class_type": "SaveImage", "inputs": {"images": "{{link}}"}}},
          "inputs": {"link": ["99", 0]}}, "workflowJson.1.inputs.images"),
        ({"workflowJson": recorded_workflow("image.template.json"), "inputs": {"width": 8}}, "inputs.color"),
    ],
)
async def test_bad_job_requests_are_400_naming_the_field(gateway: Gateway, body: dict, field: str) -> None:
    response = await gateway.api.post("/jobs", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR"
    assert field in [item["field"] for item in error["details"]["fields"]]
    assert (await gateway.api.get("/jobs")).json()["count"] == 0  # nothing half-written


async def test_malformed_json_is_a_validation_error(gateway: Gateway) -> None:
    response = await gateway.api.post("/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and error_of(response)["code"] == "VALIDATION_ERROR"


async def test_unknown_template_and_unsupported_callback(gateway: Gateway) -> None:
    missing = await gateway.api.post("/jobs", json={"workflowId": "no_such_template"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "WORKFLOW_NOT_FOUND"
    callback = await gateway.api.post("/jobs", json={"workflowId": "solid_color", "callbackUrl": "https://x.test/h"})
    assert callback.status_code == 400 and error_of(callback)["code"] == "UNSUPPORTED_FIELD"


@pytest.mark.parametrize("path", ["/jobs/{id}", "/jobs/{id}/logs", "/outputs/{id}", "/outputs/{id}/a.png", "/jobs/not-a-uuid"])
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
    assert set(accepted) == {"jobId", "status", "etaSeconds", "pollUrl"}
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
    bad = await gateway.api.get("/jobs", params={"status": "bogus", "limit": 500})
    assert bad.status_code == 400
    assert {item["field"] for item in error_of(bad)["details"]["fields"]} == {"status", "limit"}
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


@pytest.mark.settings(privacy_mode=True)
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


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("raw_body", "field", "says"),
    [
        ('{"workflowId": "solid_color", "metadata": {"a": %s}}' % json.dumps(nested(40)), "metadata.a", "nested"),
        ('{"workflowJson": {"1": {"class_type": "X", "inputs": {"v": %s}}}}' % json.dumps(nested(40)),
         "workflowJson.1.inputs.v", "nested"),
        ('{"workflowId": "solid_color", "inputs": {"width": NaN}}', "inputs.width", "NaN"),
        ('{"workflowId": "solid_color", "metadata": {"k": Infinity}}', "metadata.k", "NaN and Infinity"),
        ('{"workflowId": "solid_color", "metadata": {"k": "\\ud800"}}', "metadata.k", "surrogate"),
        ('{"workflowId": "solid_color", "inputs": {"\\udfff": 1}}', "inputs.\\udfff", "surrogate"),
        ('{"workflowId": "solid_color", "inputs": {"width": 8}', "body", "not valid JSON"),
        ("[" * 1500 + "]" * 1500, "body", "not valid JSON"),
    ],
)
async def test_bodies_that_are_not_plain_json_are_refused(
    gateway: Gateway, raw_body: str, field: str, says: str
) -> None:
    """A job nested 200 deep used to be accepted and then could never be decoded by the worker."""
    for path in ("/jobs", "/workflows"):
        response = await gateway.api.post(path, content=raw_body.encode("utf-8", "surrogatepass"),
                                          headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] == "VALIDATION_ERROR"
        [problem] = error["details"]["fields"]
        assert problem["field"].startswith(field) and says in problem["message"], problem
    assert (await gateway.api.get("/jobs")).json()["count"] == 0


async def test_undecodable_and_oversized_bodies(gateway: Gateway) -> None:
    undecodable = await gateway.api.post("/jobs", content=b'{"workflowId": "\xff"}',
                                         headers={"content-type": "application/json"})
    assert undecodable.status_code == 400 and error_of(undecodable)["details"]["fields"][0]["field"] == "body"
    declared = await gateway.api.post("/jobs", content=b"{}", headers={
        "content-type": "application/json", "content-length": str(MAX_BODY_BYTES + 1)})
    assert declared.status_code == 413 and error_of(declared)["code"] == "REQUEST_TOO_LARGE"
    huge_offset = await gateway.api.get("/jobs", params={"offset": 10**20})
    assert huge_offset.status_code == 400 and error_of(huge_offset)["details"]["fields"][0]["field"] == "offset"


async def test_a_body_streamed_past_the_limit_is_refused() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: dict) -> dict:  # type: ignore[type-arg]
        return body

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b" " * 10  # no content-length: the limit has to count
    async with httpx.AsyncClient(transport=ASGITransport(app=BodySizeLimit(app, max_bytes=50)),
                                 base_url="http://test") as client:
        small = await client.post("/echo", json={"a": 1})
        assert small.status_code == 200
        response = await client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "REQUEST_TOO_LARGE"


async def test_parallel_submits_never_wait_on_the_database_on_the_event_loop(gateway: Gateway) -> None:
    # More submits at once than the connection pool holds (5 + 10): they once froze the whole API.
    body = {"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}}
    responses = await asyncio.gather(*(gateway.api.post("/jobs", json=body) for _ in range(40)))
    assert [response.status_code for response in responses] == [202] * 40


async def test_a_body_sent_to_a_route_that_takes_none_is_ignored(gateway: Gateway) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await gateway.api.request("GET", "/jobs", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


async def test_unknown_paths_and_methods_answer_json(gateway: Gateway) -> None:
    trailing = await gateway.api.post("/jobs/", json={"workflowId": "solid_color"})
    assert trailing.status_code == 404 and error_of(trailing)["code"] == "NOT_FOUND"
    wrong_method = await gateway.api.delete("/jobs")
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "METHOD_NOT_ALLOWED"
