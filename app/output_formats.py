"""A job's still images re-encoded into its `outputFormat` with Pillow, from the scratch file of a download to a
scratch file of their own, before they are stored.

Only still images change: an animated image (ComfyUI's `animated` flag, or more than one frame), a video, and
anything Pillow does not read as an image pass through untouched, and so does a still already in the target
format (no second lossy encoding). JPEG has no transparency: an image with alpha is composited on white.
Re-encoding decodes the image, so it holds one frame's pixels in memory (width × height × channels bytes);
files that pass through are streamed and never held.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from app.models import OutputFormat

_HASH_CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _Encoding:
    pillow_format: str
    content_type: str
    extension: str


ENCODINGS = {
    OutputFormat.png: _Encoding("PNG", "image/png", "png"),
    OutputFormat.jpg: _Encoding("JPEG", "image/jpeg", "jpg"),
    OutputFormat.webp: _Encoding("WEBP", "image/webp", "webp"),
}


@dataclasses.dataclass(frozen=True)
class ScratchFile:
    """A file on the worker's disk on its way to storage, with what its output will record."""

    path: Path
    filename: str
    content_type: str
    size: int
    sha256: str


def in_output_format(file: ScratchFile, target: Path, output_format: OutputFormat, quality: int) -> ScratchFile:
    """`file` as `output_format`, written to `target`; `file` itself when it stays as it is."""
    encoding = ENCODINGS[output_format]
    try:
        image = Image.open(file.path)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return file  # not an image Pillow reads (or an image too large to decode safely): stored as it is
    with image:
        if getattr(image, "n_frames", 1) > 1 or image.format == encoding.pillow_format:
            return file
        try:
            image.load()
        except OSError:
            return file  # truncated or corrupt: decoding it again on a retry cannot help; stored as it came
        _encode(image, target, encoding, quality)
    return ScratchFile(
        path=target, filename=str(PurePosixPath(file.filename).with_suffix(f".{encoding.extension}")),
        content_type=encoding.content_type, size=target.stat().st_size, sha256=_sha256(target),
    )


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def _encode(image: Image.Image, target: Path, encoding: _Encoding, quality: int) -> None:
    if encoding.pillow_format == "JPEG":
        if _has_alpha(image):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(target, "JPEG", quality=quality)
    elif encoding.pillow_format == "WEBP":
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if _has_alpha(image) else "RGB")
        image.save(target, "WEBP", quality=quality)
    else:  # PNG is lossless: quality does not apply
        image.save(target, "PNG")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
