"""Requests the API refuses before a job exists, on the API alone: a migrated SQLite database, no worker, a
ComfyUI where nothing listens, and a Temporal any use of which fails the test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from httpx import ASGITransport

from api import plain_json as plain_json_module
from api.errors import ApiError, install_error_handlers
from api.json_body import JsonBodyRoute
from api.main import create_app
from api.plain_json import MAX_BODY_BYTES, MAX_VALUES, BodySizeLimit, plain_json
from api.routes import health, jobs, outputs, workflows
from app.templates.store import BUNDLED_TEMPLATES_DIR
from tests.harness import api_alone, api_alone_settings, asgi_client, error_of, migrate_database, recorded_workflow
from tests.template_bodies import SCHEMA, registration, with_field

BUNDLED = {path.stem for path in BUNDLED_TEMPLATES_DIR.glob("*.json")}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_alone(api_alone_settings(tmp_path)) as app, asgi_client(app) as client:
        yield client


async def register(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/workflows", json=body)
    assert response.status_code == 201, response.text
    return response.json()


# --- jobs ------------------------------------------------------------------------------------------------


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
        ({"workflowId": "solid_color", "outputFormat": "gif"}, "outputFormat"),
        ({"workflowId": "solid_color", "outputFormat": "JPG"}, "outputFormat"),
        ({"workflowId": "solid_color", "output_format": "jpg"}, "output_format"),
        ({"workflowId": "solid_color", "quality": 0}, "quality"),
        ({"workflowId": "solid_color", "quality": 101}, "quality"),
        ({"workflowId": "solid_color", "quality": "90"}, "quality"),
        ({"workflowId": "solid_color", "quality": 90.5}, "quality"),
        ({"workflowId": "solid_color", "retry": {"max_attempts": 3}}, "retry.max_attempts"),
        ({"workflowId": "solid_color", "retry": {"maxAttempts": "3"}}, "retry.maxAttempts"),
        ({"workflowId": "solid_color", "retry": {"retryOn": ["VALIDATION_ERROR"]}}, "retry.retryOn"),
        ({"workflowId": "solid_color", "priority": "urgent"}, "priority"),
        ({"workflowId": "solid_color", "priority": 0}, "priority"),
        ({"workflowId": "solid_color", "priority": 6}, "priority"),
        ({"workflowId": "solid_color", "priority": True}, "priority"),
        ({"workflowId": "solid_color", "priority": "2"}, "priority"),
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
async def test_bad_job_requests_are_400_naming_the_field(api: httpx.AsyncClient, body: dict, field: str) -> None:
    response = await api.post("/jobs", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR"
    assert field in [item["field"] for item in error["details"]["fields"]]
    assert (await api.get("/jobs")).json()["count"] == 0  # nothing half-written


async def test_malformed_json_is_a_validation_error(api: httpx.AsyncClient) -> None:
    response = await api.post("/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and error_of(response)["code"] == "VALIDATION_ERROR"


async def test_unknown_template_and_a_callback_without_a_secret(api: httpx.AsyncClient) -> None:
    missing = await api.post("/jobs", json={"workflowId": "no_such_template"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "WORKFLOW_NOT_FOUND"
    # No WEBHOOK_SECRET: a webhook would go unsigned, so none is accepted.
    callback = await api.post("/jobs", json={"workflowId": "solid_color", "callbackUrl": "https://x.test/h"})
    assert callback.status_code == 400 and error_of(callback)["code"] == "WEBHOOK_NOT_CONFIGURED"


@pytest.mark.parametrize("path", ["/jobs/not-a-uuid", "/jobs/not-a-uuid/logs", "/outputs/not-a-uuid",
                                  "/outputs/not-a-uuid/a.png"])
async def test_a_job_id_that_is_no_uuid_is_404(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)
    assert response.status_code == 404 and error_of(response)["code"] == "JOB_NOT_FOUND"
    cancel = await api.post("/jobs/not-a-uuid/cancel", json={"reason": "x"})
    assert cancel.status_code == 404 and error_of(cancel)["code"] == "JOB_NOT_FOUND"


async def test_bad_list_filters_are_400_naming_the_fields(api: httpx.AsyncClient) -> None:
    bad = await api.get("/jobs", params={"status": "bogus", "limit": 500})
    assert bad.status_code == 400
    assert {item["field"] for item in error_of(bad)["details"]["fields"]} == {"status", "limit"}


@pytest.mark.parametrize("value", ["0", "1714564800", "1.5e9", "-1", "nan"])
async def test_list_filters_take_iso_8601_instants_not_unix_times(api: httpx.AsyncClient, value: str) -> None:
    for name in ("after", "before"):
        response = await api.get("/jobs", params={name: value})
        assert response.status_code == 400, response.text
        [issue] = error_of(response)["details"]["fields"]
        assert issue["field"] == name and "ISO 8601" in issue["message"] and "Unix time" in issue["message"]
    instants = {"after": "2024-05-01T12:00:00Z", "before": "2999-01-01T00:00:00+02:00"}
    assert (await api.get("/jobs", params=instants)).status_code == 200


@pytest.mark.parametrize("value", ["2026-12-01T00:00:00", "2026-12-01T00:00", "2026-12-01"])
async def test_list_filters_refuse_a_time_without_a_time_zone(api: httpx.AsyncClient, value: str) -> None:
    for path in ("/jobs", "/audit"):
        for name in ("after", "before"):
            response = await api.get(path, params={name: value})
            assert response.status_code == 400 and error_of(response)["code"] == "VALIDATION_ERROR", response.text
            [issue] = error_of(response)["details"]["fields"]
            assert issue["field"] == name and "time zone" in issue["message"], issue


async def test_template_jobs_validate_inputs(api: httpx.AsyncClient) -> None:
    await register(api, registration("seeded"))
    bad = await api.post("/jobs", json={"workflowId": "seeded", "inputs": {"width": 2, "nope": 1}})
    assert bad.status_code == 400
    fields = {item["field"] for item in bad.json()["error"]["details"]["fields"]}
    assert fields == {"inputs.color", "inputs.width", "inputs.nope"}


async def test_template_job_inputs_are_refused_before_a_job_exists(api: httpx.AsyncClient) -> None:
    for inputs, field in [({"width": None}, "inputs.width"), ({"filename_prefix": ["2", 0]}, "inputs.filename_prefix"),
                          ({"filename_prefix": {"a": 1}}, "inputs.filename_prefix")]:
        response = await api.post("/jobs", json={"workflowId": "animated_noise_webp", "inputs": inputs})
        assert response.status_code == 400, response.text
        assert [item["field"] for item in response.json()["error"]["details"]["fields"]] == [field]
    null = await api.post("/jobs", json={"workflowId": "solid_color", "inputs": {"width": None}})
    [issue] = null.json()["error"]["details"]["fields"]
    assert issue == {"field": "inputs.width", "message": "null is not a value; leave the field out to use its default"}
    assert (await api.get("/jobs")).json()["count"] == 0


async def test_an_answer_lists_fifty_offending_fields_and_counts_the_rest(api: httpx.AsyncClient) -> None:
    """A body of a million unknown fields once got an answer of 104 MB naming each of them."""
    unknown = {f"k{index:05d}": 0 for index in range(10_000)}
    template_inputs = {"workflowId": "solid_color", "inputs": unknown}  # refused by the input schema
    for body, first in [({"workflowId": "solid_color", **unknown}, "k00000"), (template_inputs, "inputs.k00000")]:
        response = await api.post("/jobs", json=body)
        assert response.status_code == 400 and len(response.content) < 16_000, len(response.content)
        error = error_of(response)
        assert len(error["details"]["fields"]) == 50 and error["details"]["moreFields"] == 10_000 - 50
        assert error["details"]["fields"][0]["field"] == first
        assert error["message"].count(first[:-5]) == 3 and error["message"].endswith("; and 9997 more"), error["message"]
    few = error_of(await api.post("/jobs", json={"workflowId": "solid_color", "a": 1, "b": 2}))
    assert "moreFields" not in few["details"] and few["message"].count("Extra inputs") == 2


async def test_long_names_and_ids_are_not_echoed_whole(api: httpx.AsyncClient) -> None:
    long_key = await api.post("/jobs", json={"workflowId": "solid_color", "x" * 100_000: 1})
    [issue] = error_of(long_key)["details"]["fields"]
    assert long_key.status_code == 400 and len(long_key.content) < 2_000 and issue["field"].startswith("xxx")
    long_id = await api.post("/jobs", json={"workflowId": "x" * 100_000})
    assert long_id.status_code == 400 and len(long_id.content) < 2_000
    assert [item["field"] for item in error_of(long_id)["details"]["fields"]] == ["workflowId"]


# --- bodies ----------------------------------------------------------------------------------------------


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
        ("[" * 1500 + "]" * 1500, "body", "nested more than 32 levels deep"),
        # Python's limit on an integer's digits once answered "not valid JSON: undecodable or nested too deeply".
        ('{"workflowId": "solid_color", "inputs": {"seed": %s}}' % ("9" * 5000), "inputs.seed",
         "an integer of 5000 digits is too long (at most 4300)"),
        ('{"workflowId": "solid_color", "metadata": {"k": [-%s]}}' % ("1" * 4301), "metadata.k.0", "4301 digits"),
        ('{"workflowId": "solid_color", "metadata": {"k": 1e400}}', "metadata.k", "too large"),
    ],
)
async def test_bodies_that_are_not_plain_json_are_refused(
    api: httpx.AsyncClient, raw_body: str, field: str, says: str
) -> None:
    """A job nested 200 deep used to be accepted and then could never be decoded by the worker."""
    for path in ("/jobs", "/workflows"):
        response = await api.post(path, content=raw_body.encode("utf-8", "surrogatepass"),
                                  headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] == "VALIDATION_ERROR"
        [problem] = error["details"]["fields"]
        assert problem["field"].startswith(field) and says in problem["message"], problem
    assert (await api.get("/jobs")).json()["count"] == 0


def counted_values(value: object) -> int:
    """Array items and object members, an empty array or object counting as one, as plain_json counts them."""
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return max(len(value), 1) + sum(counted_values(child) for child in children)
    return 0


@pytest.mark.parametrize("value", [
    {"a": [1, 2, {"b": []}], "c": {}},
    ["commas, [brackets] and {braces} in strings", {"k,[{": "\\\",[{"}],
    # An escape just where a step of the count ends (a step reads at most 256 KiB).
    {"long": "x" * (256 * 1024 - 1) + '\\"\\\\"' + ",[{" * 1000, "after": [1, 2]},
    {"ünïcødé": ["😀", "\u2028"]},
])
def test_values_are_counted_before_parsing_as_parsing_would_count_them(
    value: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    monkeypatch.setattr(plain_json_module, "MAX_VALUES", counted_values(value))
    assert plain_json(raw) == value
    monkeypatch.setattr(plain_json_module, "MAX_VALUES", counted_values(value) - 1)
    with pytest.raises(ApiError) as refused:
        plain_json(raw)
    assert refused.value.details["fields"][0]["field"] == "body" and "more than" in refused.value.message


def test_every_route_that_takes_a_body_reads_it_off_the_event_loop() -> None:
    """FastAPI's own reading of a body neither counts its values nor refuses what is not plain JSON."""
    routes = [route for module in (health, jobs, outputs, workflows) for route in module.router.routes]
    taking_bodies = [route for route in routes if isinstance(route, APIRoute) and route.body_field is not None]
    names = {(route.name, *route.methods) for route in taking_bodies}
    assert names == {("create_job", "POST"), ("cancel_job", "POST"), ("cancel_job", "DELETE"),
                     ("register_workflow", "POST"), ("change_workflow", "PUT")}, names
    assert all(isinstance(route, JsonBodyRoute) for route in taking_bodies)


