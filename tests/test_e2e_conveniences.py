"""What management clients expect, through real jobs: `DELETE /jobs/{id}` cancels as `POST /jobs/{id}/cancel`
does, and `GET /outputs` lists a caller's outputs across jobs, newest first, in pages."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.harness import Gateway, error_of, recorded_workflow, wait_for_job
from tests.test_auth import ADMIN, ALICE_KEY, API_KEYS, BOB, BOB_KEY


@pytest.mark.settings(api_keys=API_KEYS)
async def test_delete_cancels_a_job_as_the_cancel_route_does(gateway: Gateway) -> None:
    api = gateway.api
    api.headers["X-API-Key"] = ALICE_KEY
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(api, job_id, until={"running"})

    another_s = await api.delete(f"/jobs/{job_id}", headers=BOB)
    assert another_s.status_code == 404 and error_of(another_s)["code"] == "JOB_NOT_FOUND"
    surprise = await api.request("DELETE", f"/jobs/{job_id}", json={"reason": "x", "surprise": 1})
    assert surprise.status_code == 400 and error_of(surprise)["details"]["fields"][0]["field"] == "surprise"

    deleted = await api.request("DELETE", f"/jobs/{job_id}", json={"reason": "no longer needed"})
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"jobId": job_id, "status": "cancelled", "message": "job cancelled"}
    job = (await api.get(f"/jobs/{job_id}")).json()  # the record stays
    assert job["status"] == "cancelled" and job["error"]["message"] == "cancelled by alice: no longer needed"
    again = await api.delete(f"/jobs/{job_id}")
    assert again.status_code == 409 and error_of(again)["code"] == "JOB_ALREADY_FINISHED"
    assert again.json() == (await api.post(f"/jobs/{job_id}/cancel")).json()


def solid(width: int) -> dict[str, Any]:
    return {"workflowId": "solid_color", "inputs": {"width": width, "height": 8}}


async def listed(api: httpx.AsyncClient, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    response = await api.get("/outputs", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.settings(api_keys=API_KEYS)
async def test_outputs_across_jobs_are_the_caller_s_newest_first_in_pages(gateway: Gateway) -> None:
    api = gateway.api
    api.headers["X-API-Key"] = ALICE_KEY
    # Run one after the other so that each ends after the one before: newest first is then the reverse.
    alices = [await gateway.run(solid(8)), await gateway.run({"workflowJson": recorded_workflow("batch.json")}),
              await gateway.run(solid(9))]
    api.headers["X-API-Key"] = BOB_KEY
    bobs = await gateway.run(solid(10))
    assert {job["status"] for job in [*alices, bobs]} == {"succeeded"}
    api.headers["X-API-Key"] = ALICE_KEY

    # Each entry is the file as its job shows it, with its job's id, template and end.
    expected = [{**output, "jobId": job["jobId"], "workflowId": job["workflowId"],
                 "completedAt": job["timing"]["completedAt"]}
                for job in reversed(alices) for output in job["outputs"]]
    assert [entry["workflowId"] for entry in expected] == ["solid_color", None, None, None, None, "solid_color"]
    everything = await listed(api)
    assert everything == {"outputs": expected, "count": 6}
    newest = everything["outputs"][0]
    downloaded = await api.get(newest["url"])
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == newest["contentType"]

    pages = await asyncio.gather(*(listed(api, limit=4, offset=offset) for offset in (0, 4)))
    assert [entry for page in pages for entry in page["outputs"]] == expected
    assert [len(page["outputs"]) for page in pages] == [4, 2] and {page["count"] for page in pages} == {6}

    assert await listed(api, workflowId="solid_color") == {"outputs": [expected[0], expected[-1]], "count": 2}
    first_end = alices[0]["timing"]["completedAt"]
    assert (await listed(api, after=first_end))["outputs"] == expected[:-1]
    assert (await listed(api, before=alices[-1]["timing"]["completedAt"]))["outputs"] == expected[1:]

    # A user sees only their own; an admin everyone's.
    bobs_outputs = (await listed(api, headers=BOB))["outputs"]
    assert [(entry["jobId"], entry["filename"]) for entry in bobs_outputs] == [
        (bobs["jobId"], bobs["outputs"][0]["filename"])]
    admins = await listed(api, headers=ADMIN)
    assert admins["count"] == 7 and admins["outputs"][0]["jobId"] == bobs["jobId"]
    assert admins["outputs"][1:] == expected

    for params, field in (({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"offset": -1}, "offset"),
                          ({"limit": "ten"}, "limit"), ({"after": "1714560000"}, "after"),
                          ({"before": "2024-05-01T12:00:00"}, "before")):
        refused = await api.get("/outputs", params=params)
        assert refused.status_code == 400 and error_of(refused)["code"] == "VALIDATION_ERROR", (params, refused.text)
        assert [item["field"] for item in error_of(refused)["details"]["fields"]] == [field], params

