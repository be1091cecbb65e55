"""Jobs with STORAGE_PROVIDER=s3 end to end: API → Temporal → worker → ComfyUI simulator → a real S3 HTTP
endpoint (moto's server in a child process), with presigned URLs, the /outputs redirect, image inputs staged
through the bucket, a 50 MB output streamed in bounded memory, and a bucket that is down for a while."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from temporalio.client import Client

from tests.harness import (
    DONE,
    ComfyUITarget,
    Gateway,
    MotoServerProcess,
    api_client,
    assert_eventually,
    comfy_history_for_job,
    free_port,
    gateway_settings,
    migrate_database,
    recorded_workflow,
    wait_for_job,
)
from worker.main import running_worker


@pytest.fixture
def bucket(s3_server: MotoServerProcess) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def gateway_overrides(s3_server: MotoServerProcess, bucket: str) -> dict[str, Any]:
    return s3_server.storage_settings(bucket)


def png_data_uri(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def still_and_animated_graph(inline_image: str) -> dict[str, Any]:
    """An inline image inverted and saved (a still), and an animated WEBP of noisy frames, in one prompt."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": inline_image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "gw_s3"}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 4, "color": 0x336699}},
        "5": {"class_type": "ImageAddNoise", "inputs": {"image": ["4", 0], "seed": 1, "strength": 0.3}},
        "6": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["5", 0], "filename_prefix": "gw_s3_anim", "fps": 4.0, "lossless": False, "quality": 80,
            "method": "fastest"}},
    }


async def comfy_original(comfyui: ComfyUITarget, job_id: str, node_id: str) -> bytes:
    [run] = await comfy_history_for_job(comfyui.url, job_id)
    [entry] = run["outputs"][node_id]["images"]
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{comfyui.url}/view", params=entry)).content


async def test_outputs_and_inputs_go_through_the_bucket(gateway: Gateway, s3_server: MotoServerProcess, bucket: str) -> None:
    job = await gateway.run({"workflowJson": still_and_animated_graph(png_data_uri((255, 0, 0))),
                             "outputFormat": "jpg", "quality": 70})
    assert job["status"] == "succeeded", job
    job_id = job["jobId"]
    still, animated = job["outputs"]
    objects = {item["Key"] for item in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert any(key.startswith("inputs/") for key in objects)  # the inline image went through the bucket too

    # The still: converted to JPEG; what the output records describes the object in the bucket.
    assert still["contentType"] == "image/jpeg" and still["filename"].startswith("gw_s3_") and still["filename"].endswith(".jpg")
    assert still["storagePath"] == f"s3://{bucket}/{job_id}/0/{still['filename']}"
    async with httpx.AsyncClient() as outside:  # a client of the store, not of the gateway
        stored = await outside.get(still["url"])
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/jpeg"
    assert still["size"] == len(stored.content) and still["sha256"] == hashlib.sha256(stored.content).hexdigest()
    picture = Image.open(io.BytesIO(stored.content))
    assert picture.format == "JPEG" and picture.size == (16, 16)
    red, green, blue = picture.convert("RGB").getpixel((8, 8))
    assert red < 20 and green > 235 and blue > 235  # the red input, inverted: staged from the bucket to ComfyUI

    # The gateway's own route redirects to a URL signed now; base64 streams from the object.
    redirect = await gateway.api.get(f"/outputs/{job_id}/{still['filename']}")
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(f"{s3_server.url}/{bucket}/")
    async with httpx.AsyncClient() as outside:
        assert (await outside.get(redirect.headers["location"])).content == stored.content
    inline = (await gateway.api.get(f"/outputs/{job_id}/{still['filename']}", params={"format": "base64"})).json()
    assert base64.b64decode(inline["data"]) == stored.content and inline["contentType"] == "image/jpeg"

    # The animated WEBP: untouched, byte for byte what ComfyUI wrote.
    assert animated["animated"] is True and animated["contentType"] == "image/webp"
    async with httpx.AsyncClient() as outside:
        assert (await outside.get(animated["url"])).content == await comfy_original(gateway.comfyui, job_id, "6")


class ResidentMemoryPeak:
    """The peak growth of the process's resident memory (VmRSS, sampled every 10 ms) over the block. Not
    tracemalloc: stopping it while the SDKs' native threads allocate crashes Python 3.11 (bench/s3_memory.py
    measures the Python heap in a process of its own)."""

    def __enter__(self) -> "ResidentMemoryPeak":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/self/status")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        self.growth = self.peak - self.start


MB = 1024 * 1024


@pytest.mark.settings(max_image_size=8192)
async def test_a_50_mb_output_is_streamed_to_the_bucket_in_bounded_memory(
    gateway: Gateway, s3_server: MotoServerProcess, bucket: str
) -> None:
    """A 4200×4200 PNG of full-entropy noise (50 MB: PNG cannot shrink it) goes from ComfyUI's /view to the bucket
    in parts, the worker (in this process, with the API) holding a small part of it at a time."""
    noise = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4200, "height": 4200, "batch_size": 1, "color": 0x808080}},
        # Uniform noise of ±128 around mid-grey: every byte of every pixel equally likely.
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 7, "strength": 0.29}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "gw_big"}},
    }
    with ResidentMemoryPeak() as resident:
        job = await gateway.run({"workflowJson": noise}, timeout=120)
    assert job["status"] == "succeeded", job
    [output] = job["outputs"]
    assert output["size"] >= 50 * MB and output["contentType"] == "image/png"
    # Holding the file whole would take its 50 MB at least (an allocation that large is always fresh memory).
    assert resident.growth < 40 * MB, f"resident memory grew {resident.growth / MB:.1f} MB"

    head = s3_server.client().head_object(Bucket=bucket, Key=f"{job['jobId']}/0/{output['filename']}")
    assert head["ContentLength"] == output["size"] and head["ETag"].strip('"').count("-") == 1  # multipart
    digest = hashlib.sha256()
    async with httpx.AsyncClient() as outside, outside.stream("GET", output["url"]) as stored:
        async for chunk in stored.aiter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == output["sha256"]


