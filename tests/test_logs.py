"""Structured logs (app.logs) and X-Request-ID (api.request_ids): the lines' shape, the request id's checks and
echo, and one request id followed through a real job, from the API's line to the webhook's, and to its receiver."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from api.http_server import server_config
from api.request_ids import MAX_LENGTH, sane_request_id
from app.logs import LogFormat, log_fields, log_handler
from tests.harness import (
    REPO_ROOT, Gateway, api_alone, api_alone_settings, asgi_client, assert_eventually, serve_locally,
)
from tests.test_privacy import new_key

UUID_HEX = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What a JSON handler on the root logger writes, from DEBUG up, for the test's duration."""
    stream = io.StringIO()
    handler = log_handler(LogFormat.json, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def one_line(log_format: LogFormat, log: Any) -> str:
    stream = io.StringIO()
    logger = logging.getLogger(f"test.logs.{log_format.value}")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(log_handler(log_format, stream))
    try:
        log(logger)
    finally:
        logger.handlers.clear()
    return stream.getvalue()


def test_a_json_line_has_its_time_level_logger_message_and_context() -> None:
    def log(logger: logging.Logger) -> None:
        with log_fields(request_id="req-1", job_id="job-1", template_id=None):
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("job %s failed", "job-1", extra={"status_code": 502, "batch_id": None})

    [line] = one_line(LogFormat.json, log).splitlines()
    entry = json.loads(line)
    assert list(entry)[:4] == ["time", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["level"] == "ERROR" and entry["logger"] == "test.logs.json" and entry["message"] == "job job-1 failed"
    assert entry["request_id"] == "req-1" and entry["job_id"] == "job-1"
    assert "template_id" not in entry and "batch_id" not in entry  # what is not known is left out
    assert entry["status_code"] == 502 and "ValueError: boom" in entry["exc_info"]


def test_temporal_loggers_extra_becomes_fields_and_a_text_line_shows_them() -> None:
    details = {"activity_type": "run_prompt", "attempt": 2, "workflow_id": "job-1", "workflow_run_id": "run-1",
               "namespace": "default", "task_queue": "q", "activity_id": "1", "workflow_type": "GenerationWorkflow"}

    def log(logger: logging.Logger) -> None:
        logger.info("prompt queued", extra={"temporal_activity": details})

    entry = json.loads(one_line(LogFormat.json, log))
    assert {key: entry[key] for key in ("workflow_id", "run_id", "activity", "attempt")} == {
        "workflow_id": "job-1", "run_id": "run-1", "activity": "run_prompt", "attempt": 2}
    assert "temporal_activity" not in entry and "namespace" not in entry
    text = one_line(LogFormat.text, log)
    assert text.rstrip().endswith("INFO test.logs.text: prompt queued "
                                  "[workflow_id=job-1 run_id=run-1 activity=run_prompt attempt=2]"), text


@pytest.mark.parametrize("given", ["f3b1c0de", "a.b:c-d_e", "x" * MAX_LENGTH, "0af7651916cd43dd8448eb211c80319c"])
def test_a_sane_request_id_is_kept(given: str) -> None:
    assert sane_request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "x" * (MAX_LENGTH + 1), "two words", "a\nb", "<script>", "ünï"])
def test_any_other_request_id_is_replaced_by_a_new_one(given: str | None) -> None:
    assert UUID_HEX.fullmatch(sane_request_id(given))


async def test_every_answer_carries_the_request_id_and_its_access_line(tmp_path: Path, lines: io.StringIO) -> None:
    async with api_alone(api_alone_settings(tmp_path)) as app, asgi_client(app) as client:
        given = await client.get("/health", headers={"X-Request-ID": "from-the-client"})
        made = await client.post("/jobs", content=b'{"workflowId": ', headers={"X-Request-ID": "no spaces please"})
        unknown = await client.get("/no/such/route")
    assert given.headers["X-Request-ID"] == "from-the-client"
    assert made.status_code == 400 and made.json()["error"]["code"] == "VALIDATION_ERROR"
    assert UUID_HEX.fullmatch(made.headers["X-Request-ID"])
    assert unknown.status_code == 404 and UUID_HEX.fullmatch(unknown.headers["X-Request-ID"])
    access = [entry for entry in parsed(lines) if entry["logger"] == "api.access"]
    assert [(entry["level"], entry["method"], entry["path"], entry["status"], entry["request_id"])
            for entry in access] == [
        ("DEBUG", "GET", "/health", given.status_code, "from-the-client"),  # 503: no Temporal here
        ("DEBUG", "POST", "/jobs", 400, made.headers["X-Request-ID"]),
        ("DEBUG", "GET", "/no/such/route", 404, unknown.headers["X-Request-ID"]),
    ]
    assert all(entry["message"].startswith(f"{entry['method']} {entry['path']} {entry['status']} in ")
               for entry in access)


async def test_under_privacy_mode_an_access_line_names_the_route_not_the_path(
    tmp_path: Path, lines: io.StringIO
) -> None:
    """Both places that write access lines, the app's (in process) and the server's (outermost, as
    `comfyui-gateway api` serves): the job id, a file name, a query never show; an unknown path neither."""
    settings = api_alone_settings(tmp_path, privacy_mode=True, encryption_keys=new_key("k1"), access_log=True)
    async with api_alone(settings) as app:
        served = httpx.ASGITransport(app=server_config(app, settings).app, raise_app_exceptions=False)
        async with asgi_client(app) as in_process, httpx.AsyncClient(transport=served, base_url="http://g") as server:
            for client in (in_process, server):
                await client.get("/jobs/secret-job-id?token=secret-query")
                await client.get("/outputs/secret-job-id/secret-name.png")
                await client.get("/secret/unknown/path")
    access = [entry for entry in parsed(lines) if entry["logger"] == "api.access"]
    assert [(entry["level"], entry["path"]) for entry in access] == 2 * [
        ("INFO", "/jobs/{job_id}"), ("INFO", "/outputs/{job_id}/{filename}"), ("INFO", "(unmatched)")]
    # The gateway's lines, that is; the test's own httpx client logs what it asked for.
    assert not [entry for entry in parsed(lines) if not entry["logger"].startswith("httpx") and "secret" in str(entry)]


