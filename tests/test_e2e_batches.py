"""Batches end to end: API → Temporal (real dev server) → worker → ComfyUI simulator, and the API alone for the
requests it refuses before anything starts."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from app.batch_store import close_ended_batch, ended_items_tally, get_batch, item_rows, record_batch
from app.batches import BatchInput, BatchState, BatchStatus, BatchTally, RecordBatchInput
from app.models import JobStatus
from app.tables import JobRow
from app.db import make_engine, session_scope
from workflows_temporal.batch import BatchWorkflow
from tests.harness import (
    Gateway,
    api_alone,
    api_alone_settings,
    asgi_client,
    assert_eventually,
    error_of,
    recorded_workflow,
    serve_locally,
)
from tests.test_auth import ADMIN, ALICE_KEY, API_KEYS, BOB

SECRET = "the batch receiver's secret"
FINAL = {"completed", "cancelled"}


def items(count: int) -> list[dict[str, Any]]:
    """Fast prompts: tiny solid images, each its own colour."""
    return [{"width": 8, "height": 8, "color": index} for index in range(count)]


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.request_ids: list[str | None] = []

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            self.bodies.append(Webhook(SECRET.encode()).verify(body, dict(request.headers)))
            self.ids.append(request.headers["webhook-id"])
            self.request_ids.append(request.headers.get("X-Request-ID"))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        return app


async def submit(api: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    response = await api.post("/batches", json=body, headers=headers)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["count"] == len(body["items"])
    return accepted["batchId"]


async def wait_for_batch(api: httpx.AsyncClient, batch_id: str, until: Any, timeout: float = 60) -> dict[str, Any]:
    async def batch_now() -> dict[str, Any]:
        response = await api.get(f"/batches/{batch_id}")
        assert response.status_code == 200, response.text
        batch = response.json()
        assert until(batch), batch
        return batch

    return await assert_eventually(batch_now, timeout=timeout, what=f"batch {batch_id}")


async def runs_of(client: Client, batch_id: str) -> list[int]:
    """The history length of each run of the batch's workflow (continue-as-new starts a run)."""
    lengths = []
    async for execution in client.list_workflows(f'WorkflowId="{batch_id}"'):
        history = await client.get_workflow_handle(batch_id, run_id=execution.run_id).fetch_history()
        lengths.append(len(history.events))
    return lengths


@pytest.mark.settings(batch_max_parallel=2, batch_items_per_run=4, webhook_secret=SECRET,
                      webhook_allowed_domains="127.0.0.1", api_keys=API_KEYS)
