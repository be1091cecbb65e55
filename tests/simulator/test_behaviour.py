"""Simulator behaviour the recordings do not show directly, checked against what ComfyUI's
server.py / execution.py do: restarts, event routing, reconnects, queue edits, cache, headers."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from .support import RunningSimulator, WsRecorder, start_simulator, workflow


def sleeping(seconds: float, steps: int, prefix: str = "gw_sleep") -> dict[str, Any]:
    """slow.json with a different duration (before the simulator's time_scale)."""
    prompt = workflow("slow.json")
    prompt["2"]["inputs"].update(seconds=seconds, steps=steps)
    prompt["3"]["inputs"]["filename_prefix"] = prefix
    return prompt


def flaky(fail_times: int, key: str) -> dict[str, Any]:
    prompt = workflow("flaky.json")
    prompt["2"]["inputs"].update(fail_times=fail_times, key=key)
    return prompt


async def run(sim: RunningSimulator, ws: WsRecorder, prompt: dict[str, Any], **extra: Any) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    start = len(ws.messages)
    status, body = await sim.post_prompt(prompt, **extra)
    assert status == 200, body
    messages = await ws.wait_finished(body["prompt_id"], start)
    [entry] = (await sim.get_json(f"/history/{body['prompt_id']}")).values()
    return body["prompt_id"], messages, entry


async def test_restart_forgets_queue_history_and_flaky_counts_but_keeps_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "comfyui"
    first = await start_simulator(data_dir)
    ws = await WsRecorder(first).connect()
    image_id, _, image_entry = await run(first, ws, workflow("image.json"))
    assert image_entry["outputs"]["2"]["images"][0]["filename"] == "gw_00001_.png"
    _, _, flaky_entry = await run(first, ws, flaky(1, "restart"))
    assert flaky_entry["status"]["status_str"] == "error"
    _, _, preview_entry = await run(first, ws, workflow("preview.json"))
    [preview] = preview_entry["outputs"]["2"]["images"]
    await ws.close()
    await first.stop()

    second = await start_simulator(data_dir)
    ws = await WsRecorder(second).connect()
    assert await second.get_json(f"/history/{image_id}") == {}
    assert await second.get_json("/history") == {}
    assert await second.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    async with second.http.get(f"{second.url}/view", params=preview) as response:
        assert response.status == 404, "temp/ is wiped at start-up"
    status, body = await second.post_prompt(workflow("image.json"))
    assert body["number"] == 0, "the prompt number is a per-process counter"
    await ws.wait_finished(body["prompt_id"])
    [entry] = (await second.get_json(f"/history/{body['prompt_id']}")).values()
    assert entry["outputs"]["2"]["images"][0]["filename"] == "gw_00002_.png", "file counters continue"
    assert (data_dir / "output" / "gw_00001_.png").is_file()
    _, _, flaky_again = await run(second, ws, flaky(1, "restart"))
    assert flaky_again["status"]["status_str"] == "error", "TestFlaky's counters are per process"
    await ws.close()
    await second.stop()


async def test_execution_events_go_only_to_the_prompts_client(sim: RunningSimulator, ws: WsRecorder) -> None:
    observer = await WsRecorder(sim, "observer").connect()
    prompt_id, messages, entry = await run(sim, ws, workflow("image.json"))
    assert "execution_success" in [m["type"] for m in messages]
    await asyncio.sleep(0.05)
    assert {m["type"] for m in observer.messages} == {"status"}

    # Nobody is connected as "nobody": its events are dropped; /history is the source of truth.
    start, observed_before = len(ws.messages), len(observer.messages)
    status, body = await sim.post_prompt(workflow("batch.json"), client_id="nobody")
    await asyncio.sleep(0.5)
    assert {m["type"] for m in ws.messages[start:]} == {"status"}
    assert {m["type"] for m in observer.messages[observed_before:]} == {"status"}
    [entry] = (await sim.get_json(f"/history/{body['prompt_id']}")).values()
    assert entry["status"]["status_str"] == "success" and len(entry["outputs"]["2"]["images"]) == 4
    await observer.close()


async def test_prompt_without_client_id_sends_no_execution_events(sim: RunningSimulator, ws: WsRecorder) -> None:
    start = len(ws.messages)
    status, body = await sim.post_prompt(workflow("image.json"), client_id=None)
    await asyncio.sleep(0.5)
    # As in ComfyUI, progress_state (and progress) carry the prompt's client id, which is None
    # here, so they reach every socket; the execution_* / executing / executed events do not.
    assert {m["type"] for m in ws.messages[start:]} == {"status", "progress_state"}
    [entry] = (await sim.get_json(f"/history/{body['prompt_id']}")).values()
    assert entry["prompt"][3] == {} and entry["status"]["completed"] is True


async def test_reconnect_replaces_the_socket_and_reports_the_running_node(sim: RunningSimulator, ws: WsRecorder) -> None:
    start = len(ws.messages)
    status, body = await sim.post_prompt(sleeping(10, 10))
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2", start)
    replacement = await WsRecorder(sim, "x").connect()
    await replacement.wait_for(lambda m: m["type"] == "executing")
    assert replacement.messages[0]["data"]["sid"] == "x"
    assert replacement.messages[1] == {"kind": "text", "type": "executing", "data": {"node": "2"}}
    await replacement.wait_for(lambda m: m["type"] == "progress")
    old_count = len(ws.messages)
    await sim.post("/interrupt", {})
    await replacement.wait_finished(body["prompt_id"])
    assert not any(m["type"] in ("progress", "execution_interrupted") for m in ws.messages[old_count:])
    await replacement.close()


async def test_deleting_a_pending_prompt_runs_nothing_for_it(sim: RunningSimulator, ws: WsRecorder) -> None:
    start = len(ws.messages)
    _, running = await sim.post_prompt(sleeping(10, 10))
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2", start)
    _, pending = await sim.post_prompt(workflow("image.json"))
    await ws.wait_for(lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 2, start)
    before_delete = len(ws.messages)
    assert await sim.post("/queue", {"delete": [pending["prompt_id"], "unknown-id"]}) == (200, "")
    await asyncio.sleep(0.1)
    # Deleting the last pending prompt wipes the queue and reports the change again: two statuses.
    statuses = [m for m in ws.messages[before_delete:] if m["type"] == "status"]
    assert [m["data"]["status"]["exec_info"]["queue_remaining"] for m in statuses] == [1, 1]
    await sim.post("/interrupt", {})
    await ws.wait_finished(running["prompt_id"], start)
    await asyncio.sleep(0.2)
    assert pending["prompt_id"] not in json.dumps([m.get("data") for m in ws.messages])
    assert await sim.get_json(f"/history/{pending['prompt_id']}") == {}


async def test_clearing_the_queue_leaves_the_running_prompt(sim: RunningSimulator, ws: WsRecorder) -> None:
    start = len(ws.messages)
    _, running = await sim.post_prompt(sleeping(10, 10))
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2", start)
    for _ in range(2):
        await sim.post_prompt(workflow("image.json"))
    assert await sim.post("/queue", {"clear": True}) == (200, "")
    queue = await sim.get_json("/queue")
    assert queue["queue_pending"] == [] and [item[1] for item in queue["queue_running"]] == [running["prompt_id"]]
    await sim.post("/interrupt")  # no body: a global interrupt
    await ws.wait_finished(running["prompt_id"], start)
    assert (await sim.get_json("/prompt"))["exec_info"]["queue_remaining"] == 0


async def test_prompt_scoped_interrupt_touches_only_the_running_prompt(sim: RunningSimulator, ws: WsRecorder) -> None:
    start = len(ws.messages)
    _, first = await sim.post_prompt(sleeping(10, 10, "gw_first"))
    _, second = await sim.post_prompt(sleeping(10, 10, "gw_second"))
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2", start)
    assert await sim.post("/interrupt", {"prompt_id": second["prompt_id"]}) == (200, "")
    progressed = await ws.wait_for(lambda m: m["type"] == "progress" and m["data"]["value"] == 2, start)
    assert ws.messages[progressed]["data"]["prompt_id"] == first["prompt_id"], "a pending id is not interrupted"
    interrupted_at = time.monotonic()
    await sim.post("/interrupt", {"prompt_id": first["prompt_id"]})
    messages = await ws.wait_finished(first["prompt_id"], start)
    assert time.monotonic() - interrupted_at < 0.3
    assert messages[-3]["type"] == "execution_interrupted"
    # The pending prompt starts right away and is not interrupted.
    await ws.wait_for(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == second["prompt_id"], start)
    await sim.post("/interrupt", {})
    await ws.wait_finished(second["prompt_id"], start)
    [first_entry] = (await sim.get_json(f"/history/{first['prompt_id']}")).values()
    assert (first_entry["status"]["status_str"], first_entry["status"]["completed"], first_entry["outputs"]) == ("error", False, {})


async def test_an_interrupt_sent_while_idle_does_not_hit_the_next_prompt(sim: RunningSimulator, ws: WsRecorder) -> None:
    assert await sim.post("/interrupt", {}) == (200, "")
    _, _, entry = await run(sim, ws, sleeping(1, 2))
    assert entry["status"]["status_str"] == "success"


async def test_identical_prompt_is_served_from_cache_without_new_files(sim: RunningSimulator, ws: WsRecorder) -> None:
    _, _, first = await run(sim, ws, workflow("image.json"))
    _, messages, second = await run(sim, ws, workflow("image.json"))
    cached = next(m for m in messages if m["type"] == "execution_cached")
    assert cached["data"]["nodes"] == ["1", "2"]
    assert [m["type"] for m in messages if m["type"] in ("executing", "executed")] == ["executed", "executing"]
    assert second["outputs"] == first["outputs"]
    assert sorted(p.name for p in (sim.data_dir / "output").iterdir()) == ["gw_00001_.png"]

    # Never-cached test nodes (IS_CHANGED NaN) run again, and so does everything after them.
    await run(sim, ws, flaky(0, "cache"))
    _, messages, entry = await run(sim, ws, flaky(0, "cache"))
    assert next(m for m in messages if m["type"] == "execution_cached")["data"]["nodes"] == ["1"]
    assert entry["outputs"]["3"]["images"][0]["filename"] == "gw_flaky_00002_.png"


async def test_node_delay_is_added_to_every_executed_node(tmp_path: Path) -> None:
    sim = await start_simulator(tmp_path / "comfyui", node_delay=0.3)
    ws = await WsRecorder(sim).connect()
    started = time.monotonic()
    await run(sim, ws, workflow("image.json"))
    assert time.monotonic() - started >= 0.6, "two nodes ran"
    started = time.monotonic()
    await run(sim, ws, workflow("image.json"))
    assert time.monotonic() - started < 0.3, "cached nodes do not run"
    await ws.close()
    await sim.stop()


async def test_clients_announcing_preview_metadata_get_metadata_frames(sim: RunningSimulator) -> None:
    client = await WsRecorder(sim, "meta").connect({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    status, body = await sim.post_prompt(workflow("ws_image.json"), client_id="meta")
    messages = await client.wait_finished(body["prompt_id"])
    frames = [m for m in messages if m["kind"] == "binary"]
    assert [frame["event"] for frame in frames] == [4, 4]
    payload = frames[0]["payload"]  # after the event type: uint32 metadata length, JSON, PNG
    (length,) = struct.unpack(">I", payload[:4])
    metadata = json.loads(payload[4 : 4 + length])
    assert metadata == {
        "node_id": "2",
        "prompt_id": body["prompt_id"],
        "display_node_id": "2",
        "parent_node_id": None,
        "real_node_id": "2",
        "image_type": "image/png",
    }
    assert Image.open(io.BytesIO(payload[4 + length :])).size == (128, 128)
    # With metadata, the preview frame comes before its `progress` event.
    kinds = [m["type"] if m["kind"] == "text" else "binary" for m in messages]
    assert kinds[kinds.index("binary") - 1 : kinds.index("binary") + 2] == ["progress_state", "binary", "progress"]
    await client.close()


async def test_history_listing_and_deletion(sim: RunningSimulator, ws: WsRecorder) -> None:
    ids = []
    for color in (1, 2, 3):
        prompt = workflow("image.json")
        prompt["1"]["inputs"]["color"] = color
        prompt_id, _, _ = await run(sim, ws, prompt)
        ids.append(prompt_id)
    assert list(await sim.get_json("/history")) == ids
    assert list(await sim.get_json("/history", max_items=2)) == ids[1:]
    assert list(await sim.get_json("/history", max_items=1, offset=0)) == ids[:1]
    assert await sim.post("/history", {"delete": [ids[0]]}) == (200, "")
    assert list(await sim.get_json("/api/history")) == ids[1:]
    assert await sim.post("/api/history", {"clear": True}) == (200, "")
    assert await sim.get_json("/history") == {}


async def test_sensitive_extra_data_stays_out_of_queue_and_history(sim: RunningSimulator, ws: WsRecorder) -> None:
    extra_data = {"auth_token_comfy_org": "secret", "api_key_comfy_org": "secret", "kept": 1}
    _, _, entry = await run(sim, ws, workflow("image.json"), extra_data=extra_data)
    assert entry["prompt"][3] == {"kept": 1, "client_id": "x"}


async def test_prompt_numbers_front_and_explicit(sim: RunningSimulator, ws: WsRecorder) -> None:
    _, body = await sim.post_prompt(sleeping(10, 10))
    # Once the first prompt runs, the others queue behind it (else front=true would overtake it).
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"] == {"node": "2", "display_node": "2", "prompt_id": body["prompt_id"]})
    _, front = await sim.post_prompt(workflow("image.json"), front=True)
    _, explicit = await sim.post_prompt(workflow("batch.json"), number=7)
    _, later = await sim.post_prompt(workflow("preview.json"))
    assert [body["number"], front["number"], explicit["number"], later["number"]] == [0, -1, 7.0, 2]
    assert isinstance(explicit["number"], float), "ComfyUI answers float(number)"
    queue = await sim.get_json("/queue")
    assert [item[0] for item in queue["queue_pending"]] == [-1, 7.0, 2], "the heap list, as ComfyUI returns it"
    await sim.post("/interrupt", {})
    await ws.wait_finished(explicit["prompt_id"])
    started = [m["data"]["prompt_id"] for m in ws.messages if m["type"] == "execution_start"]
    assert started == [body["prompt_id"], front["prompt_id"], later["prompt_id"], explicit["prompt_id"]]


async def test_more_validation_shapes(sim: RunningSimulator, ws: WsRecorder) -> None:
    prompt = workflow("image.json")
    prompt["1"]["inputs"]["width"] = 0
    status, body = await sim.post_prompt(prompt)
    [error] = body["node_errors"]["1"]["errors"]
    assert status == 400 and error["type"] == "value_smaller_than_min" and error["message"] == "Value 0 smaller than min of 1"

    prompt = workflow("fail.json")
    prompt["2"]["inputs"]["mode"] = "bogus"
    status, body = await sim.post_prompt(prompt)
    [error] = body["node_errors"]["2"]["errors"]
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "mode: 'bogus' not in ['runtime_error', 'torch_oom']"

    prompt = workflow("video_mp4.json")
    prompt["4"]["inputs"]["video"] = ["2", 0]
    status, body = await sim.post_prompt(prompt)
    [error] = body["node_errors"]["4"]["errors"]
    assert error["type"] == "return_type_mismatch" and error["details"] == "video, received_type(IMAGE) mismatch input_type(VIDEO)"

    # One valid output is enough: the prompt is queued, node_errors name the invalid one, and
    # only the valid output runs.
    prompt = workflow("image.json")
    prompt["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI"}}
    prompt["4"] = {"class_type": "EmptyImage", "inputs": {"width": -5, "height": 8, "batch_size": 1, "color": 0}}
    prompt["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "never"}}
    start = len(ws.messages)
    status, body = await sim.post_prompt(prompt)
    assert status == 200 and list(body["node_errors"]) == ["4"] and body["node_errors"]["4"]["dependent_outputs"] == ["5"]
    await ws.wait_finished(body["prompt_id"], start)
    [entry] = (await sim.get_json(f"/history/{body['prompt_id']}")).values()
    assert entry["prompt"][4] == ["2", "3"] and sorted(entry["outputs"]) == ["2", "3"]
    assert entry["outputs"]["3"]["images"][0]["filename"] == "ComfyUI_00001_.png"


async def test_view_headers_ranges_and_channels(sim: RunningSimulator, ws: WsRecorder) -> None:
    _, _, entry = await run(sim, ws, workflow("image.json"))
    [image] = entry["outputs"]["2"]["images"]
    url = f"{sim.url}/view"
    size = (sim.data_dir / "output" / image["filename"]).stat().st_size
    async with sim.http.get(url, params=image) as response:
        assert response.status == 200 and response.headers["Accept-Ranges"] == "bytes"
        assert response.headers["ETag"] and response.headers["Last-Modified"]
        assert int(response.headers["Content-Length"]) == size
    async with sim.http.get(url, params=image, headers={"Range": "bytes=0-9"}) as response:
        assert response.status == 206 and len(await response.read()) == 10
        assert response.headers["Content-Range"] == f"bytes 0-9/{size}"
    async with sim.http.head(url, params=image) as response:
        assert response.status == 200 and response.content_type == "image/png"
    async with sim.http.get(url, params={**image, "channel": "a"}) as response:
        alpha = Image.open(io.BytesIO(await response.read()))
        assert alpha.mode == "RGBA" and alpha.getpixel((0, 0)) == (0, 0, 0, 255)
    async with sim.http.get(url, params={**image, "preview": "jpeg;80"}) as response:
        assert response.content_type == "image/jpeg" and Image.open(io.BytesIO(await response.read())).format == "JPEG"


async def test_upload_refuses_paths_outside_its_folder(sim: RunningSimulator) -> None:
    form = aiohttp.FormData()
    form.add_field("image", b"png", filename="x.png")
    form.add_field("subfolder", "../..")
    async with sim.http.post(f"{sim.url}/upload/image", data=form) as response:
        assert response.status == 400 and await response.text() == ""


async def test_object_info_describes_every_node_and_lists_input_images(sim: RunningSimulator) -> None:
    form = aiohttp.FormData()
    form.add_field("image", b"not checked", filename="listed.png")
    async with sim.http.post(f"{sim.url}/api/upload/image", data=form) as response:
        assert response.status == 200
    info = await sim.get_json("/object_info")
    assert sorted(info) == sorted(
        ["EmptyImage", "SaveImage", "PreviewImage", "LoadImage", "ImageInvert", "ImageAddNoise", "SaveAnimatedWEBP",
         "SaveAnimatedPNG", "SaveWEBM", "CreateVideo", "SaveVideo", "SaveImageWebsocket", "TestSleepProgress", "TestFail", "TestFlaky"]
    )
    assert info["LoadImage"]["input"]["required"]["image"] == [["listed.png"], {"image_upload": True}]
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input_order"] == {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]}
    assert info["EmptyImage"]["input"]["required"]["width"] == ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
