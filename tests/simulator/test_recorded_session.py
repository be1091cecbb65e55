"""Replays the recorded ComfyUI 0.3.64 session against one simulator and compares every answer.

The recordings were made by one client ("x") running the scenarios of results.json in a fixed
order on one server, and the output cache makes each run depend on the one before (which nodes
come from cache, hence which events are sent). So this module replays the same requests in the
same order on one simulator, and its tests must run in file order; a failure early on can make
later tests fail too.

What is compared, after normalising prompt ids, timestamps and file counters (see support.py):
  * POST /prompt status and body, including the per-process `number`;
  * the complete WebSocket message list of each run, message by message and key by key
    (binary frames by event type and format), with one documented exception in the queue scenario;
  * the complete /history entry, and /view of every output file (plus the files' contents);
  * every recorded 400 body, the 500 for a non-JSON body, /view status codes, uploads.
Status broadcasts are compared exactly: in this replay, as in the recording, client "x" is the
only long-lived socket, so it sees every status broadcast the recording shows.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import av
import pytest
from PIL import Image

from .support import (
    RECORDINGS,
    SUMMARY,
    RunningSimulator,
    WsRecorder,
    as_json,
    message_types,
    normalized,
    start_simulator,
    workflow,
)

# Files the replayed runs produced, by scenario, for the /view checks further down.
PRODUCED: dict[str, dict[str, Any]] = {}

UPLOAD_PNG = Image.new("RGB", (32, 24), (10, 200, 30))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
async def replay(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[RunningSimulator, WsRecorder]]:
    # time_scale 0.15: slow.json's 20 one-second steps take 150 ms each, leaving ample time to
    # interrupt between two progress events.
    sim = await start_simulator(tmp_path_factory.mktemp("replay"), time_scale=0.15)
    ws = await WsRecorder(sim, "x").connect()
    yield sim, ws
    await ws.close()
    await sim.stop()


def recorded_entry(scenario: str) -> tuple[str, dict[str, Any]]:
    [(prompt_id, entry)] = RECORDINGS[scenario]["history"].items()
    return prompt_id, entry


async def run_recorded(sim: RunningSimulator, ws: WsRecorder, scenario: str) -> tuple[dict, list, dict, dict[str, str]]:
    """POST the prompt the recording posted; return (post body, ws messages, history, id map)."""
    recorded_id, entry = recorded_entry(scenario)
    number, _, prompt, extra_data, _ = entry["prompt"]
    extra = {key: value for key, value in extra_data.items() if key != "client_id"}
    body: dict[str, Any] = {"extra_data": extra} if extra else {}
    if not recorded_id.count("-") == 4:  # the recording let the client choose a non-uuid id
        body["prompt_id"] = recorded_id
    start = len(ws.messages)
    status, response = await sim.post_prompt(prompt, **body)
    assert status == RECORDINGS[scenario]["post_status"] == 200
    assert list(response) == ["prompt_id", "number", "node_errors"]
    assert response["number"] == number and response["node_errors"] == {}
    prompt_id = response["prompt_id"]
    messages = await ws.wait_finished(prompt_id, start)
    history = await sim.get_json(f"/history/{prompt_id}")
    return response, messages, history, {recorded_id: "<prompt_id>", prompt_id: "<prompt_id>"}


async def test_probe_endpoints_match_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, ws = replay
    for path in ("/system_stats", "/api/system_stats"):
        stats = await sim.get_json(path)
        recorded = SUMMARY["GET /system_stats"][1]
        assert list(stats) == list(recorded)
        assert list(stats["system"]) == [*recorded["system"], "simulator"] and stats["system"]["simulator"] is True
        assert stats["system"]["comfyui_version"] == "0.3.64"
        assert [list(device) for device in stats["devices"]] == [list(device) for device in recorded["devices"]]
    assert await sim.get_json("/features") == SUMMARY["GET /features"][1]
    assert await sim.get_json("/prompt") == SUMMARY["GET /prompt"][1]
    assert await sim.get_json("/queue") == SUMMARY["GET /queue"][1]
    assert as_json(await sim.get_json("/object_info/TestSleepProgress")) == as_json(SUMMARY["GET /object_info/TestSleepProgress"][1])
    assert await sim.get_json("/object_info/NoSuchNode") == {}
    assert await sim.get_json("/history/unknown") == SUMMARY["GET /history/unknown"][1]

    recorded_greeting = {k: v for k, v in SUMMARY["ws_initial_status"].items() if k != "t"}
    assert ws.messages[0] == recorded_greeting

    flags_client = await WsRecorder(sim, "ff-cd625f").connect({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    await flags_client.wait_for(lambda m: m["type"] == "feature_flags")
    recorded_exchange = [{k: v for k, v in m.items() if k != "t"} for m in SUMMARY["ws_feature_flags_exchange"]]
    assert flags_client.messages == recorded_exchange
    await flags_client.close()


async def test_upload_renames_like_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, _ = replay

    async def upload(content: bytes, name: str, **fields: str) -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("image", content, filename=name, content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        async with sim.http.post(f"{sim.url}/upload/image", data=form) as response:
            return response.status, (await response.json() if response.status == 200 else await response.text())

    recorded = SUMMARY["upload"]
    original = png_bytes(UPLOAD_PNG)
    different = png_bytes(Image.new("RGB", (4, 4), (1, 2, 3)))
    assert await upload(original, "gw_upload.png", type="input", overwrite="true") == tuple(recorded["overwrite"])
    assert await upload(original, "gw_upload.png", type="input") == tuple(recorded["same_again_no_overwrite"])
    assert await upload(original, "gw_upload_dupe.png", subfolder="gw") == tuple(recorded["subfolder_gw"])
    assert await upload(different, "gw_upload_dupe.png", subfolder="gw") == tuple(recorded["subfolder_gw_same_name_different_content"])
    async with sim.http.post(f"{sim.url}/upload/image", data={"type": "input"}) as response:
        assert [response.status, await response.text()] == recorded["missing_image_field"]
    input_dir = sim.data_dir / "input"
    assert (input_dir / "gw_upload.png").read_bytes() == original
    assert (input_dir / "gw" / "gw_upload_dupe (1).png").read_bytes() == different


RUN_SCENARIOS = [
    "image.json",
    "batch.json",
    "video.json",
    "video_png.json",
    "video_webm.json",
    "video_mp4.json",
    "loadimage.json",
    "fail.json",
    "fail_oom.json",
    "preview.json",
    "ws_image.json",
    "image.json (rerun, cached)",
    "image.json (client prompt_id)",
    "flaky.json #1",
    "flaky.json #2",
    "flaky.json #3",
]


@pytest.mark.parametrize("scenario", RUN_SCENARIOS)
async def test_run_matches_recording(replay: tuple[RunningSimulator, WsRecorder], scenario: str) -> None:
    sim, ws = replay
    _, messages, history, ids = await run_recorded(sim, ws, scenario)
    recorded = RECORDINGS[scenario]
    assert message_types(messages) == recorded["ws_types"]
    assert as_json(normalized(messages, ids)) == as_json(normalized(recorded["ws_msgs"], ids))
    assert as_json(normalized(history, ids)) == as_json(normalized(recorded["history"], ids))
    [entry] = history.values()
    PRODUCED[scenario] = entry["outputs"]
    await check_views(sim, scenario, entry["outputs"])


async def check_views(sim: RunningSimulator, scenario: str, outputs: dict[str, Any]) -> None:
    """/view of each output answers like the recorded /view, and the file holds what it should."""
    files = [(node, key, item) for node, ui in outputs.items() for key, items in ui.items() if key == "images" for item in items]
    recorded_views = RECORDINGS[scenario]["views"]
    assert len(files) == len(recorded_views)
    for (node, key, item), recorded in zip(files, recorded_views):
        assert (node, key) == (recorded["node"], recorded["key"])
        async with sim.http.get(f"{sim.url}/view", params=item) as response:
            assert response.status == recorded["status"] == 200
            assert response.content_type == recorded["content_type"]
            assert response.headers["Content-Disposition"] == f'filename="{item["filename"]}"'
            check_file_content(scenario, item["filename"], await response.read())


def check_file_content(scenario: str, filename: str, content: bytes) -> None:
    if filename.endswith(".webm") or filename.endswith(".mp4"):
        with av.open(io.BytesIO(content)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert stream.codec_context.name == ("vp9" if filename.endswith(".webm") else "h264")
            assert len(frames) == 16 and (frames[0].width, frames[0].height) == (256, 256)
        return
    with Image.open(io.BytesIO(content)) as image:
        if scenario in ("video.json", "video_png.json"):
            assert image.format == ("WEBP" if scenario == "video.json" else "PNG")
            assert image.n_frames == 16, "ImageAddNoise must make the 16 frames differ"
        elif scenario == "loadimage.json":
            assert image.size == UPLOAD_PNG.size and image.getpixel((0, 0)) == (245, 55, 225)
        else:
            assert image.format == "PNG" and image.mode == "RGB"


async def test_slow_run_reports_progress_and_observer_sees_only_status(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, ws = replay
    observer = await WsRecorder(sim, "observer").connect()
    started = time.monotonic()
    _, messages, history, ids = await run_recorded(sim, ws, "slow.json")
    elapsed = time.monotonic() - started
    recorded = RECORDINGS["slow.json"]
    assert message_types(messages) == recorded["ws_types"]
    assert as_json(normalized(messages, ids)) == as_json(normalized(recorded["ws_msgs"], ids))
    assert as_json(normalized(history, ids)) == as_json(normalized(recorded["history"], ids))
    assert 20 * 0.15 <= elapsed < 20 * 0.15 + 2.0, "time_scale scales TestSleepProgress's 20 s"

    await asyncio.sleep(0.05)
    observed = observer.messages[1:]
    assert [m["type"] for m in observed] == ["status"] * 3
    assert [m["data"] for m in observed] == [m["data"] for m in SUMMARY["observer_saw_during_slow"]]
    await observer.close()


async def test_global_interrupt_matches_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, ws = replay
    recorded = RECORDINGS["slow.json interrupted (global POST /interrupt {})"]
    [(recorded_id, entry)] = recorded["history"].items()
    start = len(ws.messages)
    _, response = await sim.post_prompt(entry["prompt"][2])
    prompt_id = response["prompt_id"]
    assert response["number"] == recorded["post_response"]["number"]
    await ws.wait_for(lambda m: m["type"] == "progress" and m["data"]["value"] == 3, start)
    interrupted_at = time.monotonic()
    assert list(await sim.post("/interrupt", {})) == recorded["interrupt_response"]
    messages = await ws.wait_finished(prompt_id, start)
    assert time.monotonic() - interrupted_at < 0.3, "an interrupt is noticed within ~50 ms"
    ids = {recorded_id: "<prompt_id>", prompt_id: "<prompt_id>"}
    assert as_json(normalized(messages, ids)) == as_json(normalized(recorded["ws_msgs"], ids))
    history = await sim.get_json(f"/history/{prompt_id}")
    assert as_json(normalized(history, ids)) == as_json(normalized(recorded["history"], ids))


async def test_prompt_scoped_interrupt_matches_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, ws = replay
    recorded = RECORDINGS["slow.json interrupted (targeted)"]
    [(recorded_id, entry)] = recorded["history"].items()
    start = len(ws.messages)
    _, response = await sim.post_prompt(entry["prompt"][2])
    prompt_id = response["prompt_id"]
    await ws.wait_for(lambda m: m["type"] == "progress" and m["data"]["value"] == 3, start)
    assert list(await sim.post("/interrupt", {"prompt_id": "not-running"})) == recorded["wrong_id_response"]
    queue = await sim.get_json("/queue")
    assert [item[1] for item in queue["queue_running"]] == [prompt_id]
    assert list(await sim.post("/interrupt", {"prompt_id": prompt_id})) == recorded["right_id_response"]
    messages = await ws.wait_finished(prompt_id, start)
    assert message_types(messages) == recorded["ws_types"]
    history = await sim.get_json(f"/history/{prompt_id}")
    ids = {recorded_id: "<prompt_id>", prompt_id: "<prompt_id>"}
    assert as_json(normalized(history, ids)) == as_json(normalized(recorded["history"], ids))


def queue_summary(item: list[Any]) -> dict[str, Any]:
    """The recording's summary of a /queue item."""
    number, prompt_id, prompt, extra_data, outputs = item
    return {
        "number": number,
        "prompt_id": prompt_id,
        "prompt_keys": list(prompt),
        "extra_data": extra_data,
        "outputs_to_execute": outputs,
        "len": len(item),
    }


