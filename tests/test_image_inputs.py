"""Image sources: telling them from file names, fetching URLs safely, decoding data URIs and base64,
content-addressed upload names, and LoadImage inputs of raw graphs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import socket
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from PIL import Image

from app import safe_http
from app.errors import ErrorCode
from app.images import fetching
from app.images.decoding import ImageInputError, LoadedImage
from app.images.load_image import comfy_upload_name, find_load_image_sources, replace_load_image_sources
from app.images.loading import load_image_source
from app.images.sources import classify_image_source
from tests.harness import free_port

VALIDATION_ERROR, IMAGE_FETCH_FAILED = ErrorCode.VALIDATION_ERROR, ErrorCode.IMAGE_FETCH_FAILED

LIMIT = 4096
PIXELS = 64 * 64
SLOW_SECONDS = 0.5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def encode(color: tuple[int, int, int], image_format: str = "PNG", size: tuple[int, int] = (4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


PNG = encode((200, 30, 30))
JPEG = encode((30, 200, 30), "JPEG")
PNG_BASE64 = base64.b64encode(PNG).decode()


class ImageServer:
    """An HTTP server on 127.0.0.1 with canned answers; it records the path and Host of every request."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None

    def routes(self) -> dict[str, Handler]:
        def fixed(status: int, body: bytes, content_type: str, **headers: str) -> Handler:
            async def handler(request: web.Request) -> web.StreamResponse:
                return web.Response(status=status, body=body, headers={"Content-Type": content_type, **headers})

            return handler

        def redirect(location: str) -> Handler:
            async def handler(request: web.Request) -> web.StreamResponse:
                return web.Response(status=302, headers={"Location": location})

            return handler

        async def streamed_without_length(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(5):
                await response.write(bytes(1024))
            return response

        async def gzipped_when_accepted(request: web.Request) -> web.StreamResponse:
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                headers = {"Content-Type": "image/png", "Content-Encoding": "gzip"}
                return web.Response(body=gzip.compress(PNG), headers=headers)
            return web.Response(body=PNG, headers={"Content-Type": "image/png"})

        async def slow(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(SLOW_SECONDS)
            return web.Response(body=PNG, headers={"Content-Type": "image/png"})

        return {
            "/cat.png": fixed(200, PNG, "image/png"),
            "/untyped": fixed(200, PNG, "application/octet-stream"),
            "/jpeg-labelled-png": fixed(200, JPEG, "image/png"),
            "/page.html": fixed(200, b"<html><body>not an image</body></html>", "text/html"),
            "/fake.png": fixed(200, b"\x89PNG but then nothing an image decoder could read", "image/png"),
            "/gzipped.png": fixed(200, gzip.compress(PNG), "image/png", **{"Content-Encoding": "gzip"}),
            "/negotiated.png": gzipped_when_accepted,
            "/large.png": fixed(200, bytes(LIMIT + 1), "image/png"),
            "/streamed.png": streamed_without_length,
            "/slow.png": slow,
            "/missing.png": fixed(404, b"not found", "text/plain"),
            "/busy.png": fixed(429, b"slow down", "text/plain"),
            "/broken.png": fixed(500, b"oops", "text/plain"),
            "/redirect-to-cat": redirect("/cat.png"),
            "/redirect-to-loopback": redirect(f"http://127.0.0.2:{self.port}/cat.png"),
            "/redirect-loop": redirect("/redirect-loop"),
        }

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        @web.middleware
        async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
            self.requests.append((request.path, request.headers.get("Host", "")))
            return await handler(request)

        app = web.Application(middlewares=[record])
        for path, handler in self.routes().items():
            app.router.add_get(path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ssl_context).start()

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    image_server = ImageServer()
    await image_server.start()
    yield image_server
    await image_server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def load(value: str, http: httpx.AsyncClient, *, allow_private: bool = True) -> LoadedImage:
    return await load_image_source(
        value, http=http, max_bytes=LIMIT, max_pixels=PIXELS, allow_private_urls=allow_private)


async def load_error(value: str, http: httpx.AsyncClient, *, allow_private: bool = True) -> ImageInputError:
    with pytest.raises(ImageInputError) as caught:
        await load(value, http, allow_private=allow_private)
    return caught.value


# --- classification --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("https://example.com/cat.png", "url"),
        ("HTTP://example.com/cat.png?size=large", "url"),
        ("ftp://example.com/cat.png", "url"),  # classified, so that loading refuses it by name
        (f"data:image/png;base64,{PNG_BASE64}", "data_uri"),
        ("data:text/plain,hello", "data_uri"),
        (PNG_BASE64, "base64"),
        (base64.encodebytes(JPEG).decode(), "base64"),  # MIME-style, wrapped at 76 characters
        ("gw_upload.png", None),
        ("subfolder/gw_upload.png", None),
        ("iVBORw0KGgo=", None),  # a PNG signature, but far too short to be an image
        ("A" * 64, None),  # valid base64 that decodes to no image format
        (base64.b64encode(b"plain text, long enough to pass the minimum length").decode(), None),
        ("gw" * 40 + ".png", None),
        ("", None),
    ],
)
def test_classify_image_source(value: str, kind: str | None) -> None:
    assert classify_image_source(value) == kind


