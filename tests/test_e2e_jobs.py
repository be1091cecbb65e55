"""Jobs end to end: API → Temporal (real dev server) → worker → ComfyUI simulator → stored outputs."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowHistory

from app.temporal_endings import started_input

from tests.harness import (
    DONE,
    ComfyUITarget,
    Gateway,
    assert_eventually,
    comfy_history_for_job,
    free_port,
    recorded_workflow,
    wait_for_job,
)


async def comfy_file(comfyui: ComfyUITarget, entry: dict[str, Any]) -> bytes:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{comfyui.url}/view", params=entry)
        response.raise_for_status()
        return response.content


async def test_image_job_stores_outputs_with_verified_checksums(gateway: Gateway) -> None:
    job_id = await gateway.submit({"workflowJson": recorded_workflow("image.json"), "metadata": {"user": "u1"}})
    job = await wait_for_job(gateway.api, job_id, until=DONE)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 100 and job["attempts"] == 1 and job["metadata"] == {"user": "u1"}
    assert job["timing"]["startedAt"] and job["timing"]["completedAt"] and job["timing"]["executionTimeMs"] >= 0
    [output] = job["outputs"]
    assert output["contentType"] == "image/png" and output["filename"].startswith("gw_")

    [run] = await comfy_history_for_job(gateway.comfyui.url, job_id)
    [entry] = run["outputs"]["2"]["images"]
    original = await comfy_file(gateway.comfyui, entry)
    assert output["sha256"] == hashlib.sha256(original).hexdigest() and output["size"] == len(original)

    downloaded = await gateway.api.get(output["url"])
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert downloaded.content == original
    as_base64 = (await gateway.api.get(output["url"], params={"format": "base64"})).json()
    assert as_base64 == {"filename": output["filename"], "contentType": "image/png", "size": len(original),
                         "data": base64.b64encode(original).decode()}
    listed = (await gateway.api.get(f"/outputs/{job_id}")).json()
    assert listed["files"] == job["outputs"]


def local_activities(history: WorkflowHistory) -> list[str]:
    """The activity type of each local activity in a history, from its marker."""
    return [json.loads(event.marker_recorded_event_attributes.details["data"].payloads[0].data)["activity_type"]
            for event in history.events if event.marker_recorded_event_attributes.marker_name == "core_local_activity"]


async def test_the_api_renders_the_prompt_once_and_the_workflow_runs_it(
    gateway: Gateway, temporal_client: Client
) -> None:
    red_pixel = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAA"
                 "AAAElFTkSuQmCC")
    job = await gateway.run({"workflowId": "invert_image", "inputs": {"image": red_pixel}})
    assert job["status"] == "succeeded", job
    handle = temporal_client.get_workflow_handle(job["jobId"])
    started = await started_input(temporal_client, handle)
    assert started.rendered is not None
    # The inline image went to storage before the prompt was rendered: the prompt names it, never its bytes.
    [(key, source)] = started.rendered.image_sources.items()
    assert source == started.inputs["image"] and source.startswith("stored-input://")
    assert started.rendered.prompt[key.split(".")[0]]["inputs"]["image"] == source
    assert set(local_activities(await handle.fetch_history())) == {"record_job"}


async def test_the_prompt_activity_stores_the_outputs_itself(gateway: Gateway, temporal_client: Client) -> None:
    """The outputs are stored by run_prompt, in the slot and on the backend that ran the prompt: no
    collect_outputs and no workflow task between the two (a store in trouble falls back to collect_outputs,
    see test_e2e_s3's bucket down during collect)."""
    job = await gateway.run({"workflowJson": recorded_workflow("image.json")})
    assert job["status"] == "succeeded", job
    history = await temporal_client.get_workflow_handle(job["jobId"]).fetch_history()
    scheduled = [event.activity_task_scheduled_event_attributes.activity_type.name for event in history.events
                 if event.HasField("activity_task_scheduled_event_attributes")]
    assert scheduled == ["run_prompt"]
    [output] = job["outputs"]
    stored = await gateway.api.get(output["url"])
    assert stored.status_code == 200 and hashlib.sha256(stored.content).hexdigest() == output["sha256"]


async def test_a_job_too_large_to_carry_its_prompt_twice_is_rendered_by_the_worker(
    gateway: Gateway, temporal_client: Client
) -> None:
    graph = recorded_workflow("image.json")
    [empty_image] = [node for node in graph.values() if node["class_type"] == "EmptyImage"]
    empty_image["inputs"]["note"] = "{{note}}"  # an input the node does not declare: ComfyUI ignores it
    job = await gateway.run({"workflowJson": graph, "inputs": {"note": "x" * 600_000}})
    assert job["status"] == "succeeded", job
    handle = temporal_client.get_workflow_handle(job["jobId"])
    assert (await started_input(temporal_client, handle)).rendered is None
    assert "render_prompt" in local_activities(await handle.fetch_history())


async def test_template_job_by_workflow_id(gateway: Gateway) -> None:
    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 96, "height": 64, "color": 255}})
    assert job["status"] == "succeeded" and job["workflowId"] == "solid_color" and job["templateVersion"] == 1
    [output] = job["outputs"]
    assert output["filename"].startswith("gateway_")
    from PIL import Image
    import io
    image = Image.open(io.BytesIO((await gateway.api.get(output["url"])).content))
    assert image.size == (96, 64)