async def test_queue_delete_and_front_match_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, ws = replay
    recorded = RECORDINGS["queue"]
    start = len(ws.messages)
    slow = workflow("slow.json")
    _, a = await sim.post_prompt(slow)
    await ws.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == "2", start)
    _, b = await sim.post_prompt(slow)
    _, c = await sim.post_prompt(workflow("image.json"), front=True)
    ids = {}
    for label, posted in zip(["A(slow)", "B(slow)", "C(image, front=true)"], [a, b, c]):
        assert posted["number"] == recorded["posted"][label]["number"]
        ids[posted["prompt_id"]] = f"<{label[0]}>"
        ids[recorded["posted"][label]["prompt_id"]] = f"<{label[0]}>"

    queue = await sim.get_json("/queue")
    summary = {"queue_running": [queue_summary(i) for i in queue["queue_running"]], "queue_pending": [queue_summary(i) for i in queue["queue_pending"]]}
    assert normalized(summary, ids) == normalized(recorded["GET /queue while A running"], ids)
    assert normalized(queue["queue_running"][0], ids) == normalized(recorded["GET /queue raw item example"], ids)
    assert await sim.get_json("/prompt") == recorded["GET /prompt while A running"]
    assert [200, await sim.get_json(f"/history/{a['prompt_id']}")] == recorded["GET /history/A while running"]
    assert [200, await sim.get_json(f"/history/{b['prompt_id']}")] == recorded["GET /history/B while pending"]
    assert list(await sim.post("/queue", {"delete": [b["prompt_id"]]})) == recorded["POST /queue delete B"]
    queue = await sim.get_json("/queue")
    summary = {"queue_running": [queue_summary(i) for i in queue["queue_running"]], "queue_pending": [queue_summary(i) for i in queue["queue_pending"]]}
    assert normalized(summary, ids) == normalized(recorded["GET /queue after delete"], ids)

    await sim.post("/interrupt", {"prompt_id": a["prompt_id"]})
    messages = await ws.wait_finished(c["prompt_id"], start)
    assert await sim.get_json("/queue") == recorded["GET /queue at end"]
    assert await sim.get_json(f"/history/{b['prompt_id']}") == recorded["history B (deleted, never ran)"]
    for prompt, label in ((a, "history A status"), (c, "history C status")):
        [entry] = (await sim.get_json(f"/history/{prompt['prompt_id']}")).values()
        assert as_json(normalized(entry["status"], ids)) == as_json(normalized(recorded[label], ids))

    # A's progress events depend on how long the requests above took (the recording interrupted
    # A before its first step ended); they are left out, everything else must match exactly.
    a_started = next(i for i, m in enumerate(messages) if m["type"] == "executing")
    kept = [m for i, m in enumerate(messages) if not (i > a_started and m["type"] in ("progress", "progress_state") and m["data"]["prompt_id"] == a["prompt_id"])]
    observed = [[m["type"], m["data"].get("prompt_id")] for m in kept]
    assert normalized(observed, ids) == normalized(recorded["ws_types"], ids)
    assert b["prompt_id"] not in json.dumps([m["data"] for m in messages])


