"""Image inputs: an http(s) URL, a data URI or raw base64 → checked image bytes → a ComfyUI upload name.

A job's image arrives as text. This module tells such text from an existing ComfyUI file name, turns it
into bytes that are really an image within the size limit, and names the bytes by their hash so that
uploading them again (a retried activity) gives ComfyUI identical bytes under the same name.

Fetching a URL is the dangerous part (SSRF): every hop's host is resolved here, every address is checked,
and the connection goes to the checked address itself (the URL's host travels in the Host header and in
TLS SNI), so DNS cannot answer one address to the check and another to the connection. No Temporal here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import dataclasses
import hashlib
import io
import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any, Literal

import httpx
from PIL import Image, UnidentifiedImageError

from app.models import ErrorCode

ImageSourceKind = Literal["url", "data_uri", "base64", "stored"]

# Bad input: retrying cannot help.
VALIDATION_ERROR = ErrorCode.VALIDATION_ERROR.value
# Transient trouble fetching a URL (timeouts, connection errors, HTTP 5xx): worth retrying.
IMAGE_FETCH_FAILED = "IMAGE_FETCH_FAILED"

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
_UNTYPED = frozenset({"application/octet-stream", "binary/octet-stream"})

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Room for every image signature below; the smallest real image, a 1×1 GIF, takes about 50 characters.
# A file name that is this long, all base64 alphabet and decodes to an image signature is not a risk.
_MIN_BASE64_CHARS = 32

_MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Client errors that say "try again later" rather than "this URL is wrong".
_TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})
_FETCH_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
# For the whole download, so a server that drips bytes slower than the read timeout cannot hold it forever.
_FETCH_DEADLINE_SECONDS = 60.0
_UNKNOWN_HOST_ERRNOS = frozenset({socket.EAI_NONAME, socket.EAI_NODATA})


class ImageInputError(Exception):
    """`str(error)` is "field: message"; `message` alone says why, without the image's data."""

    def __init__(self, field: str, message: str, code: str) -> None:
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


# --- telling image sources from file names --------------------------------------------------------


# An inline image (data URI, base64) the API has already checked and put in storage: the job carries this
# reference instead of the bytes, which must never travel through Temporal. Only the gateway makes these.
STORED_INPUT_PREFIX = "stored-input://"


def stored_input(image: LoadedImage) -> tuple[str, str]:
    """The storage key of an inline image, named by content, and the reference that stands for it."""
    key = f"inputs/{image.sha256}.{image.extension}"
    return key, STORED_INPUT_PREFIX + key


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


# --- loading ---------------------------------------------------------------------------------------