async def test_a_batch_runs_each_item_as_a_job_and_sends_one_webhook(gateway: Gateway, temporal_client: Client) -> None:
    gateway.api.headers["X-API-Key"] = ALICE_KEY  # the batch is alice's, and so are its jobs
    receiver = Receiver()
    async with serve_locally(receiver.app()) as url:
        batch_id = await submit(gateway.api, {
            "workflowId": "solid_color", "items": items(6), "priority": "low", "callbackUrl": f"{url}/hook",
            "metadata": {"run": "nightly"},
        }, headers={"X-Request-ID": "nightly-batch"})
        batch = await wait_for_batch(gateway.api, batch_id, lambda batch: batch["status"] in FINAL)
        await assert_eventually(lambda: _one(receiver.bodies), what="the batch.completed webhook")

    assert batch["status"] == "completed" and batch["progress"] == 100 and batch["priority"] == 5
    assert batch["counts"] == {"queued": 0, "running": 0, "succeeded": 6, "failed": 0, "cancelled": 0}
    assert batch["metadata"] == {"run": "nightly"} and batch["timing"]["completedAt"] is not None
    [body] = receiver.bodies
    assert receiver.ids == [f"{batch_id}:webhook:batch.completed"]
    assert receiver.request_ids == ["nightly-batch"]  # the batch's request, through its workflow (and continue-as-new)
    assert body["event"] == "batch.completed" and body["batchId"] == batch_id and body["status"] == "completed"
    assert body["counts"]["succeeded"] == 6
    assert (await gateway.api.get(f"/batches/{batch_id}")).json()["webhook"]["delivered"] is True

    # Its items are ordinary jobs: listed by the batch and by `GET /jobs?batchId=`, each with its outputs.
    listed = (await gateway.api.get(f"/batches/{batch_id}/jobs", params={"limit": 200})).json()
    assert listed["count"] == 6
    by_list = (await gateway.api.get("/jobs", params={"batchId": batch_id})).json()
    assert {job["jobId"] for job in by_list["jobs"]} == {job["jobId"] for job in listed["jobs"]}
    for job in listed["jobs"]:
        assert job["batchId"] == batch_id and job["status"] == "succeeded" and job["metadata"] == {"run": "nightly"}
        assert job["workflowId"] == "solid_color" and len(job["outputs"]) == 1
    one = (await gateway.api.get(f"/jobs/{listed['jobs'][0]['jobId']}")).json()
    assert one["batchId"] == batch_id and one["owner"] == batch["owner"]

    # Another caller sees neither the batch nor its jobs, as if they did not exist.
    for method, path in [("GET", f"/batches/{batch_id}"), ("GET", f"/batches/{batch_id}/jobs"),
                         ("POST", f"/batches/{batch_id}/cancel"), ("GET", f"/jobs/{one['jobId']}")]:
        response = await gateway.api.request(method, path, headers=BOB)
        assert response.status_code == 404, (method, path, response.text)
    assert (await gateway.api.get("/jobs", params={"batchId": batch_id}, headers=BOB)).json()["count"] == 0

    # 6 items, 4 a run: the workflow continued as new once.
    assert len(await runs_of(temporal_client, batch_id)) == 2

    # An item that fails is counted, and the batch still completes.
    failing = {"id": "failing_items", "name": "Fails", "workflowJson": recorded_workflow("fail.json")}
    assert (await gateway.api.post("/workflows", json=failing, headers=ADMIN)).status_code == 201
    failed_id = await submit(gateway.api, {"workflowId": "failing_items", "items": [{}]})
    failed = await wait_for_batch(gateway.api, failed_id, lambda batch: batch["status"] in FINAL)
    assert failed["status"] == "completed" and failed["counts"]["failed"] == 1
    [job] = (await gateway.api.get(f"/batches/{failed_id}/jobs")).json()["jobs"]
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_OOM"  # what TestFail raises


def _one(bodies: list[Any]) -> bool:
    assert len(bodies) == 1, bodies
    return True


def sleepy_template(gateway: Gateway) -> dict[str, Any]:
    """A template whose items say how long they run: `seconds` of simulated time (0: at once)."""
    prompt = gateway.comfyui.slow_prompt(0)
    prompt["2"]["inputs"].update(seconds="{{seconds}}", steps=1)
    return {"id": "sleepy_items", "name": "Sleepy", "workflowJson": prompt,
            "inputSchema": {"type": "object", "fields": {"seconds": {"type": "number", "min": 0, "default": 0}}}}


# Two runs of the batch's workflow: one of fast items, then continued as new, the one it is cancelled in, whose first
# items (as many as may run at once) are slow and still running then. The other 188 items never start.
_PER_RUN, _PARALLEL, _FAST = 8, 4, 8


@pytest.mark.settings(batch_max_parallel=_PARALLEL, batch_items_per_run=_PER_RUN, max_concurrency=4,
                      api_keys=API_KEYS)
