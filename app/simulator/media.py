"""Writers for the files the simulated save nodes produce: PNG, animated WEBP, APNG, WEBM and MP4.

Each writer follows what the ComfyUI node does (same Pillow/PyAV calls and options, prompt
metadata embedded), so the files are real and decodable: animated outputs hold one frame per
image of the batch (Pillow merges identical consecutive frames, as in ComfyUI), WEBM is VP9 and
MP4 is H.264, both through the FFmpeg libraries bundled in PyAV's wheel.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import av
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .images import ImageBatch

# EXIF tags ComfyUI's SaveAnimatedWEBP stores the prompt (0x0110, Model) and extra_pnginfo
# (counting down from 0x010F, Make) in.
_EXIF_PROMPT_TAG = 0x0110
_EXIF_FIRST_EXTRA_TAG = 0x010F


def png_metadata(prompt: dict[str, Any] | None, extra_pnginfo: dict[str, Any] | None) -> PngInfo:
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    return metadata


def save_png(
    image: Image.Image, path: str, prompt: dict[str, Any] | None, extra_pnginfo: dict[str, Any] | None, compress_level: int
) -> None:
    image.save(path, pnginfo=png_metadata(prompt, extra_pnginfo), compress_level=compress_level)


def save_animated_webp(
    images: ImageBatch,
    path: str,
    fps: float,
    lossless: bool,
    quality: int,
    method: int,
    prompt: dict[str, Any] | None,
    extra_pnginfo: dict[str, Any] | None,
) -> None:
    frames = images.frames
    exif = frames[0].getexif()
    if prompt is not None:
        exif[_EXIF_PROMPT_TAG] = "prompt:{}".format(json.dumps(prompt))
    for offset, (key, value) in enumerate((extra_pnginfo or {}).items()):
        exif[_EXIF_FIRST_EXTRA_TAG - offset] = "{}:{}".format(key, json.dumps(value))
    frames[0].save(
        path,
        save_all=True,
        duration=int(1000.0 / fps),
        append_images=frames[1:],
        exif=exif,
        lossless=lossless,
        quality=quality,
        method=method,
    )


def save_animated_png(
    images: ImageBatch,
    path: str,
    fps: float,
    compress_level: int,
    prompt: dict[str, Any] | None,
    extra_pnginfo: dict[str, Any] | None,
) -> None:
    frames = images.frames
    frames[0].save(
        path,
        pnginfo=png_metadata(prompt, extra_pnginfo),
        compress_level=compress_level,
        save_all=True,
        duration=int(1000.0 / fps),
        append_images=frames[1:],
    )


def save_webm(
    images: ImageBatch,
    path: str,
    codec: str,
    fps: float,
    crf: float,
    prompt: dict[str, Any] | None,
    extra_pnginfo: dict[str, Any] | None,
) -> None:
    """SaveWEBM: vp9 (libvpx-vp9, yuv420p) or av1 (libsvtav1, yuv420p10le), constant quality crf."""
    with av.open(path, mode="w") as container:
        if prompt is not None:
            container.metadata["prompt"] = json.dumps(prompt)
        for key, value in (extra_pnginfo or {}).items():
            container.metadata[key] = json.dumps(value)
        encoder = {"vp9": "libvpx-vp9", "av1": "libsvtav1"}[codec]
        stream = container.add_stream(encoder, rate=Fraction(round(fps * 1000), 1000))
        stream.width = images.width
        stream.height = images.height
        stream.pix_fmt = "yuv420p10le" if codec == "av1" else "yuv420p"
        stream.bit_rate = 0
        stream.options = {"crf": str(crf)}
        for frame in images.frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        container.mux(stream.encode())


class VideoFromComponents:
    """The VIDEO value CreateVideo makes: frames and a frame rate, encoded only when saved."""

    def __init__(self, images: ImageBatch, frame_rate: Fraction):
        self.images = images
        self.frame_rate = frame_rate

    def get_dimensions(self) -> tuple[int, int]:
        return self.images.width, self.images.height

    def save_to(self, path: str, metadata: dict[str, Any] | None) -> None:
        """Write an MP4 with an H.264 (libx264, yuv420p) stream, like ComfyUI's SaveVideo."""
        with av.open(path, mode="w", options={"movflags": "use_metadata_tags"}) as container:
            for key, value in (metadata or {}).items():
                container.metadata[key] = json.dumps(value)
            stream = container.add_stream("h264", rate=Fraction(round(self.frame_rate * 1000), 1000))
            stream.width = self.images.width
            stream.height = self.images.height
            stream.pix_fmt = "yuv420p"
            for frame in self.images.frames:
                video_frame = av.VideoFrame.from_image(frame).reformat(format="yuv420p")
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            container.mux(stream.encode())
