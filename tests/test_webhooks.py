"""Webhook bodies, signatures and targets, without Temporal: what a receiver verifies, and where a webhook may go.
The submit-time refusals run on the API alone (no worker; any use of Temporal fails the test)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import httpx
import pytest
from standardwebhooks import Webhook
from temporalio.testing import ActivityEnvironment

from activities.delivery import Attempt
from activities.progress_webhooks import ProgressWebhooks
from api.job_views import Job, JobTiming, OutputFile
from api.routes.jobs import WebhookEvent
from app.models import JobError, JobState, JobStatus, OutputRef, ProgressWebhook, PromptProgress
from app.safe_http import RefusedTarget, refusal_reason
from app.storage import LocalStorage
from app.webhooks.events import EVENTS
from app.webhooks.payload import compact_json, webhook_body
from app.webhooks.signing import WebhookSigner
from app.webhooks.targets import check_callback_url, resolve_callback
from tests.harness import api_alone, api_alone_settings, asgi_client, error_of

STANDARD_SECRET = "whsec_" + base64.b64encode(b"a key of thirty-two bytes, exact").decode()
BODY_VALUES = {
    "event": "job.succeeded", "jobId": "j", "metadata": {"name": "Zoë ✓ 画像", "ratio": 1.0, "half": 0.5, "n": 3,
                                                          "big": 1e16, "nested": [2.0, {"x": -0.0}]},
}
# Numbers Python's json writes otherwise than JavaScript does: exponents, large and small.
JAVASCRIPT_NUMBERS = {"a": 1e-7, "b": 1e21, "h": 1.5e300, "i": 2.5e-5, "j": 1e-5, "k": 123456789012345680000.0,
                      "m": -1.5e-300, "p": 0.1, "q": 5e-324}


def receivers_reserialise(body: str) -> dict[str, str]:
    """The body as n8n-like receivers write it again after parsing it: Python's json, and JavaScript's."""
    again = {"python": json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False)}
    if node := shutil.which("node"):
        again["javascript"] = subprocess.run(
            [node, "-e", "process.stdout.write(JSON.stringify(JSON.parse(require('fs').readFileSync(0, 'utf8'))))"],
            input=body.encode(), capture_output=True, check=True,
        ).stdout.decode()
    return again


def test_the_body_is_compact_and_reserialises_to_the_same_bytes() -> None:
    body = compact_json(BODY_VALUES)
    assert " " not in body.replace("Zoë ✓ 画像", "") and "Zoë ✓ 画像" in body  # no spaces, UTF-8 as it is
    assert '"ratio":1,' in body and '"half":0.5' in body and '"big":10000000000000000' in body
    for receiver, again in receivers_reserialise(body).items():
        assert again == body, receiver


def test_numbers_are_written_as_javascript_writes_them() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")  # the check is JavaScript's own serialiser
    body = compact_json({"metadata": JAVASCRIPT_NUMBERS})
    assert body == ('{"metadata":{"a":1e-7,"b":1e+21,"h":1.5e+300,"i":0.000025,"j":0.00001,'
                    '"k":123456789012345680000,"m":-1.5e-300,"p":0.1,"q":5e-324}}')
    again = receivers_reserialise(body)
    assert again["javascript"] == body
    # What the README says of Python: the same bytes but for numbers below 1e-4 in size.
    assert again["python"] == body.replace("1e-7", "1e-07").replace("0.000025", "2.5e-05").replace("0.00001", "1e-05")


def test_the_api_takes_every_event_there_is() -> None:
    assert get_args(WebhookEvent) == EVENTS


def test_the_body_shows_the_job_as_the_api_does(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    state = JobState(
        job_id="j", status=JobStatus.failed, template_id="t", created_at=now, completed_at=now, metadata={"a": 1},
        error=JobError(code="COMFYUI_OOM", message="out of memory"),
        outputs=[OutputRef(filename="x.png", storage_key="j/0/x.png", size=1, sha256="0", content_type="image/png",
                           node_id="9")],
    )
    body = webhook_body("job.failed", state, LocalStorage(tmp_path), "https://gw.example")
    assert set(body) == {"event", "jobId", "status", "workflowId", "result", "error", "metadata", "timing"}
    [output] = body["result"]["outputs"]
    assert set(output) == {field.alias for field in OutputFile.model_fields.values()}
    assert output["url"] == "https://gw.example/outputs/j/x.png"
    assert set(body["timing"]) == {field.alias for field in JobTiming.model_fields.values()}
    assert body["timing"]["createdAt"] == JobTiming(created_at=now).model_dump(mode="json")["createdAt"]
    assert body["error"] == {"code": "COMFYUI_OOM", "message": "out of memory", "details": {}}
    assert {"error", "metadata", "workflowId"} <= {field.alias for field in Job.model_fields.values()}


@pytest.mark.parametrize("secret", [STANDARD_SECRET, "a plain secret, used as it is"])
def test_both_signatures_verify_over_the_bytes_sent(secret: str) -> None:
    body = compact_json(BODY_VALUES)
    headers = WebhookSigner(secret).headers("job-1:webhook:job.succeeded", body, datetime.now(timezone.utc))
    # Standard Webhooks, with the package, given the secret as the receiver has it.
    key: str | bytes = secret if secret.startswith("whsec_") else secret.encode()
    assert Webhook(key).verify(body.encode(), headers) == json.loads(body)
    # A plain HMAC receiver: the same key (whsec_: its base64-decoded bytes; else the string itself).
    raw_key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    expected = "sha256=" + hmac.new(raw_key, body.encode(), hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Signature"], expected)
    # n8n's way: the parsed body serialised again is what was signed.
    again = receivers_reserialise(body)["python"].encode()
    assert "sha256=" + hmac.new(raw_key, again, hashlib.sha256).hexdigest() == headers["X-Signature"]
    assert secret not in repr(WebhookSigner(secret))


def test_a_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="not base64"):
        WebhookSigner("whsec_not base64!")


@pytest.mark.parametrize(("address", "reason"), [
    ("100.64.0.1", "carrier-grade NAT"), ("64:ff9b::a00:1", "NAT64"), ("169.254.169.254", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"), ("10.0.0.1", "private"), ("::ffff:127.0.0.1", "loopback"),
    ("fe80::1", "link-local"), ("8.8.8.8", None),
    # Counted global by Python's ipaddress, yet not public.
    ("2002:7f00:1::", "6to4 of a non-public"), ("2002:a00:1::1", "6to4 of a non-public"), ("2002:808:808::", None),
    ("192.0.0.8", "IETF protocol assignment"), ("192.0.0.9", "IETF protocol assignment"),
])
def test_address_ranges_the_gateway_refuses(address: str, reason: str | None) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(("url", "allowed", "refused"), [
    ("https://hooks.example.com/x", ["example.com"], None),  # a subdomain of a listed domain
    ("https://example.com/x", ["example.com"], None),
    ("https://badexample.com/x", ["example.com"], "not in WEBHOOK_ALLOWED_DOMAINS"),
    ("https://example.org/x", ["example.com"], "not in WEBHOOK_ALLOWED_DOMAINS"),
    ("ftp://example.com/x", ["*"], "only http and https"),
    ("http://10.0.0.5/x", ["*"], "private address"),
    ("http://127.0.0.1:9/x", ["*"], "loopback address"),
    ("http://2130706433/x", ["*"], "loopback address"),  # 127.0.0.1 in another spelling
    ("http://[::1]/x", ["*"], "loopback address"),
    ("http://169.254.169.254/latest", ["*"], "cloud metadata"),
    ("http://127.0.0.1:9/x", ["127.0.0.1"], None),  # listed exactly: the operator means it
    ("https://user:pw@example.com/x", ["*"], "credentials"),
    ("https://example.com/x", [], "switched off"),
    ("http://127.0.0.1:99999/x", ["127.0.0.1"], "port"),
    ("http://127.0.0.1:65536/x", ["127.0.0.1"], "port"),
    ("http://127.0.0.1:0/x", ["127.0.0.1"], "port"),
    ("http://127.0.0.1:-1/x", ["127.0.0.1"], "port"),
    ("http://example.com:/x", ["*"], "port"),
    ("http://127.0.0.1.:9/x", ["*"], "loopback address"),  # the DNS root's dot: still 127.0.0.1
    ("http://127.0.0.1.:9/x", ["127.0.0.1"], None),
    ("http://[2002:7f00:1::]/x", ["*"], "6to4"),
    ("http://192.0.0.8/x", ["*"], "IETF protocol assignment"),
])
def test_where_a_callback_url_may_go(url: str, allowed: list[str], refused: str | None) -> None:
    if refused is None:
        check_callback_url(url, allowed)
    else:
        with pytest.raises(RefusedTarget, match=refused):
            check_callback_url(url, allowed)


def test_a_trailing_dot_is_dropped_from_the_host_checked_and_reached() -> None:
    url = check_callback_url("https://Hooks.Example.com.:8443/h?x=1", ["example.com"])
    assert url.host == "hooks.example.com" and url.port == 8443 and str(url) == "https://hooks.example.com:8443/h?x=1"


async def test_a_host_that_resolves_to_loopback_is_reached_only_when_listed_exactly() -> None:
    url = httpx.URL("http://localhost:9/hook")
    check_callback_url(str(url), ["*"])  # nothing to tell at submit: the name is resolved at each delivery
    with pytest.raises(RefusedTarget, match="resolves to .*loopback"):
        await resolve_callback(url, ["*"])
    assert await resolve_callback(url, ["localhost"])


# --- at submit -----------------------------------------------------------------------------------------------

@pytest.fixture
async def webhook_api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = api_alone_settings(
        tmp_path, webhook_secret=STANDARD_SECRET, webhook_allowed_domains="example.com,127.0.0.1")
    async with api_alone(settings) as app, asgi_client(app) as client:
        yield client


@pytest.mark.parametrize(("fields", "message"), [
    ({"callbackUrl": "http://10.1.2.3/hook"}, "not in WEBHOOK_ALLOWED_DOMAINS"),
    ({"callbackUrl": "https://evil.test/hook"}, "not in WEBHOOK_ALLOWED_DOMAINS"),
    ({"callbackUrl": "file:///etc/passwd"}, "only http and https"),
    ({"callbackUrl": "javascript:alert(1)"}, "only http and https"),
    ({"callbackUrl": "https://example.com/h", "webhookEvents": ["job.started"]}, "job.succeeded"),
    ({"webhookEvents": ["job.progress"]}, "needs a callbackUrl"),
    ({"callbackUrl": "http://127.0.0.1:99999/x"}, "port"),
    ({"callbackUrl": "http://127.0.0.1:0/x"}, "port"),
    ({"callbackUrl": "http://example.com:/x"}, "port"),
    # JavaScript parses 2^53 as 2^53 but 2^53 + 1 as 2^53 too: the signature check of the re-serialised body fails.
    ({"callbackUrl": "https://example.com/h", "metadata": {"ok": 2**53 - 1, "big": 2**53 + 1}}, "JavaScript"),
    ({"callbackUrl": "https://example.com/h", "metadata": {"list": [1, {"n": -(2**63)}]}}, "JavaScript"),
])
async def test_a_refused_callback_is_a_400_naming_it(webhook_api: httpx.AsyncClient, fields: dict, message: str) -> None:
    response = await webhook_api.post("/jobs", json={"workflowId": "solid_color", **fields})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR"
    [issue] = error["details"]["fields"]
    assert issue["field"].startswith(("callbackUrl", "webhookEvents", "metadata")) and message in issue["message"], issue
    if "metadata" in fields:
        assert issue["field"] in ("metadata.big", "metadata.list[1].n")
    assert (await webhook_api.get("/jobs")).json()["count"] == 0


async def test_big_integers_are_taken_in_the_metadata_of_a_job_without_webhooks(
    webhook_api: httpx.AsyncClient,
) -> None:
    response = await webhook_api.post("/jobs", json={"workflowId": "nope", "metadata": {"big": 2**60}})
    assert error_of(response)["code"] == "WORKFLOW_NOT_FOUND"  # past the metadata checks


# --- progress webhooks ---------------------------------------------------------------------------------------

class RecordingPoster:
    """Takes every post at once, keeping its body."""

    def __init__(self) -> None:
        self.bodies: asyncio.Queue[dict] = asyncio.Queue()

    async def post(self, callback_url: str, webhook_id: str, body: str, *, timeout: float,
                   request_id: str | None = None) -> Attempt:
        self.bodies.put_nowait(json.loads(body))
        return Attempt(status_code=200, latency_ms=1)


async def test_a_progress_webhook_that_cannot_be_built_is_dropped_without_failing_the_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_body(*_: object, **__: object) -> dict:
        raise ValueError("a body that cannot be made")

    monkeypatch.setattr("activities.progress_webhooks.webhook_body", broken_body)
    poster = RecordingPoster()
    webhook = ProgressWebhook(callback_url="https://example.com/h", created_at=datetime.now(timezone.utc))

    async def follow_prompt() -> None:
        hooks = ProgressWebhooks(poster, LocalStorage(tmp_path), "https://gw.example", 0.0, "j", webhook)  # type: ignore[arg-type]
        hooks.offer(PromptProgress(prompt_id="p", submitted=True, percent=10, node="5"))
        await asyncio.sleep(0.05)
        await hooks.close()  # raised the body's error into run_prompt before

    await ActivityEnvironment().run(follow_prompt)
    assert poster.bodies.empty()


async def test_progress_says_running_once_comfyui_executes_and_stops_at_a_cancel(tmp_path: Path) -> None:
    poster = RecordingPoster()
    environment = ActivityEnvironment()
    webhook = ProgressWebhook(callback_url="https://example.com/h", created_at=datetime.now(timezone.utc))

    async def follow_prompt() -> list[dict]:
        hooks = ProgressWebhooks(poster, LocalStorage(tmp_path), "https://gw.example", 0.0, "j", webhook)  # type: ignore[arg-type]
        sent = []
        for progress in (PromptProgress(prompt_id="p", submitted=True, queue_position=2),
                         PromptProgress(prompt_id="p", submitted=True, queue_position=0, percent=33, node="5")):
            hooks.offer(progress)
            sent.append(await asyncio.wait_for(poster.bodies.get(), 5))
        environment.cancel()  # what the heartbeat brings back when the job's cancel was asked for
        with suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        hooks.offer(PromptProgress(prompt_id="p", submitted=True, percent=66, node="6"))
        await asyncio.sleep(0)
        await hooks.close()
        return sent

    queued, running = await environment.run(follow_prompt)
    assert poster.bodies.empty(), "a progress webhook went out after the cancel"
    assert (queued["status"], queued["progress"]["queuePosition"]) == ("queued", 2)
    assert (running["status"], running["progress"]["percent"], running["progress"]["node"]) == ("running", 33, "5")
    at = running["progress"]["at"]
    assert at.endswith("Z") and datetime.fromisoformat(at.replace("Z", "+00:00")).tzinfo is not None
    assert running["timing"]["createdAt"].endswith("Z")