# --- URLs --------------------------------------------------------------------------------------------


async def test_url_is_fetched_and_identified_by_its_bytes(server: ImageServer, http: httpx.AsyncClient) -> None:
    image = await load(f"{server.url}/cat.png", http)
    assert (image.data, image.content_type, image.extension) == (PNG, "image/png", "png")
    untyped = await load(f"{server.url}/untyped", http)
    assert untyped.content_type == "image/png"
    # Asked for an uncompressed body, a server that could compress sends the image as it is.
    negotiated = await load(f"{server.url}/negotiated.png", http)
    assert negotiated.data == PNG


async def test_the_connection_goes_to_the_address_that_was_checked(
    server: ImageServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: the host answers the check with one address and a second lookup with another.
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo
    lookups: list[str] = []

    async def rebinding_getaddrinfo(host: str, port: Any, **kwargs: Any) -> list[Any]:
        if host != "rebind.test":
            return await real_getaddrinfo(host, port, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding_getaddrinfo)
    image = await load(f"http://rebind.test:{server.port}/cat.png", http)
    assert image.data == PNG
    assert lookups == ["rebind.test"]
    assert server.requests == [("/cat.png", f"rebind.test:{server.port}")]


def self_signed_certificate(directory: Path, host: str) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, host)])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_file, key_file


async def test_https_is_checked_against_the_host_name_not_the_address(tmp_path: Path) -> None:
    cert_file, key_file = self_signed_certificate(tmp_path, "localhost")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    https_server = ImageServer()
    await https_server.start(ssl_context=server_tls)
    try:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert_file)) as trusting_client:
            image = await load(f"https://localhost:{https_server.port}/cat.png", trusting_client)
    finally:
        await https_server.stop()
    assert image.data == PNG


async def test_loopback_url_is_refused_before_any_connection(server: ImageServer, http: httpx.AsyncClient) -> None:
    error = await load_error(f"{server.url}/cat.png", http, allow_private=False)
    assert error.code == VALIDATION_ERROR and error.field == "image"
    assert "127.0.0.1, a loopback address" in str(error) and str(error).startswith("image: ")
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.1.2.3/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://100.64.0.1/x.png", "carrier-grade NAT"),
    ],
)
async def test_non_public_addresses_are_refused(url: str, reason: str, http: httpx.AsyncClient) -> None:
    error = await load_error(url, http, allow_private=False)
    assert error.code == VALIDATION_ERROR and f"a {reason} address" in error.message


async def test_redirects_are_followed(server: ImageServer, http: httpx.AsyncClient) -> None:
    image = await load(f"{server.url}/redirect-to-cat", http)
    assert image.data == PNG
    assert [path for path, _ in server.requests] == ["/redirect-to-cat", "/cat.png"]


