"""Image inputs end to end: by data URI, base64 and URL, into a template or a raw graph's LoadImage."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from PIL import Image

from tests.harness import Gateway, recorded_workflow, serve_locally

RED_PNG = io.BytesIO()
Image.new("RGB", (24, 16), (255, 0, 0)).save(RED_PNG, format="PNG")
RED = RED_PNG.getvalue()
DATA_URI = f"data:image/png;base64,{base64.b64encode(RED).decode()}"


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    async def red(_: web.Request) -> web.Response:
        return web.Response(body=RED, content_type="image/png")

    app = web.Application()
    app.router.add_get("/red.png", red)
    async with serve_locally(app) as url:
        yield url


async def inverted_output(gateway: Gateway, job: dict) -> Image.Image:
    assert job["status"] == "succeeded", job
    [output] = job["outputs"]
    return Image.open(io.BytesIO((await gateway.api.get(output["url"])).content)).convert("RGB")


@pytest.mark.parametrize("source", [DATA_URI, base64.b64encode(RED).decode()], ids=["data-uri", "base64"])
async def test_invert_template_with_an_inline_image(gateway: Gateway, source: str) -> None:
    job = await gateway.run({"workflowId": "invert_image", "inputs": {"image": source}})
    image = await inverted_output(gateway, job)
    assert image.size == (24, 16) and image.getpixel((3, 3)) == (0, 255, 255)


async def test_inline_images_are_stored_and_referenced_never_carried(gateway: Gateway) -> None:
    from app.db import make_engine, session_scope
    from app.jobstore import get_job

    job = await gateway.run({"workflowId": "invert_image", "inputs": {"image": DATA_URI}})
    with session_scope(make_engine(gateway.settings.resolved_database_url)) as session:
        stored = get_job(session, job["jobId"]).inputs["image"]
    assert stored.startswith("stored-input://inputs/") and len(stored) < 200


@pytest.mark.settings(input_image_allow_private_urls=True)  # the test's image host is on 127.0.0.1
async def test_invert_template_with_an_image_url(gateway: Gateway, image_host: str) -> None:
    job = await gateway.run({"workflowId": "invert_image", "inputs": {"image": f"{image_host}/red.png"}})
    assert (await inverted_output(gateway, job)).getpixel((0, 0)) == (0, 255, 255)


async def test_raw_graph_load_image_takes_a_data_uri(gateway: Gateway) -> None:
    graph = recorded_workflow("loadimage.json")
    graph["1"]["inputs"]["image"] = DATA_URI
    job = await gateway.run({"workflowJson": graph})
    assert (await inverted_output(gateway, job)).getpixel((1, 1)) == (0, 255, 255)


async def test_raw_graph_image_through_a_placeholder_is_stored_like_a_template_input(gateway: Gateway) -> None:
    graph = recorded_workflow("loadimage.json")
    graph["1"]["inputs"]["image"] = "{{picture}}"
    job = await gateway.run({"workflowJson": graph, "inputs": {"picture": DATA_URI}})
    assert (await inverted_output(gateway, job)).getpixel((1, 1)) == (0, 255, 255)


@pytest.mark.parametrize(
    "picture",
    ["data:text/plain;base64,aGVsbG8=", "file:///etc/passwd", "stored-input://inputs/somebody-elses.png"],
)
async def test_raw_graph_placeholder_images_are_checked_before_a_job_exists(gateway: Gateway, picture: str) -> None:
    """A placeholder must not carry past the checks what the graph itself could not hold."""
    graph = recorded_workflow("loadimage.json")
    graph["1"]["inputs"]["image"] = "{{picture}}"
    response = await gateway.api.post("/jobs", json={"workflowJson": graph, "inputs": {"picture": picture}})
    assert response.status_code == 400, response.text
    assert [issue["field"] for issue in response.json()["error"]["details"]["fields"]] == ["inputs.picture"]
    assert (await gateway.api.get("/jobs")).json()["count"] == 0


async def test_private_addresses_are_refused_for_url_inputs(gateway: Gateway, image_host: str) -> None:
    # A literal address is refused at once; a name is resolved, and refused, when the job fetches it.
    literal = await gateway.api.post("/jobs", json={"workflowId": "invert_image",
                                                    "inputs": {"image": f"{image_host}/red.png"}})
    assert literal.status_code == 400 and "loopback" in literal.json()["error"]["message"]
    by_name = image_host.replace("127.0.0.1", "localhost")
    job = await gateway.run({"workflowId": "invert_image", "inputs": {"image": f"{by_name}/red.png"}})
    assert job["status"] == "failed" and job["error"]["code"] == "VALIDATION_ERROR"
    assert "1.image" in job["error"]["message"] and "127.0.0.1" in job["error"]["message"]


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("photo.png", "must be an image"),
        ("ftp://example.com/a.png", "only http and https"),
        ("http:///no-host.png", "with a host"),
        ("http://[::1]/a.png", "loopback"),
        ("http://10.1.2.3/a.png", "private"),
        ("http://2130706433/a.png", "loopback"),
        ("http://0x7f.0.0.1/a.png", "loopback"),
        ("data:image/png;base64," + base64.b64encode(b"<html>not a picture</html>").decode(), "is not"),
        ("stored-input://inputs/somebody-elses.png", "must be an image"),
    ],
)
async def test_bad_image_inputs_are_400_before_a_job_exists(gateway: Gateway, image: str, reason: str) -> None:
    response = await gateway.api.post("/jobs", json={"workflowId": "invert_image", "inputs": {"image": image}})
    assert response.status_code == 400, response.text
    [issue] = response.json()["error"]["details"]["fields"]
    assert issue["field"] == "inputs.image" and reason in issue["message"]
    assert (await gateway.api.get("/jobs")).json()["count"] == 0


@pytest.mark.settings(input_image_max_bytes=1024)
async def test_inline_images_over_the_size_limit_are_refused(gateway: Gateway) -> None:
    big = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(big, format="PNG")  # noise: ~12 KB
    uri = f"data:image/png;base64,{base64.b64encode(big.getvalue()).decode()}"
    response = await gateway.api.post("/jobs", json={"workflowId": "invert_image", "inputs": {"image": uri}})
    assert response.status_code == 400 and response.json()["error"]["details"]["fields"][0]["field"] == "inputs.image"