async def test_output_urls_are_links_even_for_odd_file_names(gateway: Gateway) -> None:
    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 8, "height": 8,
                                                                     "filename_prefix": "a?b#c%d e"}})
    [output] = job["outputs"]
    assert output["filename"].startswith("a?b#c%d e")
    downloaded = await gateway.api.get(output["url"])
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"


async def test_batch_outputs_every_image(gateway: Gateway) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow("batch.json")})
    assert job["status"] == "succeeded"
    assert len(job["outputs"]) == 4 and len({o["sha256"] for o in job["outputs"]}) >= 1
    assert len({o["filename"] for o in job["outputs"]}) == 4


@pytest.mark.settings(max_batch_size=16)  # the recorded videos are 16-frame batches
@pytest.mark.parametrize(("workflow", "content_type"), [("video.json", "image/webp"), ("video_mp4.json", "video/mp4")])
async def test_animated_and_video_outputs(gateway: Gateway, workflow: str, content_type: str) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow(workflow)})
    assert job["status"] == "succeeded", job
    [output] = job["outputs"]
    assert output["animated"] is True and output["contentType"] == content_type
    body = (await gateway.api.get(output["url"])).content
    assert hashlib.sha256(body).hexdigest() == output["sha256"] and len(body) == output["size"] > 1000


@pytest.mark.parametrize(
    ("workflow", "code", "node_type"),
    [("fail.json", "COMFYUI_OOM", "TestFail"), ("fail_oom.json", "COMFYUI_OOM", "TestFail")],
)
async def test_execution_errors_are_classified(
    gateway: Gateway, workflow: str, code: str, node_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow(workflow)})
    assert job["status"] == "failed"
    assert job["error"]["code"] == code and job["error"]["details"]["nodeType"] == node_type
    assert "startedAtMs" not in job["error"]["details"]
    assert job["timing"]["startedAt"] is not None  # ComfyUI ran node 1 first, however soon it failed
    assert job["outputs"] == []
    # The job's failure is its outcome, reported in its log; the worker's log stays free of tracebacks.
    assert not activity_failure_warnings(caplog)


async def test_node_error_fails_and_retry_on_reruns_it(gateway: Gateway) -> None:
    flaky = recorded_workflow("flaky.json")
    flaky["2"]["inputs"]["key"] = f"e2e-{gateway.settings.temporal_task_queue}"
    failed = await gateway.run({"workflowJson": flaky})
    assert failed["status"] == "failed" and failed["error"]["code"] == "COMFYUI_NODE_ERROR"
    assert failed["error"]["details"]["nodeId"] == "2" and "transient failure 1/2" in failed["error"]["message"]

    retried = await gateway.run({"workflowJson": flaky,
                                 "retry": {"maxAttempts": 3, "backoffSeconds": 0.1, "retryOn": ["COMFYUI_NODE_ERROR"]}})
    # The first job used up one of the two failures; this one fails once more, then succeeds.
    assert retried["status"] == "succeeded" and retried["attempts"] == 2
    logs = (await gateway.api.get(f"/jobs/{retried['jobId']}/logs")).json()["events"]
    assert any(event["kind"] == "retry" for event in logs)


async def test_comfyui_validation_error_names_node_and_input(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow("invalid_missing_input.json")})
    assert job["status"] == "failed" and job["error"]["code"] == "VALIDATION_ERROR"
    [error] = job["error"]["details"]["nodeErrors"]["1"]["errors"]
    assert error["type"] == "required_input_missing" and error["input"] == "height"
    assert not activity_failure_warnings(caplog)


def activity_failure_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records
            if record.name == "temporalio.activity" and record.levelno >= logging.WARNING]