async def load_image_source(
    value: str,
    *,
    http: httpx.AsyncClient,
    max_bytes: int,
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
            raise ImageInputError(field, "the stored image input is gone", VALIDATION_ERROR) from None
    elif kind == "url":
        data, declared_type = await _fetch_url(
            value, field=field, http=http, max_bytes=max_bytes, allow_private=allow_private_urls
        )
    elif kind == "data_uri":
        data, declared_type = _decode_data_uri(value, field=field, max_bytes=max_bytes)
    elif kind == "base64":
        data = _decode_base64(value, field=field, max_bytes=max_bytes)
    else:  # also a stored reference from outside the gateway

        raise ImageInputError(
            field, f"is not an http(s) URL, a data URI or base64 image data ({len(value)} characters)",
            VALIDATION_ERROR,
        )
    content_type, extension = await asyncio.to_thread(_identify_image, data, field)
    if declared_type is not None and declared_type not in _UNTYPED and declared_type != content_type:
        raise ImageInputError(field, f"is declared as {declared_type} but the data is {content_type}", VALIDATION_ERROR)
    digest = hashlib.sha256(data).hexdigest()
    return LoadedImage(data=data, content_type=content_type, extension=extension, sha256=digest)


def _identify_image(data: bytes, field: str) -> tuple[str, str]:
    """Pillow reads the bytes, whatever anyone claims about them; verify() walks the file's structure."""
    try:
        with Image.open(io.BytesIO(data), formats=list(_IMAGE_FORMATS)) as image:
            image_format = image.format
            image.verify()
    except Image.DecompressionBombError as error:
        raise ImageInputError(field, f"has too many pixels to be an input image: {error}", VALIDATION_ERROR) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageInputError(
            field, f"is not a {', '.join(_IMAGE_FORMATS)} image ({len(data)} bytes)", VALIDATION_ERROR
        ) from None
    return _IMAGE_FORMATS[image_format]


def _media_type(header: str | None) -> str | None:
    """"Image/JPG; charset=x" → "image/jpeg"; None when there is none."""
    media_type = (header or "").split(";")[0].strip().lower()
    return _CONTENT_TYPE_ALIASES.get(media_type, media_type) or None


def _too_large(field: str, size: str, max_bytes: int) -> ImageInputError:
    return ImageInputError(field, f"is {size}, over the limit of {max_bytes} bytes", VALIDATION_ERROR)


def _decode_data_uri(value: str, *, field: str, max_bytes: int) -> tuple[bytes, str | None]:
    header, comma, payload = value.partition(",")
    media_type, *parameters = header[len("data:"):].split(";")
    declared_type = _media_type(media_type)
    is_base64 = parameters[-1:] and parameters[-1].strip().lower() == "base64"
    if not comma or not (declared_type or "").startswith("image/") or not is_base64:
        # The header alone is echoed: the payload is the user's image.
        raise ImageInputError(
            field, f"a data URI must look like data:image/png;base64,… (got {header[:40]!r}…)", VALIDATION_ERROR
        )
    return _decode_base64(payload, field=field, max_bytes=max_bytes), declared_type


def _decode_base64(text: str, *, field: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    decoded_size = len(compact) * 3 // 4 - (len(compact) - len(compact.rstrip("=")))
    if decoded_size > max_bytes:  # before decoding: a huge payload is refused without a huge allocation
        raise _too_large(field, f"{decoded_size} bytes", max_bytes)
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error:
        raise ImageInputError(field, f"is not valid base64 ({len(compact)} characters)", VALIDATION_ERROR) from None


# --- fetching a URL --------------------------------------------------------------------------------


def _describe_url(url: httpx.URL) -> str:
    """The URL without credentials or query (signed URLs carry secrets there), shortened for messages."""
    shown = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"
    return shown if len(shown) <= 100 else shown[:99] + "…"


def _parse_http_url(value: str, field: str) -> httpx.URL:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        raise ImageInputError(field, "is not a valid URL", VALIDATION_ERROR) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ImageInputError(
            field, f"only http and https URLs with a host are accepted (got a {url.scheme}: URL)", VALIDATION_ERROR
        )
    return url


def check_image_url(value: str, *, field: str, allow_private: bool) -> None:
    """What can be told of an image URL without fetching it: its syntax, scheme and host, and whether the
    host is a literal address the gateway must not connect to. Names are resolved when the job fetches."""
    url = _parse_http_url(value, field)
    address = _literal_address(url.host)
    if address is None:
        return  # a host name
    reason = None if allow_private else _refusal_reason(address)
    if reason is not None:
        raise ImageInputError(field, f"{address} is a {reason} address; only public addresses are fetched",
                              VALIDATION_ERROR)


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally, in any form the resolver accepts: 127.0.0.1, but also
    2130706433, 127.1 and 0x7f.0.0.1."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


async def _fetch_url(
    value: str, *, field: str, http: httpx.AsyncClient, max_bytes: int, allow_private: bool
) -> tuple[bytes, str | None]:
    """The body and declared content type of the image at `value`, following at most a few redirects."""
    url = _parse_http_url(value, field)
    try:
        async with asyncio.timeout(_FETCH_DEADLINE_SECONDS):
            for _ in range(_MAX_REDIRECTS + 1):
                addresses = await _resolve(url, field=field, allow_private=allow_private)
                response = await _send_pinned(http, url, addresses)
                try:
                    if response.status_code in _REDIRECT_STATUSES:
                        url = _redirect_target(url, response, field)
                        continue
                    _check_response(response, url, field=field, max_bytes=max_bytes)
                    body = await _read_body(response, field=field, max_bytes=max_bytes)
                    return body, _media_type(response.headers.get("content-type"))
                finally:
                    await response.aclose()
    except TimeoutError:
        raise ImageInputError(
            field, f"fetching {_describe_url(url)} took longer than {_FETCH_DEADLINE_SECONDS:g} s", IMAGE_FETCH_FAILED
        ) from None
    except httpx.TransportError as error:  # timeouts, refused and reset connections, TLS and protocol errors
        raise ImageInputError(
            field, f"fetching {_describe_url(url)} failed: {type(error).__name__} {error}".rstrip(), IMAGE_FETCH_FAILED
        ) from None
    raise ImageInputError(
        field, f"led through more than {_MAX_REDIRECTS} redirects (the last to {_describe_url(url)})", VALIDATION_ERROR
    )


async def _resolve(url: httpx.URL, *, field: str, allow_private: bool) -> list[str]:
    """Every address of the URL's host; all must be public unless private ones are allowed."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        code = VALIDATION_ERROR if error.errno in _UNKNOWN_HOST_ERRNOS else IMAGE_FETCH_FAILED
        raise ImageInputError(field, f"the host {host} cannot be resolved ({error.strerror})", code) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for address in addresses:
            reason = _refusal_reason(ipaddress.ip_address(address))
            if reason is not None:
                raise ImageInputError(
                    field, f"the host {host} resolves to {address}, a {reason} address; only public addresses "
                    "are fetched", VALIDATION_ERROR,
                )
    return addresses


def _refusal_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the gateway must not connect to `address` on a user's behalf, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1, though ipaddress does not say so here
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),  # e.g. 100.64.0.0/10, carrier-grade NAT
    )
    return next((reason for reason, refused in checks if refused), None)


async def _send_pinned(http: httpx.AsyncClient, url: httpx.URL, addresses: list[str]) -> httpx.Response:
    """GET `url` from the first of its checked addresses that accepts a connection; a streaming response."""
    headers = {
        "Host": url.netloc.decode("ascii"),
        "Accept": "image/*",
        # Compressed bodies could expand past the size limit inside the decoder; images gain nothing from it.
        "Accept-Encoding": "identity",
        # The pool keys connections by address: one opened for this host must not serve another host's request.
        "Connection": "close",
    }
    # TLS checks the certificate against the URL's host, not against the address connected to.
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}

    async def send_to(address: str) -> httpx.Response:
        request = http.build_request(
            "GET", url.copy_with(host=address), headers=headers, extensions=extensions, timeout=_FETCH_TIMEOUT
        )
        return await http.send(request, stream=True, follow_redirects=False)

    for address in addresses[:-1]:
        try:
            return await send_to(address)
        except httpx.ConnectError:
            continue  # the host's next address may answer
    return await send_to(addresses[-1])


def _redirect_target(url: httpx.URL, response: httpx.Response, field: str) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise ImageInputError(
            field, f"{_describe_url(url)} answered HTTP {response.status_code} without a Location", VALIDATION_ERROR
        )
    # Relative to the URL as the client wrote it, not to the address it was fetched from.
    return _parse_http_url(str(url.join(location)), field)


def _check_response(response: httpx.Response, url: httpx.URL, *, field: str, max_bytes: int) -> None:
    """Refuse what the status line and headers already give away, before reading the body."""
    status = response.status_code
    if not 200 <= status < 300:
        transient = status >= 500 or status in _TRANSIENT_CLIENT_STATUSES
        code = IMAGE_FETCH_FAILED if transient else VALIDATION_ERROR
        raise ImageInputError(field, f"GET {_describe_url(url)} answered HTTP {status}", code)
    declared_type = _media_type(response.headers.get("content-type"))
    if declared_type is not None and declared_type not in _UNTYPED and not declared_type.startswith("image/"):
        raise ImageInputError(field, f"{_describe_url(url)} is {declared_type}, not an image", VALIDATION_ERROR)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ImageInputError(
            field, f"{_describe_url(url)} came {encoding}-encoded; only uncompressed image bodies are accepted",
            VALIDATION_ERROR,
        )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(field, f"announced as {length} bytes", max_bytes)


async def _read_body(response: httpx.Response, *, field: str, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(field, f"more than {max_bytes} bytes", max_bytes)
    return bytes(body)


# --- ComfyUI names and graphs ----------------------------------------------------------------------


def comfy_upload_name(image: LoadedImage) -> str:
    """Named by content: the same image uploads under the same name, and ComfyUI keeps it as it is."""
    return f"gw_{image.sha256[:16]}.{image.extension}"


_LOAD_IMAGE_CLASS = "LoadImage"
_LOAD_IMAGE_KEY_SUFFIX = ".image"


def find_load_image_sources(prompt: dict[str, Any]) -> dict[str, str]:
    """"<node id>.image" → source, for every LoadImage node of an API-format graph whose image is a URL,
    a data URI or base64. Plain file names (already in ComfyUI's input folder) are left out."""
    sources = {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != _LOAD_IMAGE_CLASS:
            continue
        image = (node.get("inputs") or {}).get("image")
        if isinstance(image, str) and classify_image_source(image) is not None:
            sources[f"{node_id}{_LOAD_IMAGE_KEY_SUFFIX}"] = image
    return sources


def replace_load_image_sources(prompt: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A copy of `prompt` with each "<node id>.image" of `names` set to its ComfyUI name."""
    replaced = copy.deepcopy(prompt)
    for key, name in names.items():
        node = replaced.get(key.removesuffix(_LOAD_IMAGE_KEY_SUFFIX)) if key.endswith(_LOAD_IMAGE_KEY_SUFFIX) else None
        if not isinstance(node, dict) or node.get("class_type") != _LOAD_IMAGE_CLASS:
            raise KeyError(f"{key!r} names no LoadImage node of this graph")
        node.setdefault("inputs", {})["image"] = name
    return replaced