async def test_a_bucket_down_during_collect_is_retried_until_it_returns(
    temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    """The store is down when the outputs are collected: the job stays running, Temporal retries the step as
    STORAGE_ERROR, and once the store answers the job succeeds with its file in the bucket."""
    store = MotoServerProcess(tmp_path, port=free_port())  # nothing listens there yet
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue, **store.storage_settings("outputs"))
    migrate_database(settings)
    try:
        async with running_worker(temporal_client, settings), api_client(settings, temporal_client) as api:
            gateway = Gateway(api, settings, comfyui)
            small = recorded_workflow("image.json")
            small["1"]["inputs"] |= {"width": 32, "height": 32}
            job_id = await gateway.submit({"workflowJson": small})
            handle = temporal_client.get_workflow_handle(job_id)

            async def collect_retried() -> bool:
                pending = (await handle.describe()).raw_description.pending_activities
                return any(a.activity_type.name == "collect_outputs" and a.attempt >= 2 for a in pending)

            await assert_eventually(collect_retried, timeout=60, interval=0.2, what="collect_outputs retried")
            [failure] = [a.last_failure for a in (await handle.describe()).raw_description.pending_activities]
            # Temporal keeps a pending activity's last failure short (4 KB), cutting where it must: look inside.
            assert 'type: "STORAGE_ERROR"' in str(failure), failure
            assert (await api.get(f"/jobs/{job_id}")).json()["status"] in ("queued", "running")

            await asyncio.to_thread(store.start)
            store.create_bucket("outputs")
            job = await wait_for_job(api, job_id, until=DONE, timeout=90)
            assert job["status"] == "succeeded", job
            keys = {item["Key"] for item in store.client().list_objects_v2(Bucket="outputs")["Contents"]}
            assert {f"{job_id}/{index}/{output['filename']}" for index, output in enumerate(job["outputs"])} == keys
    finally:
        store.kill()


async def test_an_inline_image_the_bucket_cannot_take_is_a_storage_error_and_no_job(
    temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    down = MotoServerProcess(tmp_path, port=free_port())  # never started
    settings = gateway_settings(temporal_client, f"http://127.0.0.1:{free_port()}", tmp_path, task_queue,
                                **down.storage_settings("outputs"))
    migrate_database(settings)
    async with api_client(settings, temporal_client) as api:
        response = await api.post("/jobs", json={"workflowJson": still_and_animated_graph(png_data_uri((1, 2, 3)))})
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "STORAGE_ERROR"
        assert (await api.get("/jobs")).json()["count"] == 0
