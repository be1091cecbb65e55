"""The API as `comfyui-gateway api` serves it, against clients that send too much or too slowly: a body of a
million keys must neither stall other requests nor get an answer of its own size, and slow clients must not
hold the server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api.http_server import ReadsInTurn
from api.plain_json import MAX_VALUES
from tests.harness import ApiProcess, assert_eventually, error_of, free_port, gateway_settings, migrate_database


HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONCURRENT_REQUESTS = 4


@pytest.fixture(scope="module")
async def api_server(temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The API alone, without a worker; its URL."""
    settings = gateway_settings(temporal_env.client, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("api"),
                                f"test-{uuid.uuid4()}")
    migrate_database(settings)
    server = ApiProcess(settings, API_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), API_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                        API_MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT_REQUESTS))
    await server.start()
    yield server.url
    server.stop()


def unknown_fields(count: int) -> bytes:
    return json.dumps({"workflowId": "solid_color", **{f"k{index:07d}": 0 for index in range(count)}}).encode()


async def test_huge_bodies_get_small_answers_while_other_requests_go_on(api_server: str) -> None:
    """A body of a million keys once got an answer of 104 MB after 12 to 22 s, and /health waited 11 s."""
    bodies = {"a million keys": unknown_fields(1_000_000), "just under the limit": unknown_fields(MAX_VALUES - 10)}
    health_latencies: list[float] = []
    async with httpx.AsyncClient(base_url=api_server, timeout=60) as client:
        stop = asyncio.Event()

        async def poll_health() -> None:
            while not stop.is_set():
                started = time.monotonic()
                await client.get("/health")
                health_latencies.append(time.monotonic() - started)

        poller = asyncio.create_task(poll_health())
        answers = {}
        for name, body in bodies.items():
            started = time.monotonic()
            answers[name] = await client.post("/jobs", content=body, headers={"content-type": "application/json"})
            print(f"{name}: {len(body)} bytes, {len(answers[name].content)} in answer, {time.monotonic() - started:.2f} s")
        stop.set()
        await poller
    for name, answer in answers.items():
        assert answer.status_code == 400 and len(answer.content) < 64_000, (name, len(answer.content))
    assert error_of(answers["a million keys"])["details"]["fields"] == [
        {"field": "body", "message": f"more than {MAX_VALUES} values (array items and object members)"}]
    assert error_of(answers["just under the limit"])["details"]["moreFields"] == MAX_VALUES - 10 - 50
    print(f"/health: {len(health_latencies)} answers, slowest {max(health_latencies):.3f} s")
    assert len(health_latencies) > 5 and max(health_latencies) < 1.0, sorted(health_latencies)[-5:]


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_by_server(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """When the server closed the connection, and what it sent before."""
    try:
        received = await asyncio.wait_for(reader.read(), timeout=HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 10)
    except ConnectionResetError:
        received = b""
    return time.monotonic(), received


async def test_connections_that_stall_before_their_request_is_complete_are_closed(api_server: str) -> None:
    """1,000 connections that sent a request line slowly were never closed. Meanwhile others are served: the
    stalled connections are not requests yet, so they do not count against the concurrency limit."""
    heads = [b"", b"GET /hea", b"GET /health HTTP/1.1\r\nHost: gateway\r\n"]
    opened = time.monotonic()
    stalled = []
    for index in range(200):
        reader, writer = await connect(api_server)
        writer.write(heads[index % len(heads)])
        stalled.append((reader, writer))
    dripping_reader, dripping = await connect(api_server)

    async def drip() -> None:  # a byte at a time, never waiting long, never finishing
        for byte in b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: yes\r\n" * 10:
            dripping.write(bytes([byte]))
            await asyncio.sleep(0.1)

    dripper = asyncio.create_task(drip())
    closing = asyncio.gather(*(closed_by_server(reader) for reader, _ in [*stalled, (dripping_reader, dripping)]))
    statuses = []
    async with httpx.AsyncClient(base_url=api_server, timeout=10) as client:
        while not closing.done():
            statuses.append((await client.get("/workflows")).status_code)
            await asyncio.sleep(0.05)
    closed = [at for at, _ in await closing]
    dripper.cancel()
    for _, writer in stalled:
        writer.close()
    assert len(statuses) >= 5 and set(statuses) == {200}
    assert HEADER_TIMEOUT_S * 0.9 < min(closed) - opened and max(closed) - opened < HEADER_TIMEOUT_S + 5


async def test_a_kept_alive_connection_that_stalls_in_its_next_request_is_closed(api_server: str) -> None:
    reader, writer = await connect(api_server)
    writer.write(b"GET /workflows HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert head.startswith(b"HTTP/1.1 200 ")
    await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    writer.write(b"GET /work")  # uvicorn's keep-alive timer stops at the first byte
    started = time.monotonic()
    closed_at, _ = await closed_by_server(reader)
    writer.close()
    assert HEADER_TIMEOUT_S * 0.9 < closed_at - started < HEADER_TIMEOUT_S + 4  # not uvicorn's 5 s keep-alive


def response_of(received: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


async def stalled_body(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose body stops 60 bytes short of its Content-Length."""
    reader, writer = await connect(url)
    writer.write(b"POST /jobs HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 80\r\n\r\n" + b'{"workflowId": "solid_color"')
    return reader, writer


async def test_a_body_shorter_than_its_content_length_gets_408(api_server: str) -> None:
    """Such a request used to hang for ever."""
    reader, writer = await stalled_body(api_server)
    started = time.monotonic()
    closed_at, received = await closed_by_server(reader)
    writer.close()
    status, headers, body = response_of(received)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"
    assert BODY_TIMEOUT_S * 0.9 < closed_at - started < BODY_TIMEOUT_S + 4


async def test_a_body_that_arrives_slowly_but_steadily_is_read(api_server: str) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"workflowId": ', b'"solid_color", ', b'"nope": 1}'):
            yield piece
            await asyncio.sleep(BODY_TIMEOUT_S * 0.6)

    async with httpx.AsyncClient(base_url=api_server, timeout=10) as client:
        response = await client.post("/jobs", content=pieces(), headers={"content-type": "application/json"})
    assert response.status_code == 400 and error_of(response)["details"]["fields"][0]["field"] == "nope"


async def test_requests_beyond_the_concurrency_limit_get_503_until_others_end(api_server: str) -> None:
    held = [await stalled_body(api_server) for _ in range(MAX_CONCURRENT_REQUESTS)]
    async with httpx.AsyncClient(base_url=api_server, timeout=10) as client:

        async def refused() -> httpx.Response | None:  # once the server has read the held requests' heads
            response = await client.get("/workflows")
            return response if response.status_code == 503 else None

        busy = await assert_eventually(refused, timeout=BODY_TIMEOUT_S * 0.8, interval=0.02, what="a 503")
        for reader, writer in held:  # the body timeout ends them
            status, _, _ = response_of((await closed_by_server(reader))[1])
            assert status == 408
            writer.close()
        served = await client.get("/workflows")
    assert busy.status_code == 503 and error_of(busy)["code"] == "SERVER_BUSY" and busy.headers["retry-after"] == "1"
    assert served.status_code == 200


async def test_reads_take_turns_while_other_requests_go_straight_in() -> None:
    inside: list[str] = []
    leave = asyncio.Event()

    async def app(scope: dict, receive: object, send: object) -> None:
        inside.append(f"{scope['method']} {scope['path']}")
        if scope["method"] == "GET":
            await leave.wait()

    in_turn = ReadsInTurn(app, slots=1)

    def request(method: str, path: str) -> asyncio.Task[None]:
        return asyncio.create_task(in_turn({"type": "http", "method": method, "path": path}, None, None))

    first, second = request("GET", "/jobs/1"), request("GET", "/jobs/2")
    submission = request("POST", "/jobs")
    await assert_eventually(lambda: "POST /jobs" in inside, timeout=5)
    assert inside == ["GET /jobs/1", "POST /jobs"]  # the second read waits for the first; the post does not
    leave.set()
    await asyncio.gather(first, second, submission)
    assert inside == ["GET /jobs/1", "POST /jobs", "GET /jobs/2"]