INVALID_PROMPTS = {
    "invalid_unknown_class.json": lambda: workflow("invalid_unknown_class.json"),
    "invalid_bad_value.json": lambda: workflow("invalid_bad_value.json"),
    "invalid_missing_input.json": lambda: workflow("invalid_missing_input.json"),
    "invalid_no_output.json": lambda: workflow("invalid_no_output.json"),
    "link to missing node": lambda: patched("image.json", "2", "images", ["99", 0]),
    "LoadImage missing file": lambda: patched("loadimage.json", "1", "image", "does_not_exist.png"),
    "missing class_type": lambda: {**workflow("image.json"), "1": {"inputs": workflow("image.json")["1"]["inputs"]}},
    "no prompt key": None,
    "width='abc'": lambda: patched("image.json", "1", "width", "abc"),
    "width='320' (string number)": lambda: patched("image.json", "1", "width", "320"),
}


def patched(name: str, node_id: str, input_name: str, value: Any) -> dict[str, Any]:
    prompt = workflow(name)
    prompt[node_id]["inputs"][input_name] = value
    return prompt


async def test_invalid_prompts_match_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, ws = replay
    start = len(ws.messages)
    for label, make_prompt in INVALID_PROMPTS.items():
        recorded_status, recorded_body = RECORDINGS["invalid"][label]
        if make_prompt is None:
            async with sim.http.post(f"{sim.url}/prompt", json={"client_id": "x"}) as response:
                status, body = response.status, await response.json()
        else:
            status, body = await sim.post_prompt(make_prompt())
        assert status == recorded_status, label
        if label == "link to missing node":
            # The traceback is the simulator's own; its type and shape are what must match.
            [error] = body["node_errors"]["2"]["errors"]
            traceback = error["extra_info"].pop("traceback")
            assert traceback and all(isinstance(frame, str) for frame in traceback)
            recorded_body = json.loads(json.dumps(recorded_body))
            recorded_body["node_errors"]["2"]["errors"][0]["extra_info"].pop("traceback")
        if status == 200:
            assert body["number"] == recorded_body["number"] and body["node_errors"] == {}
            await ws.wait_finished(body["prompt_id"], start)
            ids = {body["prompt_id"]: "<id>", recorded_body["prompt_id"]: "<id>"}
            last = await sim.get_json("/history", max_items=1)
            assert as_json(normalized(last, ids)) == as_json(normalized(SUMMARY["GET /history?max_items=1"], ids))
        else:
            assert as_json(body) == as_json(recorded_body), label

    async with sim.http.post(f"{sim.url}/prompt", data=b"this is not json") as response:
        assert [response.status, await response.text()] == RECORDINGS["invalid"]["body not json"]
        assert response.content_type == "text/plain"


