"""The API as `comfyui-gateway api` serves it, against clients that send too much or too slowly: a body of a
million keys must neither stall other requests nor get an answer of its own size, and slow clients must not
hold the server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api.http_server import ConcurrencyLimit, ReadsInTurn, step_aside, turn_aside
from api.plain_json import MAX_VALUES
from app.settings import Settings
from tests.harness import ApiProcess, assert_eventually, error_of, free_port, gateway_settings, migrate_database


HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.5
BODY_TIMEOUT_S = 1.0
MAX_CONCURRENT_REQUESTS = 4
MAX_CONCURRENT_WAITS = 6


@pytest.fixture(scope="module")
async def api_server(temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The API alone, without a worker; its URL."""
    settings = gateway_settings(temporal_env.client, f"http://127.0.0.1:{free_port()}", tmp_path_factory.mktemp("api"),
                                f"test-{uuid.uuid4()}")
    migrate_database(settings)
    server = ApiProcess(settings, API_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), API_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                        API_KEEP_ALIVE_S=str(KEEP_ALIVE_S),
                        API_MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT_REQUESTS),
                        API_MAX_CONCURRENT_WAITS=str(MAX_CONCURRENT_WAITS))
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


async def test_an_idle_kept_alive_connection_stays_open_for_api_keep_alive_s(api_server: str) -> None:
    """uvicorn's own 5 s was as long as clients' pools keep a connection: a POST sent on one at that moment
    failed (bench/burst.py saw it between rounds)."""
    reader, writer = await connect(api_server)
    writer.write(b"GET /workflows HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    answered = time.monotonic()
    closed_at, _ = await closed_by_server(reader)
    writer.close()
    assert KEEP_ALIVE_S * 0.9 < closed_at - answered < KEEP_ALIVE_S + 2.5  # uvicorn alone: 5 s


def test_connections_are_kept_alive_longer_than_clients_keep_them_by_default() -> None:
    assert Settings(_env_file=None).api_keep_alive_s > 5  # httpx's and Node's pools: 4-5 s


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
    assert len(busy.headers["x-request-id"]) == 32  # refused before the app: the server's layers gave it one
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


async def test_a_read_awaiting_temporal_sets_its_turn_aside_and_takes_one_again_for_its_answer() -> None:
    inside: list[str] = []
    answered, leave = asyncio.Event(), asyncio.Event()

    async def app(scope: dict, receive: object, send: object) -> None:
        inside.append(f"in {scope['path']}")
        if scope["path"] == "/jobs/1":
            async with turn_aside():  # Temporal takes its time to answer
                await answered.wait()
            inside.append("answer /jobs/1")
        await leave.wait()

    in_turn = ReadsInTurn(app, slots=1)

    def read(path: str) -> asyncio.Task[None]:
        return asyncio.create_task(in_turn({"type": "http", "method": "GET", "path": path}, None, None))

    first = read("/jobs/1")
    await assert_eventually(lambda: inside == ["in /jobs/1"], timeout=5)
    second = read("/jobs/2")  # in while the first one waits for Temporal
    await assert_eventually(lambda: inside == ["in /jobs/1", "in /jobs/2"], timeout=5)
    answered.set()
    await asyncio.sleep(0.05)
    assert inside == ["in /jobs/1", "in /jobs/2"]  # the answer waits for a turn: the second read holds it
    leave.set()
    await asyncio.gather(first, second)
    assert inside[-1] == "answer /jobs/1" and not in_turn.turns.locked()


async def served(request: Callable[[], Awaitable[httpx.Response]], patience: float = 10) -> httpx.Response:
    """The request's answer, sent again for `patience` seconds as a client does while the server is busy
    (503 SERVER_BUSY) or closed a kept-alive connection as the request went out on it (the server's keep-alive
    is 1.5 s here)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            answer = await request()
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            if time.monotonic() > deadline:
                raise
        else:
            if answer.status_code != 503 or error_of(answer)["code"] != "SERVER_BUSY" or time.monotonic() > deadline:
                return answer
        await asyncio.sleep(0.05)


async def test_waiting_requests_hold_no_place_in_the_limits_and_end_when_their_client_goes(api_server: str) -> None:
    """With no worker, jobs never end: requests that wait on them wait until their clients go away. More of them
    than MAX_CONCURRENT_REQUESTS, reads and submissions, wait while other requests are served."""
    async with httpx.AsyncClient(base_url=api_server, timeout=60) as client:
        job_id = (await client.post("/jobs", json={"workflowId": "solid_color"})).json()["jobId"]

        def wait_in(request: Callable[[], Awaitable[httpx.Response]]) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(served(request, patience=30))

        waiting = [wait_in(lambda: client.get(f"/jobs/{job_id}", params={"wait": 60}))
                   for _ in range(MAX_CONCURRENT_WAITS // 2)]
        waiting += [wait_in(lambda: client.post("/jobs", params={"wait": 60}, json={"workflowId": "solid_color"}))
                    for _ in range(MAX_CONCURRENT_WAITS - len(waiting))]

        async def refused_wait() -> httpx.Response | None:  # every place taken: the waiters are in
            if ended := [waiter for waiter in waiting if waiter.done()]:  # its place is free: no refusal to come
                answer = ended[0].exception() or f"{ended[0].result().status_code} {ended[0].result().text}"
                pytest.fail(f"a waiting request ended: {answer!r}")
            response = await served(lambda: client.post("/jobs", params={"wait": 0.01}, json={"workflowId": "x"}))
            return response if response.status_code == 503 else None

        refused = await assert_eventually(refused_wait, timeout=20, what="the waits' places all taken")
        assert error_of(refused)["code"] == "TOO_MANY_WAITS" and refused.headers["retry-after"] == "1"

        async def others_served() -> bool:
            answers = await asyncio.gather(*(client.get("/workflows") for _ in range(MAX_CONCURRENT_REQUESTS)))
            return all(answer.status_code == 200 for answer in answers)

        await assert_eventually(others_served, timeout=10, what="other requests served beside the waiting ones")
        assert not any(request.done() for request in waiting)
        for request in waiting:
            request.cancel()  # the client goes away: its connection is closed
        await asyncio.gather(*waiting, return_exceptions=True)

        async def place_free() -> bool:
            response = await served(lambda: client.post("/jobs", params={"wait": 0.01}, json={"workflowId": "x"}))
            return response.status_code == 404  # past the waits' limit, to the unknown template
        await assert_eventually(place_free, timeout=10, what="the gone clients' places given back")


async def test_a_request_that_steps_aside_holds_no_place_in_the_limit_nor_a_read_turn() -> None:
    inside: list[str] = []
    answered: list[int] = []
    leave = asyncio.Event()

    async def app(scope: dict, receive: object, send: object) -> None:
        inside.append(scope["path"])
        if scope["path"].startswith("/waits"):
            step_aside(scope)
            await leave.wait()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answered.append(message["status"])

    server = ConcurrencyLimit(ReadsInTurn(app, slots=1), limit=1)

    def request(path: str) -> asyncio.Task[None]:
        return asyncio.create_task(server({"type": "http", "method": "GET", "path": path}, None, send))

    waits = [request(f"/waits/{index}") for index in range(3)]
    await assert_eventually(lambda: len(inside) == 3, timeout=5, what="three waits in")
    await request("/workflows")  # neither refused nor held behind the waits
    assert inside[-1] == "/workflows" and answered == [] and server.in_flight == 0
    leave.set()
    await asyncio.gather(*waits)
    assert server.in_flight == 0 and not server.app.turns.locked()