async def test_a_body_of_too_many_values_is_refused_before_it_is_parsed(api: httpx.AsyncClient) -> None:
    many = await api.post("/jobs", json={"workflowId": "solid_color", "metadata": {"list": [0] * MAX_VALUES}})
    assert many.status_code == 400
    assert error_of(many)["details"]["fields"] == [
        {"field": "body", "message": f"more than {MAX_VALUES} values (array items and object members)"}]
    text = {**registration("commas"), "description": "x"}
    text["workflowJson"] = {**text["workflowJson"], "9": {"class_type": "Note", "inputs": {"text": ",[{" * MAX_VALUES}}}
    assert (await api.post("/workflows", json=text)).status_code == 201, "commas in strings are no values"


@pytest.mark.parametrize(("encoded", "says"), [
    ('{"workflowId": "solid_color"}'.encode("utf-16"), "looks like UTF-16 text; send UTF-8"),
    ('{"workflowId": "solid_color"}'.encode("utf-16-le"), "looks like UTF-16-LE text"),
    ('{"workflowId": "solid_color"}'.encode("utf-32"), "looks like UTF-32 text"),
    ('{"workflowId": "solid_color"}'.encode("utf-8-sig"), "byte order mark"),
    ('{"workflowId": "solid_color", "metadata": {"k": "é"}}'.encode("latin-1"), "not UTF-8 text (byte 49 cannot be decoded)"),
])
async def test_bodies_in_other_encodings_than_utf8_are_refused(api: httpx.AsyncClient, encoded: bytes, says: str) -> None:
    """Python's json module reads UTF-16 and UTF-32 too: a UTF-16 body was accepted."""
    for path in ("/jobs", "/workflows"):
        response = await api.post(path, content=encoded, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        [problem] = error_of(response)["details"]["fields"]
        assert problem["field"] == "body" and says in problem["message"], problem


async def test_undecodable_and_oversized_bodies(api: httpx.AsyncClient) -> None:
    undecodable = await api.post("/jobs", content=b'{"workflowId": "\xff"}',
                                 headers={"content-type": "application/json"})
    assert undecodable.status_code == 400 and error_of(undecodable)["details"]["fields"][0]["field"] == "body"
    declared = await api.post("/jobs", content=b"{}", headers={
        "content-type": "application/json", "content-length": str(MAX_BODY_BYTES + 1)})
    assert declared.status_code == 413 and error_of(declared)["code"] == "REQUEST_TOO_LARGE"
    huge_offset = await api.get("/jobs", params={"offset": 10**20})
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


async def test_unknown_paths_and_methods_answer_json(api: httpx.AsyncClient) -> None:
    trailing = await api.post("/jobs/", json={"workflowId": "solid_color"})
    assert trailing.status_code == 404 and error_of(trailing)["code"] == "NOT_FOUND"
    wrong_method = await api.delete("/jobs")
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/jobs", "GET, POST"),  # two routes at one path
    ("PUT", "/jobs/0b0e5f3c-3b5e-4f0e-9d7b-3f2b1d6a9c11", "GET, DELETE"),
    ("GET", "/jobs/0b0e5f3c-3b5e-4f0e-9d7b-3f2b1d6a9c11/cancel", "POST"),
    ("POST", "/workflows/solid_color", "GET, PUT, DELETE"),
    ("POST", "/health", "GET"),
])
async def test_a_405_says_which_methods_the_path_takes(api: httpx.AsyncClient, method: str, path: str, allowed: str) -> None:
    response = await api.request(method, path)
    assert response.status_code == 405 and error_of(response)["code"] == "METHOD_NOT_ALLOWED"
    assert response.headers["allow"] == allowed


