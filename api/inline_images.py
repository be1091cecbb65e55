"""Image inputs at submit time. Inline images (data URIs, base64) are checked and put in storage, named by
content, and the job carries a reference instead of the bytes: bytes never travel through Temporal, whose
payloads are limited to 2 MB. URLs are checked as far as can be told without fetching them (syntax, scheme,
literal addresses); the job itself fetches them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from app.image_inputs import (
    ImageInputError,
    check_image_url,
    classify_image_source,
    load_image_source,
    stored_input,
)
from app.storage import OutputStorage
from app.templates import FieldIssue, PromptError

_NOT_AN_IMAGE = "must be an image: an http(s) URL, a data URI or base64"


async def store_inline_images(
    sources: dict[str, str],
    *,
    field_of: Callable[[str], str],
    storage: OutputStorage,
    http: httpx.AsyncClient,
    max_bytes: int,
    allow_private_urls: bool,
) -> dict[str, str]:
    """key → stored reference, for each source that is an inline image (URLs are left to the job). Every
    bad source is reported at once, named by `field_of(key)`."""
    references: dict[str, str] = {}
    issues: list[FieldIssue] = []
    for key, source in sources.items():
        field = field_of(key)
        kind = classify_image_source(source)
        if kind == "url":
            try:
                check_image_url(source, field=field, allow_private=allow_private_urls)
            except ImageInputError as error:
                issues.append(FieldIssue(error.field, error.message))
            continue
        if kind not in ("data_uri", "base64"):  # stored references are the gateway's own, never a client's
            issues.append(FieldIssue(field, _NOT_AN_IMAGE))
            continue
        try:
            image = await load_image_source(source, http=http, max_bytes=max_bytes, allow_private_urls=False, field=field)
        except ImageInputError as error:
            issues.append(FieldIssue(error.field, error.message))
            continue
        storage_key, references[key] = stored_input(image)
        await asyncio.to_thread(storage.put_bytes, storage_key, image.data, image.content_type)
    if issues:
        raise PromptError(issues)
    return references
