"""The template registry through the API, and jobs that run the version they were submitted with."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.harness import DONE, Gateway, free_port, wait_for_job
from tests.template_bodies import SCHEMA, TEMPLATE, registration, with_field

async def register(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    response = await gateway.api.post("/workflows", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def test_register_read_list_and_json_schema(gateway: Gateway) -> None:
    created = await register(gateway, registration("solid_test"))
    assert created["warnings"] == [] and created["workflow"]["version"] == 1
    listed = (await gateway.api.get("/workflows")).json()["workflows"]
    assert {"id": "solid_test", "name": "Solid", "description": "test template", "version": 1} in listed
    read = (await gateway.api.get("/workflows/solid_test")).json()["workflow"]
    assert read["inputSchema"] == SCHEMA and read["defaultParams"] == {"filename_prefix": "solid_test_v1"}
    assert read["createdAt"] == created["workflow"]["createdAt"]  # UTC both ways, though SQLite drops the zone
    assert read["jsonSchema"]["required"] == ["color"]
    assert read["jsonSchema"]["properties"]["width"] == {"type": "integer", "minimum": 8, "maximum": 4096, "default": 64}
    duplicate = await gateway.api.post("/workflows", json=registration("solid_test"))
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "WORKFLOW_EXISTS"


async def test_unknown_node_types_are_a_warning_naming_the_nodes(gateway: Gateway) -> None:
    graph = copy.deepcopy(TEMPLATE)
    graph["3"] = {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}}
    created = await register(gateway, registration("odd_nodes", workflowJson=graph))
    assert created["warnings"] == ["ComfyUI has no node type NoSuchNode (nodes 3)"]


@pytest.mark.settings(comfyui_url=f"http://127.0.0.1:{free_port()}")  # ComfyUI is down
async def test_registration_works_while_comfyui_is_down_with_a_warning(gateway: Gateway) -> None:
    created = await register(gateway, registration("offline_template"))
    [warning] = created["warnings"]
    assert warning.startswith("node types not checked")


async def test_template_jobs_store_the_seed(gateway: Gateway) -> None:
    await register(gateway, registration("seeded"))
    job = await gateway.run({"workflowId": "seeded", "inputs": {"color": 255}})
    assert job["status"] == "succeeded" and 0 <= job["seed"] <= 1000000
    again = await gateway.run({"workflowId": "seeded", "inputs": {"color": 255, "seed": 42}})
    assert again["seed"] == 42


async def test_update_makes_a_new_version_and_queued_jobs_keep_theirs(gateway: Gateway) -> None:
    await register(gateway, registration("versioned"))
    # A long job holds the only slot, so the next job waits, already bound to version 1.
    blocker = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, blocker, until={"running"})
    waiting = await gateway.submit({"workflowId": "versioned", "inputs": {"color": 1}})
    updated = await gateway.api.put("/workflows/versioned", json={"defaultParams": {"filename_prefix": "versioned_v2"}})
    assert updated.status_code == 200 and updated.json()["workflow"]["version"] == 2
    assert updated.json()["workflow"]["name"] == "Solid"  # a partial update keeps the rest
    await gateway.api.post(f"/jobs/{blocker}/cancel")
    old = await wait_for_job(gateway.api, waiting, until=DONE)
    assert old["status"] == "succeeded" and old["templateVersion"] == 1
    assert old["outputs"][0]["filename"].startswith("versioned_v1_")
    new = await gateway.run({"workflowId": "versioned", "inputs": {"color": 1}})
    assert new["templateVersion"] == 2 and new["outputs"][0]["filename"].startswith("versioned_v2_")


async def test_delete_hides_the_template_but_submitted_jobs_still_run(gateway: Gateway) -> None:
    await register(gateway, registration("doomed"))
    blocker = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, blocker, until={"running"})
    waiting = await gateway.submit({"workflowId": "doomed", "inputs": {"color": 2}})
    assert (await gateway.api.delete("/workflows/doomed")).status_code == 204
    assert (await gateway.api.get("/workflows/doomed")).json()["error"]["code"] == "WORKFLOW_NOT_FOUND"
    assert "doomed" not in [w["id"] for w in (await gateway.api.get("/workflows")).json()["workflows"]]
    refused = await gateway.api.post("/jobs", json={"workflowId": "doomed", "inputs": {"color": 2}})
    assert refused.status_code == 404
    await gateway.api.post(f"/jobs/{blocker}/cancel")
    assert (await wait_for_job(gateway.api, waiting, until=DONE))["status"] == "succeeded"
    for method in ("put", "delete"):
        response = await getattr(gateway.api, method)("/workflows/doomed", **({"json": {}} if method == "put" else {}))
        assert response.status_code == 404 and response.json()["error"]["code"] == "WORKFLOW_NOT_FOUND"
    recreated = await register(gateway, registration("doomed"))
    assert recreated["workflow"]["version"] == 2  # version numbers are never reused


async def test_a_link_to_an_output_the_node_does_not_have_is_refused(gateway: Gateway) -> None:
    graph = copy.deepcopy(TEMPLATE)
    graph["2"]["inputs"]["images"] = ["1", 3]  # EmptyImage has one output
    response = await gateway.api.post("/workflows", json=registration("bad_output", workflowJson=graph))
    assert response.status_code == 400
    [issue] = response.json()["error"]["details"]["fields"]
    assert issue["field"] == "workflowJson.2.inputs.images" and "which has 1" in issue["message"]
    assert (await gateway.api.get("/workflows/bad_output")).status_code == 404


async def test_an_update_that_changes_nothing_writes_no_version(gateway: Gateway) -> None:
    await register(gateway, registration("steady"))
    current = (await gateway.api.get("/workflows/steady")).json()["workflow"]
    same = {"name": "Solid", "inputSchema": SCHEMA, "defaultParams": {"filename_prefix": "steady_v1"}}
    for body in ({}, same, {"workflowJson": TEMPLATE, "description": "test template"}):
        response = await gateway.api.put("/workflows/steady", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["workflow"] == current
    # 64 and 64.0 are equal in Python, not in the JSON a client reads back: that is a change.
    floated = await gateway.api.put("/workflows/steady", json={"inputSchema": with_field("width", default=64.0)})
    assert floated.json()["workflow"]["version"] == 2