@pytest.mark.settings(webhook_secret="a webhook secret", webhook_allowed_domains="127.0.0.1")
async def test_one_request_id_follows_a_job_from_the_api_to_its_webhook(gateway: Gateway, lines: io.StringIO) -> None:
    received: list[web.Request] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(request)
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    request_id = "follow-me-0001"
    async with serve_locally(receiver) as url:
        body = {"workflowId": "solid_color", "inputs": {"width": 64, "height": 64}, "callbackUrl": f"{url}/hook"}
        submitted = await gateway.api.post("/jobs", json=body,
                                           headers={"X-Request-ID": request_id, "Idempotency-Key": "logs-1"})
        assert submitted.status_code == 202, submitted.text
        assert submitted.headers["X-Request-ID"] == request_id
        job_id = submitted.json()["jobId"]
        # A repeat of the key, with a request id of its own: its answer has its own id, the job keeps the first.
        repeat = await gateway.api.post("/jobs", json=body,
                                        headers={"X-Request-ID": "the-repeat", "Idempotency-Key": "logs-1"})
        assert repeat.json()["jobId"] == job_id and repeat.headers["X-Request-ID"] == "the-repeat"
        await assert_eventually(lambda: received, what="the job's webhook")

    assert received[0].headers["X-Request-ID"] == request_id  # sent after the repeat: the job kept the first id
    entries = parsed(lines)
    of_job = [entry for entry in entries if entry.get("job_id") == job_id]
    api = [entry for entry in of_job if entry["logger"] == "api.routes.jobs"]
    assert [(entry["request_id"], entry["message"].split(";")[0]) for entry in api] == [
        (request_id, f"job {job_id} submitted"), ("the-repeat", f"job {job_id}: a repeat of its idempotency key")]
    prompt = [entry for entry in of_job if entry["logger"] == "activities.comfy"]
    assert prompt and {(entry["request_id"], entry["workflow_id"], entry["template_id"]) for entry in prompt} == {
        (request_id, job_id, "solid_color")}
    assert len(prompt) == 2 and all(entry["activity"] == "run_prompt" and entry["run_id"] and entry["attempt"] == 1
                                    for entry in prompt)

    def delivery_logged() -> list[dict]:  # the delivery logs its line once the receiver has answered: a moment after
        return [entry for entry in parsed(lines)
                if entry.get("job_id") == job_id and entry["logger"] == "activities.delivery"]

    [delivery] = await assert_eventually(delivery_logged, what="the delivery's log line")
    assert delivery["request_id"] == request_id and delivery["activity"] == "deliver_webhook"
    assert delivery["workflow_id"] == f"{job_id}:webhook:job.succeeded" and delivery["template_id"] == "solid_color"
    assert delivery["status_code"] == 204 and delivery["delivered"]
    assert delivery["message"].startswith("webhook job.succeeded attempt 1 to http://127.0.0.1:")


_LOG_FROM_EVERYWHERE = """
import json, logging, os, sys
from app.logs import configure_logging
from app.settings import Settings

for variables in json.loads(sys.argv[1]):  # one process, configured as each command would be in turn
    os.environ.update(variables)
    settings = Settings(_env_file=None)
    configure_logging(settings.log_level.value, settings.log_format)  # as `comfyui-gateway <command>` does
    for name in ("httpx", "httpcore.http11", "websockets.client", "uvicorn.error", "alembic.runtime.migration",
                 "sse_starlette.sse", "PIL.PngImagePlugin", "activities.comfy"):
        logging.getLogger(name).info("info from %s", name)
        logging.getLogger(name).debug("debug from %s", name)
    logging.getLogger("activities.comfy").warning("a warning")
    sys.stderr.write("--\\n")
"""


def logged_by_a_process(*environments: dict[str, str]) -> list[list[str]]:
    """The lines logged in each environment, by one process."""
    done = subprocess.run([sys.executable, "-c", _LOG_FROM_EVERYWHERE, json.dumps(environments)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.stdout == ""  # logs go to stderr: a command's stdout is its answer
    return [chunk.splitlines() for chunk in done.stderr.split("--\n")[:-1]]


def test_log_level_and_log_format_are_honoured_and_the_http_libraries_stay_quiet() -> None:
    json_at_info, warnings, debug = logged_by_a_process({"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"},
                                                        {"LOG_LEVEL": "warning", "LOG_FORMAT": "text"},
                                                        {"LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json"})
    assert [(entry["level"], entry["message"]) for entry in map(json.loads, json_at_info)] == [
        ("INFO", "info from activities.comfy"), ("WARNING", "a warning")]
    assert [line.split(" ", 1)[1] for line in warnings] == ["WARNING activities.comfy: a warning"]
    # At DEBUG the gateway's and its servers' own words show; the HTTP libraries' per-request lines still do not.
    assert {json.loads(line)["logger"] for line in debug} == {
        "uvicorn.error", "alembic.runtime.migration", "activities.comfy"}, debug