# --- templates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": "has space"}, "id"),
        ({"defaultParams": {}}, "workflowJson: {{filename_prefix}}"),
        ({"workflowJson": {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}}, "workflowJson.1.inputs.images"),
        ({"workflowJson": {"1": {"inputs": {}}}}, "workflowJson.1"),
        ({"inputSchema": {"fields": {"color": {"type": "colour"}}}}, "inputSchema.fields.color.type"),
        ({"name": ""}, "name"),
        ({"id": "a\n"}, "id"),
        ({"inputSchema": {"type": "object", "fields": 5}}, "inputSchema.fields"),
        ({"inputSchema": {"type": "object", "fields": None}}, "inputSchema.fields"),
        ({"inputSchema": {"type": "object", "fields": [SCHEMA["fields"]["width"]]}}, "inputSchema.fields"),
        ({"inputSchema": with_field("color", required=True, default=1)}, "inputSchema.fields.color.default"),
        ({"inputSchema": with_field("width", maxLength=4)}, "inputSchema.fields.width.maxLength"),
        ({"inputSchema": with_field("label", type="string", min=1)}, "inputSchema.fields.label.min"),
        ({"inputSchema": with_field("width", min="1")}, "inputSchema.fields.width.min"),
        ({"inputSchema": with_field("color", required="yes")}, "inputSchema.fields.color.required"),
        ({"defaultParams": {"filename_prefix": "x", "width": 999999}}, "defaultParams.width"),
        ({"defaultParams": {"filename_prefix": "x", "width": "abc"}}, "defaultParams.width"),
    ],
)
async def test_registration_errors_name_the_field(api: httpx.AsyncClient, changes: dict, field: str) -> None:
    response = await api.post("/workflows", json=registration("bad_template", **changes))
    assert response.status_code == 400, response.text
    assert field in [item["field"] for item in response.json()["error"]["details"]["fields"]]
    assert {w["id"] for w in (await api.get("/workflows")).json()["workflows"]} == BUNDLED  # nothing written