async def test_a_redirect_to_loopback_is_refused(
    server: ImageServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline there is no public server to start from: let 127.0.0.1 pass as public for this test only.
    refusal_reason = safe_http.refusal_reason

    def refusal_reason_but_for_the_server(address: Any) -> str | None:
        return None if str(address) == "127.0.0.1" else refusal_reason(address)

    monkeypatch.setattr(safe_http, "refusal_reason", refusal_reason_but_for_the_server)
    error = await load_error(f"{server.url}/redirect-to-loopback", http, allow_private=False)
    assert error.code == VALIDATION_ERROR and "127.0.0.2, a loopback address" in error.message
    assert [path for path, _ in server.requests] == ["/redirect-to-loopback"]


async def test_redirects_are_limited(server: ImageServer, http: httpx.AsyncClient) -> None:
    error = await load_error(f"{server.url}/redirect-loop", http)
    assert error.code == VALIDATION_ERROR and "more than 3 redirects" in error.message
    assert len(server.requests) == 4


async def test_only_http_urls_are_fetched(http: httpx.AsyncClient) -> None:
    error = await load_error("ftp://example.com/cat.png", http)
    assert error.code == VALIDATION_ERROR and "only http and https" in error.message


async def test_announced_size_over_the_limit_is_refused_before_the_body(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    error = await load_error(f"{server.url}/large.png", http)
    assert error.code == VALIDATION_ERROR
    assert error.message == f"is announced as {LIMIT + 1} bytes, over the limit of {LIMIT} bytes"


async def test_streamed_body_over_the_limit_is_cut_off(server: ImageServer, http: httpx.AsyncClient) -> None:
    error = await load_error(f"{server.url}/streamed.png", http)
    assert error.code == VALIDATION_ERROR
    assert error.message == f"is more than {LIMIT} bytes, over the limit of {LIMIT} bytes"


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/page.html", "is text/html, not an image"),
        ("/fake.png", "is not a PNG, JPEG, WEBP, GIF, BMP, TIFF image"),
        ("/jpeg-labelled-png", "is declared as image/png but the data is image/jpeg"),
        ("/gzipped.png", "came gzip-encoded"),
    ],
)
async def test_only_real_images_are_accepted(
    path: str, says: str, server: ImageServer, http: httpx.AsyncClient
) -> None:
    error = await load_error(f"{server.url}{path}", http)
    assert error.code == VALIDATION_ERROR and says in error.message


@pytest.mark.parametrize(
    ("path", "code"),
    [("/missing.png", VALIDATION_ERROR), ("/busy.png", IMAGE_FETCH_FAILED), ("/broken.png", IMAGE_FETCH_FAILED)],
)
async def test_client_errors_are_bad_input_server_errors_are_transient(
    path: str, code: str, server: ImageServer, http: httpx.AsyncClient
) -> None:
    error = await load_error(f"{server.url}{path}", http)
    assert error.code == code and f"{path} answered HTTP" in error.message


async def test_a_download_has_a_deadline(
    server: ImageServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetching, "_FETCH_DEADLINE_SECONDS", SLOW_SECONDS / 5)
    error = await load_error(f"{server.url}/slow.png", http)
    assert error.code == IMAGE_FETCH_FAILED and "took longer than" in error.message


async def test_connection_refused_is_transient(http: httpx.AsyncClient) -> None:
    error = await load_error(f"http://127.0.0.1:{free_port()}/cat.png", http)
    assert error.code == IMAGE_FETCH_FAILED and "ConnectError" in error.message


async def test_url_messages_leave_out_credentials_and_query(server: ImageServer, http: httpx.AsyncClient) -> None:
    error = await load_error(f"http://user:secret@127.0.0.1:{server.port}/missing.png?signature=abc", http)
    assert "secret" not in str(error) and "signature" not in str(error)
    assert f"127.0.0.1:{server.port}/missing.png" in str(error)


# --- data URIs and base64 --------------------------------------------------------------------------