async def test_view_answers_match_recording(replay: tuple[RunningSimulator, WsRecorder]) -> None:
    sim, _ = replay
    recorded = RECORDINGS["view"]
    [image] = PRODUCED["image.json"]["2"]["images"]
    name = image["filename"]
    [webp] = PRODUCED["video.json"]["3"]["images"]
    [mp4] = PRODUCED["video_mp4.json"]["4"]["images"]
    requests = {
        "ok": {"filename": name, "subfolder": "", "type": "output"},
        "preview=webp;50": {"filename": name, "subfolder": "", "type": "output", "preview": "webp;50"},
        "channel=rgb": {"filename": name, "subfolder": "", "type": "output", "channel": "rgb"},
        "missing file": {"filename": "nope.png", "subfolder": "", "type": "output"},
        "bad type": {"filename": name, "subfolder": "", "type": "bogus"},
        "dotdot filename": {"filename": "../x.png", "subfolder": "", "type": "output"},
        "subfolder traversal": {"filename": "x.png", "subfolder": "../..", "type": "output"},
        "input example.png": {"filename": "gw_upload.png", "subfolder": "", "type": "input"},
        "upload in subfolder gw": {"filename": "gw_upload_dupe.png", "subfolder": "gw", "type": "input"},
        "annotated 'name [output]'": {"filename": f"{name} [output]", "subfolder": "", "type": "input"},
        "no filename": {"type": "output"},
        "video webp": webp,
        "video mp4": mp4,
    }
    for label, params in requests.items():
        async with sim.http.get(f"{sim.url}/view", params=params) as response:
            body = await response.read()
            assert response.status == recorded[label]["status"], label
            if response.status == 200:
                assert response.content_type == recorded[label]["content_type"], label
                shown = params["filename"].removesuffix(" [output]")
                assert response.headers["Content-Disposition"] == f'filename="{shown}"', label
            else:
                assert body == b"", label

    async with sim.http.get(f"{sim.url}/api/view", params={"filename": name, "type": "output"}) as response:
        assert [response.status, response.content_type] == [recorded["/api/view no subfolder"]["status"], recorded["/api/view no subfolder"]["content_type"]]