async def test_timeout_interrupts_the_prompt(gateway: Gateway) -> None:
    job = await gateway.run({"workflowJson": gateway.comfyui.slow_prompt(10), "timeoutSeconds": 1.5})
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_TIMEOUT"
    [run] = await comfy_history_for_job(gateway.comfyui.url, job["jobId"])
    assert run["status"]["messages"][-1][0] == "execution_interrupted"


async def test_interrupt_from_outside_fails_the_job_with_its_own_code(gateway: Gateway) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    running = await wait_for_job(gateway.api, job_id, until={"running"})
    assert running["status"] == "running"
    async with httpx.AsyncClient() as client:
        await client.post(f"{gateway.comfyui.url}/interrupt", json={})
    job = await wait_for_job(gateway.api, job_id, until=DONE)
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_INTERRUPTED"


async def test_progress_is_reported_while_running(gateway: Gateway) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(3)})
    seen: set[int] = set()

    async def finished() -> dict | None:
        job = (await gateway.api.get(f"/jobs/{job_id}")).json()
        if job["status"] == "running":
            seen.add(job["progress"])
        return job if job["status"] in DONE else None

    job = await assert_eventually(finished, interval=0.1)
    assert job["status"] == "succeeded"
    assert any(0 < value < 100 for value in seen), seen



@pytest.mark.settings(comfyui_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
async def test_an_unreachable_comfyui_is_waited_for_with_a_warning_until_the_job_timeout(gateway: Gateway) -> None:
    job_id = await gateway.submit({"workflowJson": recorded_workflow("image.json"), "timeoutSeconds": 3})

    async def warned() -> dict | None:
        job = (await gateway.api.get(f"/jobs/{job_id}")).json()
        return job if job["warning"] else None

    waiting = await assert_eventually(warned, timeout=10)
    assert waiting["status"] == "queued" and waiting["error"] is None
    assert waiting["warning"]["code"] == "COMFYUI_UNREACHABLE" and waiting["warning"]["since"]

    async def listed_with_the_warning() -> bool:
        [listed] = [job for job in (await gateway.api.get("/jobs")).json()["jobs"] if job["jobId"] == job_id]
        return listed["warning"] == waiting["warning"]

    await assert_eventually(listed_with_the_warning, timeout=5)  # lists agree with the job read alone
    job = await wait_for_job(gateway.api, job_id, until=DONE, timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_UNREACHABLE" and job["warning"] is None
    logs = (await gateway.api.get(f"/jobs/{job_id}/logs")).json()["events"]
    warnings = [event["message"] for event in logs if event["kind"] == "warning"]
    assert len(warnings) == 2 and "waiting for it" in warnings[0] and "time limit has passed" in warnings[1]


async def test_preview_outputs_from_comfyuis_temp_folder_are_collected(gateway: Gateway) -> None:
    job = await gateway.run({"workflowJson": recorded_workflow("preview.json")})
    assert job["status"] == "succeeded"
    [output] = job["outputs"]
    assert output["filename"].startswith("ComfyUI_temp_") and output["contentType"] == "image/png"
    assert (await gateway.api.get(output["url"])).status_code == 200


async def test_websocket_only_images_leave_no_files_and_the_job_still_succeeds(gateway: Gateway) -> None:
    # SaveImageWebsocket sends its images only as binary WebSocket frames; ComfyUI's history has no outputs.
    job = await gateway.run({"workflowJson": recorded_workflow("ws_image.json")})
    assert job["status"] == "succeeded" and job["outputs"] == []


async def test_a_failure_quoting_a_huge_input_still_fails_with_its_own_code(gateway: Gateway) -> None:
    # ComfyUI quotes the 900 KB file name in its error; whole, it would not fit in a Temporal failure.
    graph = recorded_workflow("image.json")
    graph["2"]["inputs"]["filename_prefix"] = "x" * 900_000
    job = await gateway.run({"workflowJson": graph})
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_NODE_ERROR"
    assert "File name too long" in job["error"]["message"] and len(job["error"]["message"]) < 2100


async def test_an_output_comfyui_refuses_to_serve_fails_the_job_at_once(gateway: Gateway) -> None:
    # ComfyUI saves "a..b_00001_.png" but its /view refuses any name containing "..": retrying cannot help.
    job = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 8, "height": 8,
                                                                     "filename_prefix": "a..b"}}, timeout=20)
    assert job["status"] == "failed" and job["error"]["code"] == "COMFYUI_PROTOCOL_ERROR"
    assert "refused to serve" in job["error"]["message"] and job["timing"]["startedAt"] is not None