async def test_a_200_item_batch_is_cancelled_midway(gateway: Gateway, temporal_client: Client) -> None:
    assert (await gateway.api.post("/workflows", json=sleepy_template(gateway), headers=ADMIN)).status_code == 201
    gateway.api.headers["X-API-Key"] = ALICE_KEY  # alice's batch, which an admin cancels
    body = [{"seconds": 0}] * _FAST + [{"seconds": 600}] * (200 - _FAST)
    batch_id = await submit(gateway.api, {"workflowId": "sleepy_items", "items": body})

    async def midway() -> dict[str, Any]:
        batch = (await gateway.api.get(f"/batches/{batch_id}")).json()
        started = (await gateway.api.get(f"/batches/{batch_id}/jobs", params={"limit": 1})).json()["count"]
        # The first run's fast items done; the second run's slow items started (at most _PARALLEL), one running.
        assert batch["counts"]["succeeded"] == _FAST and batch["counts"]["running"] >= 1, batch
        assert started == _FAST + _PARALLEL, started
        return batch

    seen = await assert_eventually(midway, timeout=60, what=f"batch {batch_id} midway")
    assert sum(seen["counts"].values()) == 200 and seen["status"] == "running"

    response = await gateway.api.post(f"/batches/{batch_id}/cancel", json={"reason": "enough"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    [entry] = (await gateway.api.get("/audit", headers=ADMIN, params={"action": "batch.cancel"})).json()["entries"]
    assert entry["target"] == batch_id and entry["details"] == {"owner": "alice", "reason": "enough"}

    batch = (await gateway.api.get(f"/batches/{batch_id}")).json()
    assert batch["status"] == "cancelled" and batch["progress"] == 100 and "enough" in batch["cancelReason"]
    # The running items cancelled, and the items not started never start: they count as cancelled.
    assert batch["counts"] == {"queued": 0, "running": 0, "succeeded": _FAST, "failed": 0, "cancelled": 200 - _FAST}

    # Every item that started is a job that ended; the items never started have no job at all.
    listed = (await gateway.api.get(f"/batches/{batch_id}/jobs", params={"limit": 200})).json()
    assert listed["count"] == _FAST + _PARALLEL
    statuses = [job["status"] for job in listed["jobs"]]
    assert statuses.count("succeeded") == _FAST and statuses.count("cancelled") == _PARALLEL
    engine = make_engine(gateway.settings.resolved_database_url)
    with session_scope(engine) as session:
        rows = sum(item_rows(session, batch_id).by_status.values())
    engine.dispose()
    assert rows == listed["count"]
    # Each item that was running is cancelled as the API cancels a job: its workflow ends Canceled, and its job
    # reads cancelled with the batch's reason and who cancelled it.
    await assert_items_canceled(
        temporal_client, batch_id, [job for job in listed["jobs"] if job["status"] == "cancelled"], "enough")
    # ComfyUI holds none of the batch's prompts any more: the slow ones running were stopped.
    async with httpx.AsyncClient() as comfy:
        queue = (await comfy.get(f"{gateway.comfyui.url}/queue")).json()
    assert not [entry for entry in queue["queue_running"] + queue["queue_pending"]
                if str(entry[3].get("gateway_job_id", "")).startswith(batch_id)]
    assert (await gateway.api.post(f"/batches/{batch_id}/cancel")).status_code == 409

    # Continue-as-new: 200 items in runs of at most _PER_RUN, each run's history in proportion to its items (not
    # to the batch's 200), the cancelled run's included.
    lengths = await runs_of(temporal_client, batch_id)
    assert len(lengths) == 2 and max(lengths) < _PER_RUN * 12, lengths


@pytest.mark.settings(batch_max_parallel=2)
async def test_a_batch_cancelled_in_temporal_ends_canceled_and_cancels_its_items(
    gateway: Gateway, temporal_client: Client,
) -> None:
    slow = {"id": "slow_items", "name": "Slow", "workflowJson": gateway.comfyui.slow_prompt(20)}
    assert (await gateway.api.post("/workflows", json=slow)).status_code == 201
    batch_id = await submit(gateway.api, {"workflowId": "slow_items", "items": [{}, {}, {}]})
    await wait_for_batch(gateway.api, batch_id, lambda batch: batch["counts"]["running"] >= 1)
    for path in (f"/jobs/{batch_id}", f"/jobs/{batch_id}/events"):  # a batch's id is not a job's
        answer = await gateway.api.get(path)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "JOB_NOT_FOUND", answer.text

    handle = temporal_client.get_workflow_handle(batch_id)
    await handle.cancel()  # as an operator does in the Web UI
    batch = await wait_for_batch(gateway.api, batch_id, lambda batch: batch["status"] in FINAL, timeout=30)
    assert batch["status"] == "cancelled" and "temporal" in batch["cancelReason"]
    assert batch["counts"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 3}
    # The row's final status is the workflow's last record: the workflow closes a moment after writing it.
    async def closed_as_canceled() -> bool:
        return (await handle.describe()).status is WorkflowExecutionStatus.CANCELED
    await assert_eventually(closed_as_canceled, timeout=10, what="the batch's workflow closed as canceled")
    jobs = (await gateway.api.get(f"/batches/{batch_id}/jobs")).json()["jobs"]
    assert len(jobs) == 2  # the third never started
    assert {job["status"] for job in jobs} == {"cancelled"}
    await assert_items_canceled(temporal_client, batch_id, jobs, "cancelled through Temporal")


@pytest.mark.settings(batch_max_parallel=2, webhook_secret=SECRET, webhook_allowed_domains="127.0.0.1")
async def test_a_batch_terminated_in_temporal_is_closed_as_cancelled_by_the_reconciler(
    gateway: Gateway, temporal_client: Client,
) -> None:
    """Terminate gives the batch's workflow no chance to write its end: the worker's reconciler closes its row once
    its items (cancelled by Temporal, their parent close policy) have ended, and sends its webhook."""
    slow = {"id": "slow_items", "name": "Slow", "workflowJson": gateway.comfyui.slow_prompt(20)}
    assert (await gateway.api.post("/workflows", json=slow)).status_code == 201
    receiver = Receiver()
    async with serve_locally(receiver.app()) as url:
        batch_id = await submit(gateway.api, {"workflowId": "slow_items", "items": [{}, {}, {}],
                                              "callbackUrl": f"{url}/hook"})
        await wait_for_batch(gateway.api, batch_id, lambda batch: batch["counts"]["running"] >= 1)
        await temporal_client.get_workflow_handle(batch_id).terminate(reason="stuck, says the operator")
        batch = await wait_for_batch(gateway.api, batch_id, lambda batch: batch["status"] in FINAL, timeout=20)
        await assert_eventually(lambda: _one(receiver.bodies), what="the batch.completed webhook")

    assert batch["status"] == "cancelled" and batch["progress"] == 100
    assert batch["cancelReason"] == "terminated in Temporal: stuck, says the operator"
    assert batch["counts"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 3}
    assert batch["timing"]["completedAt"] is not None
    jobs = (await gateway.api.get(f"/batches/{batch_id}/jobs")).json()["jobs"]
    assert jobs and {job["status"] for job in jobs} == {"cancelled"}  # the third never started
    [body] = receiver.bodies
    assert body["event"] == "batch.completed" and body["status"] == "cancelled" and body["counts"]["cancelled"] == 3
    assert body["cancelReason"] == batch["cancelReason"]
    again = await gateway.api.post(f"/batches/{batch_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "BATCH_ALREADY_FINISHED"


async def assert_items_canceled(client: Client, batch_id: str, jobs: list[dict[str, Any]], reason: str) -> None:
    """The batch's cancelled items: each job reads cancelled with the batch's reason, and its workflow ended as
    Canceled (not Completed), as a job cancelled through the API does."""
    for job in jobs:
        assert job["status"] == "cancelled" and job["error"]["code"] == "JOB_CANCELLED", job
        assert batch_id in job["error"]["message"] and reason in job["error"]["message"], job["error"]
        described = await client.get_workflow_handle(job["jobId"]).describe()
        assert described.status is WorkflowExecutionStatus.CANCELED, (job["jobId"], described.status)


# --- the API alone: refused before anything starts ---------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_alone(api_alone_settings(tmp_path, max_batch_items=5)) as app, asgi_client(app) as client:
        yield client


@pytest.mark.parametrize(("body", "fields"), [
    ({"workflowId": "solid_color", "items": [{"width": 8}, {"width": 0}, {"width": 8, "colour": 1}]},
     {"items[1].width", "items[2].colour"}),
    ({"workflowId": "solid_color", "items": []}, {"items"}),
    ({"workflowId": "solid_color", "items": [{}] * 6}, {"items"}),
    ({"workflowId": "solid_color", "items": [[]]}, {"items.0"}),
    ({"workflowId": "solid_color", "items": [{}], "priority": "urgent"}, {"priority"}),
    ({"workflowId": "solid_color", "items": [{}], "inputs": {}}, {"inputs"}),
])
async def test_a_bad_batch_is_refused_naming_its_fields_and_nothing_starts(
    api: httpx.AsyncClient, tmp_path: Path, body: dict[str, Any], fields: set[str],
) -> None:
    response = await api.post("/batches", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "VALIDATION_ERROR"
    assert {field["field"] for field in error["details"]["fields"]} == fields, json.dumps(error)
    # UnusableTemporal fails the request had it started a workflow; and no job exists.
    assert (await api.get("/jobs")).json()["count"] == 0


async def test_a_batch_of_an_unknown_template_or_with_an_unsigned_webhook_is_refused(api: httpx.AsyncClient) -> None:
    response = await api.post("/batches", json={"workflowId": "nope", "items": [{}]})
    assert response.status_code == 404 and error_of(response)["code"] == "WORKFLOW_NOT_FOUND"
    response = await api.post("/batches", json={"workflowId": "solid_color", "items": [{}],
                                                 "callbackUrl": "https://example.com/hook"})
    assert response.status_code == 400 and error_of(response)["code"] == "WEBHOOK_NOT_CONFIGURED"


# --- the batches table, on SQLite and PostgreSQL -----------------------------------------------------------


def test_a_batch_row_is_an_idempotent_projection_that_never_goes_back(engine: Engine) -> None:
    now = datetime.now(timezone.utc)
    batch_id = str(uuid.uuid4())
    running = BatchState(batch_id=batch_id, status=BatchStatus.running, priority=3, total=3, created_at=now,
                         started_at=now, owner="alice")
    ended = running.model_copy(update={"status": BatchStatus.completed, "completed_at": now,
                                       "tally": BatchTally(succeeded=2, failed=1)})
    with session_scope(engine) as session:
        for state in (running, running, ended, running):  # repeated, and a late write of a run before
            record_batch(session, RecordBatchInput(batch=state))
        row = get_batch(session, batch_id)
        assert row is not None and row.status == "completed" and row.tally == {"succeeded": 2, "failed": 1,
                                                                               "cancelled": 0}
        # Item counts and progress come from the items' job rows: an ended item counts 100.
        for status, progress in (("succeeded", 0), ("running", 40), ("queued", 0)):
            session.add(JobRow(job_id=str(uuid.uuid4()), status=status, backend="", progress=progress, owner="alice",
                               batch_id=batch_id, created_at=now, updated_at=now))
        session.commit()
        rows = item_rows(session, batch_id)
    assert rows.by_status == {JobStatus.succeeded: 1, JobStatus.running: 1, JobStatus.queued: 1}
    assert rows.progress_sum == 140


def test_a_batch_ended_in_temporal_is_closed_once_its_items_have_ended(engine: Engine) -> None:
    """The reconciler's writes: a batch whose workflow Temporal ended waits for its live items, then its row is
    closed once, with the tally its items' rows make (an item never started counts as cancelled)."""
    now = datetime.now(timezone.utc)
    batch_id = str(uuid.uuid4())
    running = BatchState(batch_id=batch_id, status=BatchStatus.running, priority=3, total=4, created_at=now,
                         started_at=now, started=1, cancel_reason=None)
    item_ids = {status: str(uuid.uuid4()) for status in ("succeeded", "failed", "running")}
    with session_scope(engine) as session:
        record_batch(session, RecordBatchInput(batch=running))
        for status, job_id in item_ids.items():
            session.add(JobRow(job_id=job_id, status=status, backend="", progress=0, batch_id=batch_id,
                               created_at=now, updated_at=now))
        session.commit()
        assert ended_items_tally(session, batch_id, 4) is None  # an item is still running
        row = session.get(JobRow, item_ids["running"])
        assert row is not None
        row.status = "cancelled"
        session.add(row)
        session.commit()
        ended = ended_items_tally(session, batch_id, 4)
        assert ended == (3, BatchTally(succeeded=1, failed=1, cancelled=2))
        started, tally = ended
        closed = running.model_copy(update={"status": BatchStatus.cancelled, "started": started, "tally": tally,
                                            "completed_at": now, "cancel_reason": "terminated in Temporal"})
        assert close_ended_batch(session, closed) is True
        assert close_ended_batch(session, closed.model_copy(update={"cancel_reason": "again"})) is False
        record_batch(session, RecordBatchInput(batch=running))  # a late write of the workflow changes nothing
        session.expire_all()
        row = get_batch(session, batch_id)
        assert row is not None and row.status == "cancelled" and row.cancel_reason == "terminated in Temporal"
        assert row.started == 3 and row.tally == {"succeeded": 1, "failed": 1, "cancelled": 2}


# --- replay of committed batch histories (captured with `python -m tests.histories.capture_batches`) -------

BATCH_HISTORIES = sorted((Path(__file__).resolve().parent / "histories" / "batch").glob("*.json"))


def test_batch_histories_are_committed() -> None:
    assert {path.stem for path in BATCH_HISTORIES} >= {
        "batch_completed_run1", "batch_completed_run2", "batch_cancelled_run1", "batch_cancelled_in_temporal_run1"}


@pytest.mark.parametrize("path", BATCH_HISTORIES, ids=[path.stem for path in BATCH_HISTORIES])
async def test_batch_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[BatchWorkflow], data_converter=pydantic_data_converter)
    assert (await replayer.replay_workflow(history)).replay_failure is None
    [started] = [event.workflow_execution_started_event_attributes for event in history.events[:1]]
    [batch] = await pydantic_data_converter.decode(started.input.payloads, [BatchInput])
    assert isinstance(batch, BatchInput)
