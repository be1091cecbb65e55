"""No secret setting ever reaches a log line: every setting named like a secret is set to a marker, the API
and the worker run as deployed (child processes, DEBUG logging) through a job with a signed webhook and a
few refused requests, and every line they logged is searched for every marker. The same lines show the job's request id followed from
the API to the webhook.

The secrets are found by name among the settings, and kept when this version of the gateway accepts them at
start-up, so each secret setting a later version adds (or stops refusing) is covered without changing this."""

from __future__ import annotations

import base64
import json
import secrets as secrets_module
import uuid
from pathlib import Path

import httpx
import jwt
from aiohttp import web
from pydantic import ValidationError
from temporalio.client import Client

from app.settings import Settings
from tests.harness import (
    ApiProcess, ComfyUITarget, WorkerProcess, assert_eventually, gateway_settings, migrate_database, serve_locally,
    wait_for_job,
)

_SECRET_WORDS = ("key", "secret", "token", "password")
REQUEST_ID = "secrets-test-request"


def accepted_secrets() -> dict[str, tuple[str, str]]:
    """Setting name (upper case) → (its value, the secret in it to search the logs for), for every secret
    setting this version accepts. The value is a marker, in the first of a few shapes the setting takes: as it
    is, as a `key:role` entry (API_KEYS), or as an `id:base64key` entry (ENCRYPTION_KEYS)."""
    secrets: dict[str, tuple[str, str]] = {}
    for name in Settings.model_fields:
        if not any(word in name for word in _SECRET_WORDS):
            continue
        marker = f"MARKER{uuid.uuid4().hex}{name.upper()}"
        key = base64.b64encode(secrets_module.token_bytes(32)).decode()
        for value, secret in ((marker, marker), (f"{marker}:admin", marker), (f"k1:{key}", key)):
            try:
                Settings(_env_file=None, **{name: value})
            except ValidationError:
                continue
            secrets[name.upper()] = value, secret
            break
    return secrets


def test_the_secret_settings_are_found() -> None:
    names = {name for name in Settings.model_fields if any(word in name for word in _SECRET_WORDS)}
    assert {"webhook_secret", "s3_secret_key", "s3_access_key", "api_keys", "jwt_secret", "encryption_keys"} <= names
    assert {"WEBHOOK_SECRET", "API_KEYS", "JWT_SECRET", "ENCRYPTION_KEYS"} <= accepted_secrets().keys()


async def test_no_secret_reaches_a_log_line(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    secrets = accepted_secrets()
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue)
    migrate_database(settings)
    variables = {name: value for name, (value, _) in secrets.items()}
    variables |= {"LOG_LEVEL": "DEBUG", "WEBHOOK_ALLOWED_DOMAINS": "127.0.0.1"}
    deliveries: list[web.Request] = []

    async def receive(request: web.Request) -> web.Response:
        deliveries.append(request)
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    worker, api = WorkerProcess(settings, **variables), ApiProcess(settings, **variables)
    worker.start()
    try:
        await api.start()
        # The right credentials where this version checks them; wrong ones as an attacker would send.
        good = {"X-API-Key": secrets["API_KEYS"][1]} if "API_KEYS" in secrets else {}
        forged = jwt.encode({"sub": "mallory", "role": "admin", "exp": 4102444800}, "not-the-secret" * 4)
        async with serve_locally(receiver) as hook_url, httpx.AsyncClient(
            base_url=api.url, timeout=30, headers=good
        ) as client:
            submitted = await client.post("/jobs", json={
                "workflowId": "solid_color", "inputs": {"width": 64, "height": 64}, "callbackUrl": f"{hook_url}/hook"},
                headers={"X-Request-ID": REQUEST_ID})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["jobId"]
            refused = [
                await client.get("/jobs", headers={"X-API-Key": "wrong-key"}),
                await client.get("/jobs", headers={"Authorization": f"Bearer {forged}"}),
                await client.get("/jobs", headers={"Authorization": "Bearer not.a.token"}),
                await client.post("/jobs", content=b'{"workflowId": '),
                await client.post("/jobs", json={"workflowId": "no_such_template"}),
                await client.get(f"/jobs/{uuid.uuid4()}"),
            ]
            assert all(response.status_code != 500 for response in refused)
            try:
                await wait_for_job(client, job_id, until={"succeeded"}, timeout=60)
            except AssertionError as failure:
                worker_log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"{failure}\nthe worker's log ends:\n{worker_log}") from None
            await assert_eventually(lambda: deliveries, what="the job's webhook")
    finally:
        api.stop()
        worker.stop()

    logs = {path.name: path.read_text(errors="replace") for path in (tmp_path / "api.log", tmp_path / "worker.log")}
    assert job_id in logs["worker.log"] and "POST /jobs" in logs["api.log"]  # both logged what they did
    # As deployed, each logs JSON lines (LOG_FORMAT's default), and the job's lines carry its request id.
    lines = {name: [json.loads(line) for line in text.splitlines()] for name, text in logs.items()}
    assert deliveries[0].headers["X-Request-ID"] == REQUEST_ID
    assert len([line for line in lines["api.log"] if line["message"].startswith("API on http://")]) == 1
    for name, logger in (("api.log", "api.routes.jobs"), ("worker.log", "activities.comfy"),
                         ("worker.log", "activities.delivery")):
        assert [line for line in lines[name] if line["logger"] == logger
                and line.get("job_id") == job_id and line.get("request_id") == REQUEST_ID], (name, logger)
    for log_name, text in logs.items():
        for line_number, line in enumerate(text.splitlines(), 1):
            leaked = [name for name, (_, secret) in secrets.items() if secret in line]
            assert not leaked, f"{log_name}:{line_number} holds {leaked}: {line[:300]}"
