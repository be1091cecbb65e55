"""Telling an image source (a URL, a data URI, raw base64, or an image the gateway stored) from anything else,
such as the name of a file already in ComfyUI's input folder."""

from __future__ import annotations

import base64
import re
from typing import Literal

ImageSourceKind = Literal["url", "data_uri", "base64", "stored"]

# An inline image (data URI, base64) the API has already checked and put in storage: the job carries this
# reference instead of the bytes, which must never travel through Temporal. Only the gateway makes these.
STORED_INPUT_PREFIX = "stored-input://"

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Room for every image signature below; the smallest real image, a 1×1 GIF, takes about 50 characters.
# A file name that is this long, all base64 alphabet and decodes to an image signature is not a risk.
_MIN_BASE64_CHARS = 32


def stored_reference(storage_key: str) -> str:
    return STORED_INPUT_PREFIX + storage_key


def classify_image_source(value: str) -> ImageSourceKind | None:
    """What kind of image source `value` is, or None for anything else (such as a ComfyUI file name)."""
    if value.startswith(STORED_INPUT_PREFIX):
        return "stored"
    if _URL_SCHEME.match(value):
        return "url"  # any scheme, so that ftp:// or s3:// is refused by name rather than taken for a file
    if value[:5].lower() == "data:":
        return "data_uri"
    if _is_base64_image(value):
        return "base64"
    return None


def _is_base64_image(value: str) -> bool:
    compact = "".join(value.split())
    if len(compact) < _MIN_BASE64_CHARS or len(compact) % 4 or not _BASE64.fullmatch(compact):
        return False
    # Padding can only be at the very end, so the first characters decode on their own.
    return _has_image_signature(base64.b64decode(compact[:_MIN_BASE64_CHARS]))


def _has_image_signature(head: bytes) -> bool:
    return (
        head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or (head[:2] == b"BM" and head[6:10] == bytes(4))  # BMP's reserved bytes are zero
    )