async def test_data_uri_and_base64_are_decoded(http: httpx.AsyncClient) -> None:
    from_uri = await load(f"data:image/png;base64,{PNG_BASE64}", http)
    assert (from_uri.data, from_uri.content_type, from_uri.extension) == (PNG, "image/png", "png")
    from_base64 = await load(base64.encodebytes(JPEG).decode(), http)
    assert (from_base64.data, from_base64.content_type, from_base64.extension) == (JPEG, "image/jpeg", "jpg")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (f"data:image/jpeg;base64,{PNG_BASE64}", "is declared as image/jpeg but the data is image/png"),
        (f"data:text/plain;base64,{PNG_BASE64}", "a data URI must look like data:image/png;base64"),
        (f"data:image/png,{PNG_BASE64}", "a data URI must look like data:image/png;base64"),
        (f"data:image/png;base64,{PNG_BASE64[:-5]}!!!!!", "is not valid base64"),
        (f"data:image/png;base64,{base64.b64encode(bytes(LIMIT + 1)).decode()}", "over the limit"),
        ("data:image/png;base64," + base64.b64encode(b"<svg>not a raster image</svg>" * 4).decode(), "is not a PNG"),
        ("gw_upload.png", "is not an http(s) URL, a data URI or base64 image data"),
    ],
)
async def test_bad_inline_images_are_refused_without_echoing_them(
    value: str, says: str, http: httpx.AsyncClient
) -> None:
    error = await load_error(value, http)
    assert error.code == VALIDATION_ERROR and says in error.message
    payload = value.partition(",")[2]
    assert not payload or payload[:32] not in str(error)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`×`height` and holds no pixels: what a decompression bomb's header says."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (encode((0, 0, 0), size=(65, 64)), "is 65×64 pixels, over the limit of 4096 pixels"),
        (png_header_only(60_000, 60_000), "has too many pixels to be an input image (at most 4096)"),
        (png_header_only(5000, 5000), "is 5000×5000 pixels, over the limit"),
    ],
)
async def test_images_with_too_many_pixels_are_refused_from_their_header(
    image: bytes, says: str, http: httpx.AsyncClient
) -> None:
    error = await load_error(base64.b64encode(image).decode(), http)
    assert error.code == VALIDATION_ERROR and says in error.message
    assert (await load(base64.b64encode(encode((0, 0, 0), size=(64, 64))).decode(), http)).content_type == "image/png"


# --- names and graphs ------------------------------------------------------------------------------


async def test_upload_name_is_stable_for_the_same_bytes(http: httpx.AsyncClient) -> None:
    first = await load(f"data:image/png;base64,{PNG_BASE64}", http)
    again = await load(PNG_BASE64, http)
    other = await load(base64.b64encode(encode((0, 0, 255))).decode(), http)
    assert comfy_upload_name(first) == comfy_upload_name(again) == f"gw_{first.sha256[:16]}.png"
    assert comfy_upload_name(other) != comfy_upload_name(first)


def graph(first_image: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": first_image}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "gw_upload.png"}},
        "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "https://not/an/input"}},
    }


def test_load_image_sources_are_found_and_replaced_in_a_copy() -> None:
    prompt = graph("https://example.com/cat.png")
    assert find_load_image_sources(prompt) == {"1.image": "https://example.com/cat.png"}
    replaced = replace_load_image_sources(prompt, {"1.image": "gw_0123456789abcdef.png"})
    assert replaced == {**prompt, "1": {"class_type": "LoadImage", "inputs": {"image": "gw_0123456789abcdef.png"}}}
    assert prompt == graph("https://example.com/cat.png")
    assert find_load_image_sources(replaced) == {}


def test_data_uri_and_base64_load_image_inputs_are_found() -> None:
    data_uri = f"data:image/png;base64,{PNG_BASE64}"
    assert find_load_image_sources(graph(data_uri)) == {"1.image": data_uri}
    assert find_load_image_sources(graph(PNG_BASE64)) == {"1.image": PNG_BASE64}


def test_replacing_an_input_that_is_no_load_image_fails() -> None:
    with pytest.raises(KeyError):
        replace_load_image_sources(graph("gw_upload.png"), {"3.image": "x.png"})
