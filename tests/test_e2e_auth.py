"""Jobs with owners end to end: the owner is on the row and an `Owner` search attribute, another user cannot
see or cancel the job, an admin's cancel of it is audited, and the result cache answers a caller only with its
own jobs."""

from __future__ import annotations

import pytest
from sqlmodel import Session
from temporalio.client import Client, WorkflowExecutionStatus

from app.db import make_engine
from app.jobstore import get_job
from tests.harness import DONE, Gateway, comfy_history_for_job, error_of, wait_for_job
from tests.test_auth import ADMIN, ALICE_KEY, API_KEYS, BOB, BOB_KEY
from tests.test_e2e_search_attributes import visible
from tests.test_result_cache import seeded
from tests.template_bodies import registration


@pytest.mark.settings(api_keys=API_KEYS)
async def test_a_user_s_job_is_its_own_and_an_admin_s_cancel_of_it_is_audited(
    gateway: Gateway, temporal_client: Client
) -> None:
    api = gateway.api
    api.headers["X-API-Key"] = ALICE_KEY  # every request is alice's unless it says otherwise
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(api, job_id, until={"running"})
    assert await visible(temporal_client, 'Owner = "alice" AND JobStatus = "running"',
                         job_id) is WorkflowExecutionStatus.RUNNING
    assert await visible(temporal_client, 'Owner = "bob"', job_id) is None

    for method, path in (("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel"),
                         ("GET", f"/jobs/{job_id}/logs"), ("GET", f"/outputs/{job_id}")):
        response = await api.request(method, path, headers=BOB)
        assert response.status_code == 404 and error_of(response)["code"] == "JOB_NOT_FOUND", (method, response.text)
    assert (await api.get("/jobs", headers=BOB)).json()["count"] == 0

    cancelled = await api.post(f"/jobs/{job_id}/cancel", headers=ADMIN, json={"reason": "GPU needed"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    job = (await api.get(f"/jobs/{job_id}")).json()
    assert job["error"]["message"] == "cancelled by ops: GPU needed", job

    [entry] = (await api.get("/audit", headers=ADMIN, params={"action": "job.cancel"})).json()["entries"]
    assert (entry["actor"], entry["target"], entry["details"]) == (
        "ops", job_id, {"owner": "alice", "reason": "GPU needed"})
    engine = make_engine(gateway.settings.resolved_database_url)
    with Session(engine) as session:
        assert get_job(session, job_id).owner == "alice"
    engine.dispose()

    # Cancelling one's own job is no admin action: not audited.
    own = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    assert (await api.post(f"/jobs/{own}/cancel")).json()["status"] == "cancelled"
    assert (await api.get("/audit", headers=ADMIN, params={"action": "job.cancel"})).json()["count"] == 1


@pytest.mark.settings(api_keys=API_KEYS, cache_enabled=True)
async def test_the_result_cache_answers_a_caller_only_with_its_own_job(gateway: Gateway) -> None:
    """A hit names its source (its log, its outputs' storage keys): another's job id would leak through it."""
    api = gateway.api
    assert (await api.post("/workflows", json=registration("seeded_solid"), headers=ADMIN)).status_code == 201
    api.headers["X-API-Key"] = ALICE_KEY
    alices = await gateway.run(seeded(4444))
    again = (await api.post("/jobs", json=seeded(4444))).json()
    assert again["cacheHit"] is True and again["status"] == "succeeded", again

    api.headers["X-API-Key"] = BOB_KEY
    bobs = (await api.post("/jobs", json=seeded(4444))).json()
    assert bobs["cacheHit"] is False, bobs
    bobs = await wait_for_job(api, bobs["jobId"], until=DONE)
    assert bobs["status"] == "succeeded" and bobs["cacheHit"] is False
    assert len(await comfy_history_for_job(gateway.comfyui.url, bobs["jobId"])) == 1  # it ran
    seen = [bobs, (await api.get(f"/jobs/{bobs['jobId']}/logs")).json(), (await api.get(f"/outputs/{bobs['jobId']}")).json()]
    assert alices["jobId"] not in str(seen)
