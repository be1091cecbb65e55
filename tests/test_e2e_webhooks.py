"""Webhooks end to end: API → Temporal (real dev server) → worker → ComfyUI simulator → a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import pytest
from aiohttp import web
from standardwebhooks import Webhook
from temporalio.client import Client

from tests.harness import DONE, Gateway, assert_eventually, free_port, serve_locally, wait_for_job
from worker.reconciler import RECONCILE_EVERY_SECONDS

SECRET = "a raw secret of the operator's"
WEBHOOKS = pytest.mark.settings(
    webhook_secret=SECRET, webhook_allowed_domains="127.0.0.1", webhook_retry_first_interval_s=0.2,
    webhook_progress_interval_s=0.2,
)


class FlakyReceiver:
    """Fails the first `failures` final events with 500, then takes them; always takes progress events."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.final: list[tuple[dict[str, str], bytes]] = []
        self.progress: list[dict] = []

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            payload = Webhook(SECRET.encode()).verify(body, dict(request.headers))  # refuses a bad signature
            if payload["event"] == "job.progress":
                self.progress.append(payload)
                return web.Response(status=202)
            self.final.append((dict(request.headers), body))
            return web.Response(status=500 if len(self.final) <= self.failures else 200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        return app


@WEBHOOKS
async def test_a_flaky_receiver_is_retried_until_it_takes_the_signed_webhook(gateway: Gateway) -> None:
    receiver = FlakyReceiver(failures=2)
    async with serve_locally(receiver.app()) as url:
        job_id = await gateway.submit({
            "workflowJson": gateway.comfyui.slow_prompt(1.5), "metadata": {"order": 7, "ratio": 1.0},
            "callbackUrl": f"{url}/hook", "webhookEvents": ["job.succeeded", "job.progress"],
        })
        job = await wait_for_job(gateway.api, job_id, until=DONE)
        assert job["status"] == "succeeded", job

        async def delivered() -> dict:
            webhook = (await gateway.api.get(f"/jobs/{job_id}")).json()["webhook"]
            assert webhook == {"delivered": True, "attempts": 3, "lastStatus": 200}
            return webhook

        await assert_eventually(delivered, timeout=20, what="the webhook delivered on its third attempt")

    assert len(receiver.final) == 3 and len({body for _, body in receiver.final}) == 1
    headers, body = receiver.final[-1]
    assert {h["webhook-id"] for h, _ in receiver.final} == {f"{job_id}:webhook:job.succeeded"}
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Signature"] == expected
    payload = json.loads(body)
    assert json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() == body
    assert payload["event"] == "job.succeeded" and payload["jobId"] == job_id and payload["status"] == "succeeded"
    assert payload["metadata"] == {"order": 7, "ratio": 1} and payload["error"] is None
    assert payload["timing"]["completedAt"] and "inputs" not in payload
    [output] = payload["result"]["outputs"]
    [public] = job["outputs"]
    assert output["url"] == f"http://127.0.0.1:3000{public['url']}" and output["sha256"] == public["sha256"]

    # Progress came while the prompt ran: best effort, throttled, each with its own id, never the final one.
    assert receiver.progress, "no job.progress webhook arrived"
    assert all(p["status"] in ("queued", "running") and "percent" in p["progress"] for p in receiver.progress)
    executing = [p for p in receiver.progress if p["progress"]["percent"] > 0 or p["progress"]["node"]]
    assert all(p["status"] == "running" for p in executing) and all(p["progress"]["at"].endswith("Z") for p in receiver.progress)

    logs = (await gateway.api.get(f"/jobs/{job_id}/logs")).json()["events"]
    attempts = [event["data"] for event in logs if event["kind"] == "webhook"]
    assert [(a["attempt"], a["statusCode"], a["delivered"]) for a in attempts] == [
        (1, 500, False), (2, 500, False), (3, 200, True)]
    assert all(a["latencyMs"] >= 0 for a in attempts) and SECRET not in json.dumps(logs)


@WEBHOOKS
async def test_a_dead_receiver_never_changes_the_job(gateway: Gateway) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    job_id = await gateway.submit({"workflowId": "solid_color", "inputs": {"width": 8}, "callbackUrl": dead})
    job = await wait_for_job(gateway.api, job_id, until=DONE)
    assert job["status"] == "succeeded", job

    async def tried_again() -> dict:
        webhook = (await gateway.api.get(f"/jobs/{job_id}")).json()["webhook"]
        assert webhook and webhook["attempts"] >= 3 and not webhook["delivered"] and webhook["lastStatus"] is None
        return webhook

    await assert_eventually(tried_again, timeout=20, what="three refused attempts")
    after = (await gateway.api.get(f"/jobs/{job_id}")).json()
    assert after["status"] == "succeeded" and after["outputs"] == job["outputs"]
    refused = [e for e in (await gateway.api.get(f"/jobs/{job_id}/logs")).json()["events"] if e["kind"] == "webhook"]
    assert refused[0]["data"]["error"].startswith("ConnectError")


@WEBHOOKS
async def test_cancelled_jobs_send_job_cancelled_whoever_cancelled_them(gateway: Gateway, temporal_client: Client) -> None:
    receiver = FlakyReceiver(failures=0)
    async with serve_locally(receiver.app()) as url:
        by_api, by_temporal, terminated = [
            await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(20), "callbackUrl": f"{url}/hook"})
            for _ in range(3)
        ]
        for job_id in (by_api, by_temporal, terminated):
            await wait_for_job(gateway.api, job_id, until={"running", "queued"})
        await gateway.api.post(f"/jobs/{by_api}/cancel", json={"reason": "changed my mind"})
        await temporal_client.get_workflow_handle(by_temporal).cancel()  # the Web UI's or the CLI's cancel
        # Terminated: the job's workflow never runs again; the worker's reconciler closes its row and sends it.
        await temporal_client.get_workflow_handle(terminated).terminate(reason="stuck")

        async def all_sent() -> set[str]:
            sent = {json.loads(body)["jobId"] for _, body in receiver.final}
            assert sent == {by_api, by_temporal, terminated}
            return sent

        await assert_eventually(all_sent, timeout=30, what="a job.cancelled webhook for each job")
        await asyncio.sleep(1.5 * RECONCILE_EVERY_SECONDS)  # a later scan finds the terminated job again: no second webhook
    assert len(receiver.final) == 3
    codes = {}
    for headers, body in receiver.final:
        payload = json.loads(body)
        assert payload["event"] == "job.cancelled" and payload["status"] == "cancelled"
        assert payload["result"] == {"outputs": []} and headers["webhook-id"] == f"{payload['jobId']}:webhook:job.cancelled"
        codes[payload["jobId"]] = payload["error"]["code"]
    assert codes == {by_api: "JOB_CANCELLED", by_temporal: "JOB_CANCELLED", terminated: "JOB_TERMINATED"}
    [ended] = [json.loads(body) for _, body in receiver.final if json.loads(body)["jobId"] == terminated]
    job = (await gateway.api.get(f"/jobs/{terminated}")).json()
    assert "stuck" in ended["error"]["message"] and ended["timing"]["completedAt"] and job["status"] == "cancelled"
    assert job["webhook"] == {"delivered": True, "attempts": 1, "lastStatus": 200}
