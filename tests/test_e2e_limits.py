"""MAX_IMAGE_SIZE and MAX_BATCH_SIZE hold on the rendered graph of every job, whatever a template calls its
fields, and a template's own limits replace them for that template."""

from __future__ import annotations

import pytest

from tests.harness import Gateway, recorded_workflow


def fields_of(response) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {item["field"]: item["message"] for item in response.json()["error"]["details"]["fields"]}


def sized_template(template_id: str, **extra: object) -> dict:
    """A template whose fields are not named width, height or batch_size, yet set them."""
    return {
        "id": template_id, "name": "Sized",
        "workflowJson": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": "{{size}}", "height": "{{size}}",
                                                         "batch_size": "{{n}}", "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sized"}},
        },
        "inputSchema": {"type": "object", "fields": {"size": {"type": "integer", "default": 64},
                                                    "n": {"type": "integer", "default": 1}}},
        **extra,
    }


async def test_a_template_cannot_escape_the_limits_by_naming_its_fields(gateway: Gateway) -> None:
    assert (await gateway.api.post("/workflows", json=sized_template("sized"))).status_code == 201
    refused = await gateway.api.post("/jobs", json={"workflowId": "sized", "inputs": {"size": 16384, "n": 64}})
    assert refused.status_code == 400
    assert fields_of(refused) == {"inputs.size": "16384 exceeds MAX_IMAGE_SIZE 2048",
                                  "inputs.n": "64 exceeds MAX_BATCH_SIZE 4"}


async def test_a_templates_own_limits_let_its_frames_be_a_batch_and_nothing_more(gateway: Gateway) -> None:
    template = sized_template("frames", limits={"maxBatchSize": 16})
    registered = await gateway.api.post("/workflows", json=template)
    assert registered.status_code == 201 and registered.json()["workflow"]["limits"] == {"maxBatchSize": 16}
    job = await gateway.run({"workflowId": "frames", "inputs": {"size": 16, "n": 16}})
    assert job["status"] == "succeeded" and len(job["outputs"]) == 16
    refused = await gateway.api.post("/jobs", json={"workflowId": "frames", "inputs": {"n": 17, "size": 4096}})
    assert fields_of(refused) == {"inputs.n": "17 exceeds the template's maxBatchSize 16",
                                  "inputs.size": "4096 exceeds MAX_IMAGE_SIZE 2048"}
    bad = await gateway.api.post("/workflows", json=sized_template("bad", limits={"maxBatchSize": 0}))
    assert bad.status_code == 400 and "limits.maxBatchSize" in fields_of(bad)


async def test_the_same_frames_are_refused_in_a_raw_graph_and_run_in_the_bundled_template(gateway: Gateway) -> None:
    video = recorded_workflow("video.json")  # EmptyImage.batch_size 16
    refused = await gateway.api.post("/jobs", json={"workflowJson": video})
    assert refused.status_code == 400
    assert fields_of(refused) == {"workflowJson.1.inputs.batch_size": "16 exceeds MAX_BATCH_SIZE 4"}
    job = await gateway.run({"workflowId": "animated_noise_webp", "inputs": {"width": 32, "height": 32, "frames": 16}})
    assert job["status"] == "succeeded" and job["outputs"][0]["animated"] is True


@pytest.mark.settings(max_batch_size=16)
async def test_the_operators_limit_holds_for_raw_graphs(gateway: Gateway) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow("video.json")})
    assert job["status"] == "succeeded"
