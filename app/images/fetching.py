"""Fetching an image input from its URL, SSRF-safe (app.safe_http), size-limited while it streams, with a
deadline for the whole download so a server that drips bytes cannot hold a job forever."""

from __future__ import annotations

import asyncio

import httpx

from app.errors import ErrorCode
from app.images.decoding import UNTYPED_CONTENT_TYPES, ImageInputError, media_type, too_large
from app.safe_http import (
    RefusedTarget,
    TargetUnavailable,
    check_literal_host,
    describe_url,
    parse_http_url,
    resolve,
    send_pinned,
)

_MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Client errors that say "try again later" rather than "this URL is wrong".
_TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})
_FETCH_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
_FETCH_DEADLINE_SECONDS = 60.0
_HEADERS = {
    "Accept": "image/*",
    # Compressed bodies could expand past the size limit inside the decoder; images gain nothing from it.
    "Accept-Encoding": "identity",
}


def _fetch_failed(field: str, message: str) -> ImageInputError:
    return ImageInputError(field, message, ErrorCode.IMAGE_FETCH_FAILED)


def _parsed(value: str, field: str) -> httpx.URL:
    try:
        return parse_http_url(value)
    except RefusedTarget as refused:
        raise ImageInputError(field, str(refused)) from None


def check_image_url(value: str, *, field: str, allow_private: bool) -> None:
    """What can be told of an image URL without fetching it: its syntax, scheme and host, and whether the
    host is a literal address the gateway must not connect to. Names are resolved when the job fetches."""
    url = _parsed(value, field)
    try:
        check_literal_host(url, allow_private=allow_private)
    except RefusedTarget as refused:
        raise ImageInputError(field, str(refused)) from None


async def fetch_image_url(
    value: str, *, field: str, http: httpx.AsyncClient, max_bytes: int, allow_private: bool
) -> tuple[bytes, str | None]:
    """The body and declared content type of the image at `value`, following at most a few redirects,
    each hop checked as the first."""
    url = _parsed(value, field)
    try:
        async with asyncio.timeout(_FETCH_DEADLINE_SECONDS):
            for _ in range(_MAX_REDIRECTS + 1):
                addresses = await resolve(url, allow_private=allow_private)
                response = await send_pinned(http, "GET", url, addresses, headers=_HEADERS, timeout=_FETCH_TIMEOUT)
                try:
                    if response.status_code in _REDIRECT_STATUSES:
                        url = _redirect_target(url, response, field)
                        continue
                    _check_response(response, url, field=field, max_bytes=max_bytes)
                    body = await _read_body(response, field=field, max_bytes=max_bytes)
                    return body, media_type(response.headers.get("content-type"))
                finally:
                    await response.aclose()
    except RefusedTarget as refused:
        raise ImageInputError(field, str(refused)) from None
    except TargetUnavailable as unavailable:
        raise _fetch_failed(field, str(unavailable)) from None
    except TimeoutError:
        raise _fetch_failed(
            field, f"fetching {describe_url(url)} took longer than {_FETCH_DEADLINE_SECONDS:g} s"
        ) from None
    except httpx.TransportError as error:  # timeouts, refused and reset connections, TLS and protocol errors
        raise _fetch_failed(field, f"fetching {describe_url(url)} failed: {type(error).__name__} {error}".rstrip()) from None
    raise ImageInputError(field, f"led through more than {_MAX_REDIRECTS} redirects (the last to {describe_url(url)})")


def _redirect_target(url: httpx.URL, response: httpx.Response, field: str) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise ImageInputError(field, f"{describe_url(url)} answered HTTP {response.status_code} without a Location")
    # Relative to the URL as the client wrote it, not to the address it was fetched from.
    return _parsed(str(url.join(location)), field)


def _check_response(response: httpx.Response, url: httpx.URL, *, field: str, max_bytes: int) -> None:
    """Refuse what the status line and headers already give away, before reading the body."""
    status = response.status_code
    if not 200 <= status < 300:
        message = f"GET {describe_url(url)} answered HTTP {status}"
        transient = status >= 500 or status in _TRANSIENT_CLIENT_STATUSES
        raise _fetch_failed(field, message) if transient else ImageInputError(field, message)
    declared_type = media_type(response.headers.get("content-type"))
    if declared_type is not None and declared_type not in UNTYPED_CONTENT_TYPES and not declared_type.startswith("image/"):
        raise ImageInputError(field, f"{describe_url(url)} is {declared_type}, not an image")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ImageInputError(
            field, f"{describe_url(url)} came {encoding}-encoded; only uncompressed image bodies are accepted"
        )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large(field, f"announced as {length} bytes", max_bytes)


async def _read_body(response: httpx.Response, *, field: str, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise too_large(field, f"more than {max_bytes} bytes", max_bytes)
    return bytes(body)
