"""The API documents itself: Swagger UI and ReDoc that work offline, and an OpenAPI document that tells the
truth, checked by schemathesis against the running API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import schemathesis
import uvicorn
from httpx import ASGITransport
from temporalio.client import Client

from api.main import create_app
from app.errors import ErrorCode, http_status
from app.settings import Settings
from tests.harness import Gateway, free_port, gateway_settings, migrate_database, wait_for_job


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API alone: a migrated SQLite database, and a ComfyUI and a Temporal where nothing listens."""
    settings = Settings(
        _env_file=None, data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        comfyui_url=f"http://127.0.0.1:{free_port()}", temporal_address=f"127.0.0.1:{free_port()}",
    )
    migrate_database(settings)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


class AssetReferences(HTMLParser):
    """Every URL a page loads: stylesheets, icons, scripts, and ReDoc's spec."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("href", "src", "spec-url") and value]


def referenced_assets(html: str) -> list[str]:
    parser = AssetReferences()
    parser.feed(html)
    return parser.urls


EXPECTED_TYPES = {".css": "text/css", ".js": "javascript", ".png": "image/png", ".json": "application/json"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_load_nothing_from_another_host(api: httpx.AsyncClient, page: str) -> None:
    response = await api.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text, response.text
    assets = referenced_assets(response.text)
    assert any(url.endswith(".js") for url in assets), assets
    if page == "/docs":
        assert "url: '/openapi.json'" in response.text  # Swagger UI's spec is set in its script, not an attribute
        assets.append("/openapi.json")
    for url in assets:
        target = urljoin(f"http://gateway{page}", url)
        assert urlsplit(target).netloc == "gateway", url
        asset = await api.get(target)
        assert asset.status_code == 200, url
        assert EXPECTED_TYPES[Path(urlsplit(target).path).suffix] in asset.headers["content-type"], (url, asset.headers)
        assert len(asset.content) > 0, url


# --- the document --------------------------------------------------------------------------------------------

# What each operation answers besides its success, by code; the statuses are the error table's.
# Every operation but /health and /ready needs a caller, who is rate limited.
_AUTH = {"AUTH_FAILED", "RATE_LIMITED"}
_ADMIN = {"AUTH_FAILED", "FORBIDDEN", "RATE_LIMITED"}
_ERROR_CODES_BUT_THE_DATABASE = {
    "POST /jobs": {"VALIDATION_ERROR", "WEBHOOK_NOT_CONFIGURED", "REQUEST_TOO_LARGE", "WORKFLOW_NOT_FOUND",
                   "IDEMPOTENCY_CONFLICT", "WORKFLOW_JSON_NOT_ALLOWED", "STORAGE_ERROR", "TOO_MANY_ACTIVE_JOBS",
                   "TEMPORAL_UNAVAILABLE", "TOO_MANY_WAITS", "INTERNAL_ERROR"} | _AUTH,
    "GET /jobs": {"VALIDATION_ERROR", "INTERNAL_ERROR"} | _AUTH,
    "GET /jobs/{job_id}": {"VALIDATION_ERROR", "JOB_NOT_FOUND", "TEMPORAL_UNAVAILABLE", "TOO_MANY_WAITS",
                           "INTERNAL_ERROR"} | _AUTH,
    "POST /jobs/{job_id}/cancel": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "JOB_NOT_FOUND", "JOB_ALREADY_FINISHED",
                                   "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "DELETE /jobs/{job_id}": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "JOB_NOT_FOUND", "JOB_ALREADY_FINISHED",
                              "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "GET /jobs/{job_id}/logs": {"JOB_NOT_FOUND", "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "GET /jobs/{job_id}/events": {"JOB_NOT_FOUND", "TEMPORAL_UNAVAILABLE", "TOO_MANY_STREAMS", "INTERNAL_ERROR"} | _AUTH,
    "GET /events": {"VALIDATION_ERROR", "TOO_MANY_STREAMS", "INTERNAL_ERROR"} | _AUTH,
    "GET /outputs": {"VALIDATION_ERROR", "INTERNAL_ERROR"} | _AUTH,
    "GET /outputs/{job_id}": {"JOB_NOT_FOUND", "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "GET /outputs/{job_id}/{filename}": {"VALIDATION_ERROR", "JOB_NOT_FOUND", "OUTPUT_NOT_FOUND",
                                         "OUTPUT_FILE_MISSING", "STORAGE_ERROR", "TEMPORAL_UNAVAILABLE",
                                         "INTERNAL_ERROR"} | _AUTH,
    "POST /batches": {"VALIDATION_ERROR", "WEBHOOK_NOT_CONFIGURED", "REQUEST_TOO_LARGE", "WORKFLOW_NOT_FOUND",
                      "STORAGE_ERROR", "TOO_MANY_ACTIVE_JOBS", "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "GET /batches/{batch_id}": {"BATCH_NOT_FOUND", "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "GET /batches/{batch_id}/events": {"BATCH_NOT_FOUND", "TEMPORAL_UNAVAILABLE", "TOO_MANY_STREAMS",
                                       "INTERNAL_ERROR"} | _AUTH,
    "GET /batches/{batch_id}/jobs": {"VALIDATION_ERROR", "BATCH_NOT_FOUND", "TEMPORAL_UNAVAILABLE",
                                     "INTERNAL_ERROR"} | _AUTH,
    "POST /batches/{batch_id}/cancel": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "BATCH_NOT_FOUND",
                                        "BATCH_ALREADY_FINISHED", "TEMPORAL_UNAVAILABLE", "INTERNAL_ERROR"} | _AUTH,
    "GET /workflows": {"INTERNAL_ERROR"} | _AUTH,
    "POST /workflows": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "WORKFLOW_EXISTS", "INTERNAL_ERROR"} | _ADMIN,
    "GET /workflows/{template_id}": {"WORKFLOW_NOT_FOUND", "INTERNAL_ERROR"} | _AUTH,
    "PUT /workflows/{template_id}": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "WORKFLOW_NOT_FOUND",
                                     "WORKFLOW_CONFLICT", "INTERNAL_ERROR"} | _ADMIN,
    "DELETE /workflows/{template_id}": {"WORKFLOW_NOT_FOUND", "INTERNAL_ERROR"} | _ADMIN,
    "GET /audit": {"VALIDATION_ERROR", "INTERNAL_ERROR"} | _ADMIN,
    "GET /health": {"INTERNAL_ERROR"},
    "GET /ready": {"INTERNAL_ERROR"},
    "GET /capabilities": {"INTERNAL_ERROR"} | _AUTH,
    "GET /backends": {"INTERNAL_ERROR"} | _AUTH,
    "GET /models": {"COMFYUI_UNREACHABLE", "COMFYUI_PROTOCOL_ERROR", "INTERNAL_ERROR"} | _AUTH,
    "POST /codec/encode": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "INTERNAL_ERROR"} | _ADMIN,
    "POST /codec/decode": {"VALIDATION_ERROR", "REQUEST_TOO_LARGE", "INTERNAL_ERROR"} | _ADMIN,
}
# What reads or writes the database answers DATABASE_UNAVAILABLE when it cannot (the probes, the codec's encode and
# the models' list read none; the feed's stream reads it in its own task).
_NO_DATABASE = {"GET /health", "GET /ready", "GET /models", "POST /codec/encode", "GET /events"}
ERROR_CODES = {name: codes | ({"DATABASE_UNAVAILABLE"} if name not in _NO_DATABASE else set())
               for name, codes in _ERROR_CODES_BUT_THE_DATABASE.items()}


def documented_error_codes(response: dict) -> list[str]:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return schema.get("properties", {}).get("error", {}).get("properties", {}).get("code", {}).get("enum", [])


async def test_each_operation_documents_the_errors_it_answers_with(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    assert "HTTPValidationError" not in json.dumps(document)  # FastAPI's 422, which the API never sends
    operations = {f"{method.upper()} {path}": operation
                  for path, by_method in document["paths"].items() for method, operation in by_method.items()}
    assert operations.keys() == ERROR_CODES.keys()
    for name, operation in operations.items():
        errors = {status: documented_error_codes(response) for status, response in operation["responses"].items()
                  if documented_error_codes(response)}
        assert {code for codes in errors.values() for code in codes} == ERROR_CODES[name], name
        for status, codes in errors.items():
            assert {http_status(ErrorCode(code)) for code in codes} == {int(status)}, (name, status)
        assert set(operation["responses"]) - set(errors) == {min(operation["responses"])} | (
            {"503"} if name in ("GET /health", "GET /ready") else set()) | (
            {"307"} if name == "GET /outputs/{job_id}/{filename}" else set()) | (
            {"202"} if name == "POST /jobs" else set()) | (
            {"204"} if name in ("GET /jobs/{job_id}/events", "GET /batches/{batch_id}/events") else set()), name  # the success, and no 422
        query = [parameter["name"] for parameter in operation.get("parameters", []) if parameter["in"] == "query"]
        assert all("_" not in parameter for parameter in query), (name, query)  # camelCase, as on the wire
    assert [p["name"] for p in operations["GET /jobs"]["parameters"]] == [
        "status", "workflowId", "batchId", "after", "before", "limit", "offset"]
    assert [p["name"] for p in operations["GET /outputs"]["parameters"]] == [
        "workflowId", "batchId", "after", "before", "limit", "offset"]
    # One operation, two ways to call it: the same body and answers.
    assert {key: operations["DELETE /jobs/{job_id}"][key] for key in ("requestBody", "responses")} == {
        key: operations["POST /jobs/{job_id}/cancel"][key] for key in ("requestBody", "responses")}
    for name in ("POST /jobs", "GET /jobs/{job_id}"):
        [wait] = [p for p in operations[name]["parameters"] if p["name"] == "wait"]
        assert wait["in"] == "query" and not wait["required"] and "MAX_WAIT_SECONDS" in wait["description"], name
    assert operations["POST /jobs"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Job"}


async def test_an_answer_of_the_health_routes_is_documented_whatever_its_status(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path, model in (("/health", "HealthReport"), ("/ready", "ReadinessReport")):
        responses = paths[path]["get"]["responses"]
        for status in ("200", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{model}"}, (path, status)
    output = paths["/outputs/{job_id}/{filename}"]["get"]["responses"]["200"]["content"]
    assert output.keys() == {"application/json", "*/*"}  # base64 JSON, or the file with its own type


async def test_the_answers_about_real_jobs_are_as_documented(gateway: Gateway) -> None:
    """What a generated request cannot reach: a job that ran, its outputs and log, and a cancel."""
    document = (await gateway.api.get("/openapi.json")).json()
    operations = schemathesis.openapi.from_dict(document)

    async def answer(method: str, route: str, path: str, **request: Any) -> httpx.Response:
        response = await gateway.api.request(method, path, **request)
        assert str(response.status_code) in document["paths"][route][method.lower()]["responses"], response.text
        operations[route][method].validate_response(response)
        return response

    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}})
    assert job["status"] == "succeeded", job
    job_id, filename = job["jobId"], job["outputs"][0]["filename"]
    await answer("GET", "/jobs/{job_id}", f"/jobs/{job_id}")
    await answer("GET", "/jobs", "/jobs", params={"workflowId": "solid_color"})
    await answer("GET", "/jobs/{job_id}/logs", f"/jobs/{job_id}/logs")
    await answer("GET", "/jobs/{job_id}/events", f"/jobs/{job_id}/events")  # a finished job's: its end, then closed
    await answer("GET", "/outputs/{job_id}", f"/outputs/{job_id}")
    await answer("GET", "/outputs/{job_id}/{filename}", f"/outputs/{job_id}/{filename}")
    await answer("GET", "/outputs/{job_id}/{filename}", f"/outputs/{job_id}/{filename}", params={"format": "base64"})
    await answer("GET", "/outputs", "/outputs", params={"workflowId": "solid_color", "limit": 5})
    finished = await answer("POST", "/jobs/{job_id}/cancel", f"/jobs/{job_id}/cancel")
    assert finished.status_code == 409
    assert (await answer("DELETE", "/jobs/{job_id}", f"/jobs/{job_id}")).status_code == 409

    ended = await answer("POST", "/jobs", "/jobs", params={"wait": 30},
                         json={"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}})
    assert ended.status_code == 200 and ended.json()["status"] == "succeeded"
    await answer("GET", "/jobs/{job_id}", f"/jobs/{ended.json()['jobId']}", params={"wait": 30})

    running = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, running, until={"running"})
    await answer("GET", "/jobs/{job_id}", f"/jobs/{running}")
    await answer("GET", "/jobs/{job_id}", f"/jobs/{running}", params={"wait": 0.1})
    cancelled = await answer("POST", "/jobs/{job_id}/cancel", f"/jobs/{running}/cancel", json={"reason": "docs"})
    assert cancelled.json()["status"] == "cancelled"
    await answer("GET", "/jobs/{job_id}", f"/jobs/{running}")


# --- the document against the running API ---------------------------------------------------------------

# The environment has ComfyUI down and no worker, so /health, /ready and /models answer 503 by design (and are
# documented so); any other 5xx, there or elsewhere, is a failure.
SCHEMATHESIS_CONFIG = schemathesis.Config.from_dict({
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
    },
    "operations": [{
        "include-path": ["/health", "/ready", "/models"],
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", 503]}},
    }],
    "generation": {"mode": "all", "max-examples": 10},
})


@pytest.fixture
def live_api(temporal_client: Client, task_queue: str, tmp_path: Path) -> Iterator[str]:
    """The API served by uvicorn on a free port, as `comfyui-gateway api` serves it: a migrated SQLite database,
    the session's Temporal (which it connects to itself) with no worker on its queue, and a ComfyUI where
    nothing listens. Its own thread runs its own event loop, while schemathesis calls it from the test's thread."""
    # No job ends here: a request with `wait` waits as long as it says, at most MAX_WAIT_SECONDS.
    settings = gateway_settings(temporal_client, f"http://127.0.0.1:{free_port()}", tmp_path, task_queue,
                                max_wait_seconds=1)
    migrate_database(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="live-api")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not _connected_to_temporal(url):
            assert thread.is_alive() and time.monotonic() < deadline, "the API did not start, or found no Temporal"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _connected_to_temporal(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).json()["temporal"]["reachable"]
    except httpx.TransportError:
        return False


@pytest.fixture
def live_schema(live_api: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live_api}/openapi.json", config=SCHEMATHESIS_CONFIG)


live = schemathesis.pytest.from_fixture("live_schema")


@live.parametrize()
def test_every_answer_is_one_the_document_describes(case: schemathesis.Case) -> None:
    """No 5xx, and every status, content type and body as the operation's document says."""
    case.call_and_validate()
