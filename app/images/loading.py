"""Any image source → checked image bytes: a stored inline image, a URL, a data URI or raw base64."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from app.images.decoding import ImageInputError, LoadedImage, checked_image, decode_base64, decode_data_uri
from app.images.fetching import fetch_image_url
from app.images.sources import STORED_INPUT_PREFIX, classify_image_source


async def load_image_source(
    value: str,
    *,
    http: httpx.AsyncClient,
    max_bytes: int,
    max_pixels: int,
    allow_private_urls: bool,
    field: str = "image",
    read_stored: Callable[[str], bytes] | None = None,
) -> LoadedImage:
    """The image behind `value`; `field` names the input in errors. Raises `ImageInputError`. A stored
    reference is read with `read_stored` (a storage key → bytes); without it, one is refused."""
    kind = classify_image_source(value)
    declared_type: str | None = None
    if kind == "stored" and read_stored is not None:
        try:
            data = await asyncio.to_thread(read_stored, value.removeprefix(STORED_INPUT_PREFIX))
        except FileNotFoundError:
            raise ImageInputError(field, "the stored image input is gone") from None
    elif kind == "url":
        data, declared_type = await fetch_image_url(
            value, field=field, http=http, max_bytes=max_bytes, allow_private=allow_private_urls
        )
    elif kind == "data_uri":
        data, declared_type = decode_data_uri(value, field=field, max_bytes=max_bytes)
    elif kind == "base64":
        data = decode_base64(value, field=field, max_bytes=max_bytes)
    else:  # also a stored reference from outside the gateway
        raise ImageInputError(field, f"is not an http(s) URL, a data URI or base64 image data ({len(value)} characters)")
    return await asyncio.to_thread(checked_image, data, field=field, max_pixels=max_pixels, declared_type=declared_type)
