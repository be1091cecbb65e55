"""Output formats: still images re-encoded with Pillow, everything else untouched; the collect step records what
it stored (content type, size, sha256 of the converted file) under a key a retry replaces."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from PIL import Image
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.comfy import ComfyActivities
from app.comfy.client import ComfyClient
from app.comfy.health import BackendHealth
from app.models import CollectOutputsInput, OutputFormat
from app.output_formats import ScratchFile, in_output_format
from app.storage import LocalStorage, S3Storage
from tests.harness import free_port, serve_locally


def scratch(tmp_path: Path, image: Image.Image, pillow_format: str, name: str, **save: object) -> ScratchFile:
    path = tmp_path / f"{name}.download"
    image.save(path, pillow_format, **save)
    data = path.read_bytes()
    return ScratchFile(path=path, filename=name, content_type=f"image/{pillow_format.lower()}", size=len(data),
                       sha256=hashlib.sha256(data).hexdigest())


def noisy(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.effect_noise(size, 60).convert(mode)


@pytest.mark.parametrize(("output_format", "pillow_format", "content_type"),
                         [(OutputFormat.jpg, "JPEG", "image/jpeg"), (OutputFormat.webp, "WEBP", "image/webp")])
def test_a_png_becomes_the_format_asked_with_its_quality(
    tmp_path: Path, output_format: OutputFormat, pillow_format: str, content_type: str
) -> None:
    png = scratch(tmp_path, noisy(), "PNG", "gw_00001_.png")
    sizes = {}
    for quality in (20, 95):
        converted = in_output_format(png, tmp_path / f"q{quality}", output_format, quality)
        data = converted.path.read_bytes()
        assert converted.content_type == content_type and converted.filename == f"gw_00001_.{output_format.value}"
        assert converted.size == len(data) and converted.sha256 == hashlib.sha256(data).hexdigest()
        assert Image.open(io.BytesIO(data)).format == pillow_format
        sizes[quality] = converted.size
    assert sizes[20] < sizes[95]  # quality reaches the encoder


def test_jpg_of_an_image_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 4, 8))  # the left half fully transparent
    converted = in_output_format(scratch(tmp_path, image, "PNG", "a.png"), tmp_path / "out", OutputFormat.jpg, 95)
    jpeg = Image.open(converted.path).convert("RGB")
    assert all(channel > 245 for channel in jpeg.getpixel((1, 4)))  # transparent → white
    red, green, blue = jpeg.getpixel((6, 4))
    assert red > 230 and green < 30 and blue < 30


def test_webp_keeps_alpha(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    converted = in_output_format(scratch(tmp_path, image, "PNG", "a.png"), tmp_path / "out", OutputFormat.webp, 90)
    assert Image.open(converted.path).mode == "RGBA"


def test_a_still_already_in_the_format_is_not_re_encoded(tmp_path: Path) -> None:
    png = scratch(tmp_path, noisy(), "PNG", "a.png")
    assert in_output_format(png, tmp_path / "out", OutputFormat.png, 50) is png
    jpeg = scratch(tmp_path, noisy(), "JPEG", "b.jpg")
    assert in_output_format(jpeg, tmp_path / "out", OutputFormat.jpg, 50) is jpeg
    assert not (tmp_path / "out").exists()


def test_animated_images_and_other_files_pass_through(tmp_path: Path) -> None:
    frames = [noisy(), noisy()]
    animated = scratch(tmp_path, frames[0], "WEBP", "anim.webp", save_all=True, append_images=frames[1:])
    assert in_output_format(animated, tmp_path / "out", OutputFormat.jpg, 90) is animated
    video = tmp_path / "clip.download"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    other = ScratchFile(path=video, filename="clip.mp4", content_type="video/mp4", size=112, sha256="x")
    assert in_output_format(other, tmp_path / "out", OutputFormat.webp, 90) is other


def test_a_corrupt_still_is_stored_as_it_came_not_retried(tmp_path: Path) -> None:
    whole = scratch(tmp_path, noisy(), "PNG", "a.png")
    whole.path.write_bytes(whole.path.read_bytes()[: whole.size // 2])  # cut short: the header reads, pixels don't
    assert in_output_format(whole, tmp_path / "out", OutputFormat.jpg, 80) is whole


class FakeView:
    """ComfyUI's /view, serving one PNG whatever is asked."""

    def __init__(self, png: bytes) -> None:
        self.png = png
        self.app = web.Application()
        self.app.router.add_get("/view", self.view)

    async def view(self, request: web.Request) -> web.Response:
        return web.Response(body=self.png, content_type="image/png")


def collect_request(output_format: OutputFormat | None) -> CollectOutputsInput:
    return CollectOutputsInput(
        job_id="job-1", backend="local", timeout_seconds=30, output_format=output_format, output_quality=80,
        outputs={"9": {"images": [{"filename": "gw_00001_.png", "subfolder": "", "type": "output"}]}},
    )


async def collect(tmp_path: Path, storage: object, request: CollectOutputsInput, png: bytes) -> list:
    view = FakeView(png)
    async with serve_locally(view.app) as url, httpx.AsyncClient() as http:
        client = ComfyClient(url, http, BackendHealth("local", url))
        activities = ComfyActivities({"local": client}, storage, engine=None, scratch_dir=tmp_path / "scratch")  # type: ignore[arg-type]
        return (await ActivityEnvironment().run(activities.collect_outputs, request)).files


async def test_collect_stores_the_converted_file_under_a_key_a_retry_replaces(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    noisy().save(buffer, "PNG")
    storage = LocalStorage(tmp_path / "outputs")
    first = await collect(tmp_path, storage, collect_request(OutputFormat.webp), buffer.getvalue())
    again = await collect(tmp_path, storage, collect_request(OutputFormat.webp), buffer.getvalue())
    assert first == again
    [output] = first
    stored = (tmp_path / "outputs" / output.storage_key).read_bytes()
    assert output.storage_key == "job-1/0/gw_00001_.webp" and output.content_type == "image/webp"
    assert output.size == len(stored) and output.sha256 == hashlib.sha256(stored).hexdigest()
    assert sorted(p.name for p in (tmp_path / "outputs" / "job-1" / "0").iterdir()) == ["gw_00001_.webp"]
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch files are gone
    # A job from before output formats stores what ComfyUI wrote.
    [legacy] = await collect(tmp_path, storage, collect_request(None), buffer.getvalue())
    assert legacy.content_type == "image/png" and legacy.sha256 == hashlib.sha256(buffer.getvalue()).hexdigest()


async def test_collect_with_the_bucket_down_is_a_retryable_storage_error(tmp_path: Path) -> None:
    storage = S3Storage(bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}", access_key="k", secret_key="s",
                        region="us-east-1")
    with pytest.raises(ApplicationError) as raised:
        await collect(tmp_path, storage, collect_request(OutputFormat.png), b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert raised.value.type == "STORAGE_ERROR" and not raised.value.non_retryable
    assert list((tmp_path / "scratch").iterdir()) == []
