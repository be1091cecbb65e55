"""No secret setting ever reaches a log line: every setting named like a secret is set to a marker, the API
and the worker run as deployed (child processes, DEBUG logging) through a job with a signed webhook and a
few refused requests, and every line they logged is searched for every marker.

The secrets are found by name among the settings, and kept when this version of the gateway accepts them at
start-up, so each secret setting a later version adds (or stops refusing) is covered without changing this."""

from __future__ import annotations

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


def accepted_secrets() -> dict[str, str]:
    """Setting name (upper case) → a marker value, for every secret setting this version accepts. A list
    setting in `key:role` form (API_KEYS) gets its marker with a role."""
    secrets: dict[str, str] = {}
    for name in Settings.model_fields:
        if not any(word in name for word in _SECRET_WORDS):
            continue
        marker = f"MARKER{uuid.uuid4().hex}{name.upper()}"
        for value in (marker, f"{marker}:admin"):
            try:
                Settings(_env_file=None, **{name: value})
            except ValidationError:
                continue
            secrets[name.upper()] = value
            break
    return secrets


def test_the_secret_settings_are_found() -> None:
    names = {name for name in Settings.model_fields if any(word in name for word in _SECRET_WORDS)}
    assert {"webhook_secret", "s3_secret_key", "s3_access_key", "api_keys", "jwt_secret"} <= names
    assert "WEBHOOK_SECRET" in accepted_secrets()


async def test_no_secret_reaches_a_log_line(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    secrets = accepted_secrets()
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue)
    migrate_database(settings)
    variables = {**secrets, "LOG_LEVEL": "DEBUG", "WEBHOOK_ALLOWED_DOMAINS": "127.0.0.1"}
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
        key = secrets.get("API_KEYS", "").partition(":")[0]
        good = {"X-API-Key": key} if key else {}
        forged = jwt.encode({"sub": "mallory", "role": "admin", "exp": 4102444800}, "not-the-secret" * 4)
        async with serve_locally(receiver) as hook_url, httpx.AsyncClient(
            base_url=api.url, timeout=30, headers=good
        ) as client:
            submitted = await client.post("/jobs", json={
                "workflowId": "solid_color", "inputs": {"width": 64, "height": 64}, "callbackUrl": f"{hook_url}/hook"})
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
            assert (await wait_for_job(client, job_id, until={"succeeded"}))["status"] == "succeeded"
            await assert_eventually(lambda: deliveries, what="the job's webhook")
    finally:
        api.stop()
        worker.stop()

    logs = {path.name: path.read_text(errors="replace") for path in (tmp_path / "api.log", tmp_path / "worker.log")}
    assert job_id in logs["worker.log"] and "POST /jobs" in logs["api.log"]  # both logged what they did
    for log_name, text in logs.items():
        for line_number, line in enumerate(text.splitlines(), 1):
            leaked = [name for name, value in secrets.items() if value.partition(":")[0] in line]
            assert not leaked, f"{log_name}:{line_number} holds {leaked}: {line[:300]}"