async def test_a_malformed_graph_in_an_update_is_400(api: httpx.AsyncClient) -> None:
    await register(api, registration("to_break"))
    response = await api.put("/workflows/to_break", json={"workflowJson": {"1": {"inputs": {}}}})
    assert response.status_code == 400 and response.json()["error"]["details"]["fields"][0]["field"] == "workflowJson.1"
    assert (await api.get("/workflows/to_break")).json()["workflow"]["version"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": None}, "name"),
        ({"description": None}, "description"),
        ({"workflowJson": None}, "workflowJson"),
        ({"inputSchema": None}, "inputSchema"),
        ({"defaultParams": None}, "defaultParams"),
        ({"inputSchema": {"type": "object", "fields": 5}}, "inputSchema.fields"),
        ({"inputSchema": with_field("width", max=32)}, "inputSchema.fields.width"),  # its default, 64, no longer fits
        ({"defaultParams": {"filename_prefix": "x", "width": 999999}}, "defaultParams.width"),
    ],
)
async def test_a_refused_update_names_the_field_and_writes_no_version(
    api: httpx.AsyncClient, body: dict, field: str
) -> None:
    await register(api, registration("kept"))
    response = await api.put("/workflows/kept", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert field in [item["field"] for item in response.json()["error"]["details"]["fields"]]
    assert (await api.get("/workflows/kept")).json()["workflow"]["version"] == 1
    changed = await api.put("/workflows/kept", json={"description": "changed"})
    assert changed.json()["workflow"]["version"] == 2  # the refused update took no version number


async def test_while_temporal_is_down_a_bad_request_is_still_refused_for_what_it_says(tmp_path: Path) -> None:
    settings = api_alone_settings(tmp_path)
    migrate_database(settings)
    app = create_app(settings)  # keeps trying to reach a Temporal that is not there
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=ASGITransport(app=app), base_url="http://gateway") as client:
            bad = await client.post("/jobs", json={"workflowId": "solid_color", "surprise": 1})
            unknown = await client.post("/jobs", json={"workflowId": "no_such_template"})
            not_a_job = await client.get("/jobs/not-a-uuid")
            good = await client.post("/jobs", json={"workflowId": "solid_color"})
    assert (bad.status_code, error_of(bad)["code"]) == (400, "VALIDATION_ERROR")
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "WORKFLOW_NOT_FOUND")
    assert (not_a_job.status_code, error_of(not_a_job)["code"]) == (404, "JOB_NOT_FOUND")
    assert (good.status_code, error_of(good)["code"]) == (503, "TEMPORAL_UNAVAILABLE")
