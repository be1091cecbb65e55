"""stage_images against the ComfyUI simulator: images from data URIs and URLs land in ComfyUI's input
folder under the names the activity returns, the same image twice gets the same name, and bad sources
fail the job at once while transient trouble is left to Temporal's retries."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import tempfile
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from PIL import Image
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.inputs import ImageStager, InputActivities
from app.comfy.client import ComfyClient
from app.images.load_image import comfy_upload_name
from app.images.loading import load_image_source
from app.images.sources import STORED_INPUT_PREFIX
from app.models import StageImagesInput, StageImagesResult, StepHeartbeat
from app.storage import LocalStorage
from tests.harness import ComfyUITarget, SimulatorProcess, assert_eventually, serve_locally

BACKEND = "comfyui-1"
JOB_ID = "3f1f8a52-2f43-4c1e-9a57-0f6d2c1e9b11"


def unique_png() -> bytes:
    """A PNG no other test uploads: random pixels, so names already in ComfyUI's input folder cannot match."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (8, 8), os.urandom(8 * 8 * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def image_host() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """A web server on 127.0.0.1 that serves `files[name]` as an image at `<url>/<name>`, or HTTP 500."""
    files: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        if body is None:
            return web.Response(status=500)
        return web.Response(body=body, headers={"Content-Type": "image/png"})

    app = web.Application()
    app.router.add_get("/{name}", serve)
    async with serve_locally(app) as url:
        yield url, files


def input_activities(comfy_url: str, http: httpx.AsyncClient, storage: LocalStorage | None = None) -> InputActivities:
    stager = ImageStager(http, storage or LocalStorage(Path(tempfile.mkdtemp())),
                         max_bytes=1 << 20, max_pixels=1 << 24, allow_private_urls=True)
    return InputActivities({BACKEND: ComfyClient(comfy_url, http)}, stager)


async def stage(
    activities: InputActivities, images: dict[str, str], heartbeats: list[Any] | None = None
) -> StageImagesResult:
    environment = ActivityEnvironment()
    if heartbeats is not None:
        environment.on_heartbeat = lambda *details: heartbeats.append(details)
    prompt = {key.removesuffix(".image"): {"class_type": "LoadImage", "inputs": {"image": source}}
              for key, source in images.items()}
    request = StageImagesInput(job_id=JOB_ID, backend=BACKEND, prompt=prompt, images=images)
    return await environment.run(activities.stage_images, request)


async def comfy_input_file(comfyui: ComfyUITarget, http: httpx.AsyncClient, name: str) -> bytes:
    response = await http.get(f"{comfyui.url}/view", params={"filename": name, "type": "input"})
    assert response.status_code == 200, f"ComfyUI has no input file {name}"
    return response.content


async def test_images_from_a_data_uri_and_a_url_are_uploaded_under_the_returned_names(
    comfyui: ComfyUITarget, http: httpx.AsyncClient, image_host: tuple[str, dict[str, bytes]]
) -> None:
    host_url, files = image_host
    inline, fetched = unique_png(), unique_png()
    files["photo.png"] = fetched
    heartbeats: list[Any] = []
    activities = input_activities(comfyui.url, http)
    images = {"1.image": data_uri(inline), "3.image": f"{host_url}/photo.png"}

    result = await stage(activities, images, heartbeats)

    assert set(result.names) == {"1.image", "3.image"}
    assert result.prompt["3"]["inputs"]["image"] == result.names["3.image"]
    assert await comfy_input_file(comfyui, http, result.names["1.image"]) == inline
    assert await comfy_input_file(comfyui, http, result.names["3.image"]) == fetched
    assert [StepHeartbeat.model_validate(details).done for details, in heartbeats] == [0] * len(heartbeats)
    again = await stage(activities, images)
    assert again.names == result.names


async def test_an_image_the_api_stored_is_read_from_storage(
    comfyui: ComfyUITarget, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    png = unique_png()
    storage = LocalStorage(tmp_path)
    storage.put_bytes("inputs/abc.png", png, "image/png")
    activities = input_activities(comfyui.url, http, storage)
    result = await stage(activities, {"1.image": f"{STORED_INPUT_PREFIX}inputs/abc.png"})
    assert await comfy_input_file(comfyui, http, result.names["1.image"]) == png
    with pytest.raises(ApplicationError) as raised:
        await stage(activities, {"1.image": f"{STORED_INPUT_PREFIX}inputs/gone.png"})
    assert raised.value.type == "VALIDATION_ERROR" and raised.value.non_retryable


async def test_the_name_comfyui_returns_wins_over_the_one_asked_for(
    comfyui: ComfyUITarget, http: httpx.AsyncClient
) -> None:
    png = unique_png()
    loaded = await load_image_source(
        data_uri(png), http=http, max_bytes=1 << 20, max_pixels=1 << 24, allow_private_urls=False)
    asked_for = comfy_upload_name(loaded)
    # Someone else's file already has that name: ComfyUI keeps it and renames our upload.
    await ComfyClient(comfyui.url, http).upload_image(
        name=asked_for, data=unique_png(), content_type="image/png", overwrite=True
    )

    result = await stage(input_activities(comfyui.url, http), {"1.image": data_uri(png)})

    assert result.names["1.image"] == asked_for.replace(".png", " (1).png")
    assert await comfy_input_file(comfyui, http, result.names["1.image"]) == png


async def test_a_bad_source_fails_at_once_naming_its_field(
    comfyui: ComfyUITarget, http: httpx.AsyncClient
) -> None:
    not_an_image = "data:image/png;base64," + base64.b64encode(b"<html>a web page, not a picture</html>").decode()
    with pytest.raises(ApplicationError) as caught:
        await stage(input_activities(comfyui.url, http), {"1.image": data_uri(unique_png()), "7.image": not_an_image})
    error = caught.value
    assert error.type == "VALIDATION_ERROR" and error.non_retryable
    assert error.message.startswith("7.image: is not a PNG")
    [details] = error.details
    assert details["fields"] == [{"field": "7.image", "message": error.message.removeprefix("7.image: ")}]


async def test_a_failing_image_server_is_retried(
    comfyui: ComfyUITarget, http: httpx.AsyncClient, image_host: tuple[str, dict[str, bytes]]
) -> None:
    host_url, _ = image_host
    with pytest.raises(ApplicationError) as caught:
        await stage(input_activities(comfyui.url, http), {"1.image": f"{host_url}/not-served-yet.png"})
    assert caught.value.type == "IMAGE_FETCH_FAILED" and not caught.value.non_retryable
    assert "HTTP 500" in caught.value.message


async def test_an_unreachable_comfyui_is_waited_for_with_a_warning(http: httpx.AsyncClient, tmp_path: Path) -> None:
    simulator = SimulatorProcess(tmp_path)  # not started yet: nothing answers at its port
    heartbeats: list[Any] = []
    staging = asyncio.create_task(stage(input_activities(simulator.url, http), {"1.image": data_uri(unique_png())},
                                        heartbeats))
    try:
        warned = lambda: [beat for beat, in heartbeats if (beat.get("warning") or {}).get("code") == "COMFYUI_UNREACHABLE"]
        await assert_eventually(lambda: warned(), timeout=10)
        assert not staging.done()
        simulator.start()
        result = await asyncio.wait_for(staging, 30)
        assert result.names["1.image"].startswith("gw_")
    finally:
        staging.cancel()
        simulator.kill()
