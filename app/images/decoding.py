"""Image bytes from inline text (data URIs, raw base64), and what the bytes really are: Pillow decides,
whatever anyone claims about them."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io

from PIL import Image, UnidentifiedImageError

from app.errors import ErrorCode

# Pillow format → (content type, file extension): the images ComfyUI's LoadImage reads.
_IMAGE_FORMATS = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
    "BMP": ("image/bmp", "bmp"),
    "TIFF": ("image/tiff", "tiff"),
}
_CONTENT_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-ms-bmp": "image/bmp"}
# Content types that say nothing about the bytes: the bytes decide.
UNTYPED_CONTENT_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


class ImageInputError(Exception):
    """`str(error)` is "field: message"; `message` alone says why, without the image's data. `code` is
    VALIDATION_ERROR for bad input (retrying cannot help) or IMAGE_FETCH_FAILED for trouble fetching."""

    def __init__(self, field: str, message: str, code: ErrorCode = ErrorCode.VALIDATION_ERROR) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    data: bytes = dataclasses.field(repr=False)  # an image of megabytes must not land in a log line
    content_type: str
    extension: str
    sha256: str

    @property
    def storage_key(self) -> str:
        """Where an inline image is kept: named by content, so storing it twice stores it once."""
        return f"inputs/{self.sha256}.{self.extension}"


def checked_image(data: bytes, *, field: str, max_pixels: int, declared_type: str | None = None) -> LoadedImage:
    content_type, extension = _identify_image(data, field, max_pixels)
    if declared_type is not None and declared_type not in UNTYPED_CONTENT_TYPES and declared_type != content_type:
        raise ImageInputError(field, f"is declared as {declared_type} but the data is {content_type}")
    return LoadedImage(data=data, content_type=content_type, extension=extension, sha256=hashlib.sha256(data).hexdigest())


def _identify_image(data: bytes, field: str, max_pixels: int) -> tuple[str, str]:
    """verify() walks the file's structure, so a truncated or forged file is refused here, not in ComfyUI.
    The dimensions are read from the header, before any pixel is decoded: a small file that would decode to
    gigabytes (a decompression bomb) is refused by them."""
    try:
        with Image.open(io.BytesIO(data), formats=list(_IMAGE_FORMATS)) as image:
            image_format = image.format
            width, height = image.size
            if width * height > max_pixels:
                raise ImageInputError(
                    field, f"is {width}×{height} pixels, over the limit of {max_pixels} pixels (4 × MAX_IMAGE_SIZE²)")
            image.verify()
    except Image.DecompressionBombError:
        raise ImageInputError(field, f"has too many pixels to be an input image (at most {max_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageInputError(field, f"is not a {', '.join(_IMAGE_FORMATS)} image ({len(data)} bytes)") from None
    return _IMAGE_FORMATS[image_format]


def media_type(header: str | None) -> str | None:
    """"Image/JPG; charset=x" → "image/jpeg"; None when there is none."""
    value = (header or "").split(";")[0].strip().lower()
    return _CONTENT_TYPE_ALIASES.get(value, value) or None


def too_large(field: str, size: str, max_bytes: int) -> ImageInputError:
    return ImageInputError(field, f"is {size}, over the limit of {max_bytes} bytes")


def decode_data_uri(value: str, *, field: str, max_bytes: int) -> tuple[bytes, str | None]:
    header, comma, payload = value.partition(",")
    declared, *parameters = header[len("data:"):].split(";")
    declared_type = media_type(declared)
    is_base64 = parameters[-1:] and parameters[-1].strip().lower() == "base64"
    if not comma or not (declared_type or "").startswith("image/") or not is_base64:
        # The header alone is echoed: the payload is the user's image.
        raise ImageInputError(field, f"a data URI must look like data:image/png;base64,… (got {header[:40]!r}…)")
    return decode_base64(payload, field=field, max_bytes=max_bytes), declared_type


def decode_base64(text: str, *, field: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    decoded_size = len(compact) * 3 // 4 - (len(compact) - len(compact.rstrip("=")))
    if decoded_size > max_bytes:  # before decoding: a huge payload is refused without a huge allocation
        raise too_large(field, f"{decoded_size} bytes", max_bytes)
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error:
        raise ImageInputError(field, f"is not valid base64 ({len(compact)} characters)") from None
