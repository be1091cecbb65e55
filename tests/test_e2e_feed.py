"""The feed of every job a caller may see (`GET /events`, `WS /ws`), through the whole stack: the API served by
uvicorn, the worker, the session's simulator; real jobs, read off both feeds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy import event
from temporalio.client import Client

from tests.harness import ComfyUITarget, assert_eventually, error_of
from tests.test_auth import ADMIN_KEY, ALICE_KEY, API_KEYS, BOB_KEY
from tests.test_e2e_sse import FINAL, Event, Served, read_events, served_gateway, submit

# The few statuses a job's own stream is named by, and so the feed's events too.
NAMES = {"queued", "running", "output"} | FINAL


@pytest.fixture
async def served(temporal_client: Client, comfyui: ComfyUITarget, tmp_path: Path, task_queue: str
                 ) -> AsyncIterator[Served]:
    async with served_gateway(temporal_client, comfyui, tmp_path, task_queue, api_keys=API_KEYS,
                              sse_keepalive_s=0.5, ws_auth_timeout_s=0.5) as gateway:
        yield gateway


class Listener:
    """One `GET /events` stream, read in the background into `events` until `stop`."""

    def __init__(self, http: httpx.AsyncClient, key: str, query: str = "", last_event_id: str | None = None) -> None:
        self.events: list[Event] = []
        self.connected = asyncio.Event()
        headers = {"X-API-Key": key, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        self._task = asyncio.create_task(self._read(http, f"/events{query}", headers))

    async def _read(self, http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            self.connected.set()
            async for item in read_events(response):
                self.events.append(item)

    def of(self, job_id: str) -> list[Event]:
        return [item for item in self.events if item.data["jobId"] == job_id]

    async def until(self, check: Callable[[list[Event]], bool], what: str) -> list[Event]:
        await assert_eventually(lambda: check(self.events), timeout=30, what=what)
        return self.events

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def ended(job_id: str) -> Callable[[list[Event]], bool]:
    return lambda events: any(item.data["jobId"] == job_id and item.name in FINAL for item in events)


def queries_of_the_feed(served: Served) -> list[str]:
    """The API's database statements that read the feed log, from now on."""
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM job_feed" in statement and statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(served.app.state.engine, "before_cursor_execute", seen)
    return statements


async def test_the_sse_feed_tells_each_caller_its_own_jobs_filtered_and_resumes_across_jobs(served: Served) -> None:
    feed = served.app.state.feed
    queries = queries_of_the_feed(served)
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        # Refusals first: no caller, an unknown status, an id that is not the feed's.
        assert (await http.get("/events")).status_code == 401
        bad_status = await http.get("/events?status=done", headers={"X-API-Key": ALICE_KEY})
        assert bad_status.status_code == 400 and error_of(bad_status)["code"] == "VALIDATION_ERROR"
        assert error_of(bad_status)["details"]["fields"][0]["field"] == "status"
        # Not one of the feed's ids: not digits, a digit int() does not read, past the log's BIGINT, too long.
        for bad in ("1.running.3.0", "\xb2".encode("latin-1"), str(2**63), "9" * 5000):
            bad_id = await http.get("/events", headers={"X-API-Key": ALICE_KEY, "Last-Event-ID": bad})
            assert bad_id.status_code == 400 and error_of(bad_id)["details"]["fields"][0]["field"] == "Last-Event-ID"

        alice, bob, admin = Listener(http, ALICE_KEY), Listener(http, BOB_KEY), Listener(http, ADMIN_KEY)
        alice_ended = Listener(http, ALICE_KEY, "?status=succeeded,failed")
        templated = Listener(http, ADMIN_KEY, "?workflowId=solid_color")
        listeners = [alice, bob, admin, alice_ended, templated]
        for listener in listeners:
            await asyncio.wait_for(listener.connected.wait(), 10)
        await assert_eventually(lambda: feed.listeners == len(listeners), what="every listener registered")
        async with (
            httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY}, timeout=30) as as_alice,
            httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": BOB_KEY}, timeout=30) as as_bob,
        ):
            alice_job = await submit(as_alice, {"workflowJson": served.comfyui.slow_prompt(2)})
            bob_job = await submit(as_bob, {"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}})

        # Alice stops listening while her job runs; her resumed stream says the rest.
        events = await alice.until(lambda events: any(item.name == "running" for item in events), "alice running")
        await alice.stop()
        had = list(events)
        resumed = Listener(http, ALICE_KEY, last_event_id=had[-1].id)
        await resumed.until(ended(alice_job), "alice's job ending on her resumed feed")
        await admin.until(lambda events: ended(alice_job)(events) and ended(bob_job)(events), "both on the admin's")
        await bob.until(ended(bob_job), "bob's job on his feed")
        await alice_ended.until(ended(alice_job), "alice's end on her filtered feed")
        await templated.until(ended(bob_job), "bob's template job on the filtered feed")

        # Ownership: a user's feed has only its own jobs; an admin's has everyone's.
        assert {item.data["jobId"] for item in had + resumed.events} == {alice_job}
        assert {item.data["jobId"] for item in bob.events} == {bob_job}
        assert {item.data["jobId"] for item in admin.events} == {alice_job, bob_job}
        # Resumption: nothing missed, nothing told twice, ids rising across the two connections.
        alice_ids = [int(item.id) for item in had + resumed.events]
        assert alice_ids == sorted(set(alice_ids))
        assert [item.id for item in had + resumed.events] == [item.id for item in admin.of(alice_job)]
        # The same events as the job's own stream: named by its status, with its progress to the end.
        names = [item.name for item in admin.of(alice_job)]
        assert set(names) <= NAMES and names[-1] == "succeeded" and "output" in names, names
        progress = [item.data["progress"] for item in admin.of(alice_job)]
        assert progress == sorted(progress) and progress[-1] == 100 and any(0 < p < 100 for p in progress), progress
        assert admin.of(alice_job)[-1].data["outputs"][0]["url"].startswith("/outputs/")
        assert "inputs" not in admin.of(bob_job)[-1].data
        # Filters: only the ends of Alice's job; only the template's job.
        assert [item.name for item in alice_ended.events] == ["succeeded"]
        assert {item.data["jobId"] for item in templated.events} == {bob_job}
        for listener in (resumed, bob, admin, alice_ended, templated):
            await listener.stop()

    # One reader for every listener: the log was read once per poll, and once for where the reader starts, not
    # once per listener; the resumed listener's replay read three times (the log's last id, where the replay
    # starts, its one page).
    assert len(queries) == feed.reads + 1 + 3, (len(queries), feed.reads)
    await assert_eventually(lambda: feed.listeners == 0, what="the listeners gone")


@asynccontextmanager
async def socket(served: Served, headers: dict[str, str] | None = None
                 ) -> AsyncIterator[websockets.ClientConnection]:
    async with websockets.connect(served.url.replace("http", "ws") + "/ws", additional_headers=headers or {},
                                  open_timeout=10) as connection:
        yield connection


async def received(connection: websockets.ClientConnection, until: Callable[[dict[str, Any]], bool]
                   ) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while not messages or not until(messages[-1]):
        messages.append(json.loads(await asyncio.wait_for(connection.recv(), 30)))
    return messages


async def close_code(connection: websockets.ClientConnection) -> int | None:
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(connection.recv(), 10)
    return connection.close_code


async def test_the_websocket_feed_authenticates_subscribes_resumes_and_closes_with_clear_codes(served: Served) -> None:
    # No credentials in time, wrong ones in a header or a first message: 4401.
    async with socket(served) as connection:
        assert await close_code(connection) == 4401
    async with socket(served, {"X-API-Key": "not-a-key"}) as connection:
        assert await close_code(connection) == 4401
    async with socket(served) as connection:
        await connection.send(json.dumps({"type": "auth", "token": "not-a-key"}))
        assert await close_code(connection) == 4401

    async with (
        socket(served) as alice,
        socket(served, {"X-API-Key": BOB_KEY}) as bob,
        httpx.AsyncClient(base_url=served.url, timeout=30, headers={"X-API-Key": ALICE_KEY}) as http,
    ):
        # A browser's way: the key (or a JWT) in the first message.
        await alice.send(json.dumps({"type": "auth", "token": ALICE_KEY}))
        assert json.loads(await alice.recv()) == {"type": "authenticated"}
        await alice.send(json.dumps({"type": "ping"}))
        assert json.loads(await alice.recv()) == {"type": "pong"}
        # Bob asks for everything he may see; so Alice's jobs are not in it.
        await bob.send(json.dumps({"type": "subscribe", "id": "all"}))
        assert json.loads(await bob.recv()) == {"type": "subscribed", "id": "all"}

        first, second = [await submit(http, {"workflowJson": served.comfyui.slow_prompt(1)}) for _ in range(2)]
        await alice.send(json.dumps({"type": "subscribe", "id": "one", "jobId": second}))
        assert json.loads(await alice.recv()) == {"type": "subscribed", "id": "one"}
        told = await received(alice, lambda message: message.get("event") == "succeeded")
        assert {message["data"]["jobId"] for message in told} == {second}
        assert all(message["subscription"] == "one" and message["event"] in NAMES for message in told)

        # Resumption: a subscription with `since` is told what it missed, here the first job's whole life.
        await alice.send(json.dumps({"type": "unsubscribe", "id": "one"}))
        assert json.loads(await alice.recv()) == {"type": "unsubscribed", "id": "one"}
        await alice.send(json.dumps({"type": "subscribe", "id": "again", "jobId": [first], "since": 0}))
        assert json.loads(await alice.recv()) == {"type": "subscribed", "id": "again"}
        replayed = await received(alice, lambda message: message.get("event") == "succeeded")
        assert replayed[0]["event"] == "queued" and {message["data"]["jobId"] for message in replayed} == {first}
        ids = [message["id"] for message in replayed]
        assert ids == sorted(set(ids))

        # A bad message closes with 4400, saying what was wrong.
        await alice.send(json.dumps({"type": "subscribe", "status": "done"}))
        assert await close_code(alice) == 4400 and "status" in (alice.close_reason or "")

        # Bob heard nothing of Alice's jobs all along.
        await bob.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(bob.recv(), 10)) == {"type": "pong"}

    # Whatever else comes closes with 4400 too, never with an error of the server: no JSON, binary, no object,
    # too deep for the parser, a number too long to read, an id past the feed's, a second auth, and an unknown
    # type whose name makes the reason longer than a close frame's 123 bytes.
    for not_a_message in ("not json", b'{"type": "ping"}', "[]", "[" * 100_000, '{"type": "subscribe", "since": '
                          + "9" * 5000 + "}", json.dumps({"type": "subscribe", "since": 2**70}),
                          json.dumps({"type": "subscribe", "since": "5"}),
                          json.dumps({"type": "auth", "token": BOB_KEY}), json.dumps({"type": "é" * 200})):
        async with socket(served, {"X-API-Key": ALICE_KEY}) as connection:
            await connection.send(not_a_message)
            assert await close_code(connection) == 4400, not_a_message


async def test_websockets_count_against_the_address_rate_limit(
        temporal_client: Client, comfyui: ComfyUITarget, tmp_path: Path, task_queue: str) -> None:
    """Each connection costs a count, so guessing keys in first messages is limited as requests are."""
    async with served_gateway(temporal_client, comfyui, tmp_path, task_queue, api_keys=API_KEYS,
                              rate_limit_max=3, rate_limit_window_ms=60_000, ws_auth_timeout_s=0.5) as served:
        codes = []
        for guess in range(5):
            async with socket(served) as connection:
                with suppress(websockets.ConnectionClosed):  # over the limit, it is closed before it can send
                    await connection.send(json.dumps({"type": "auth", "token": f"guess-{guess}"}))
                codes.append(await close_code(connection))
        assert codes == [4401, 4401, 4401, 4429, 4429]
        assert connection.close_reason and "too many requests" in connection.close_reason
        # Requests from that address are over the limit too: one count for both.
        async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY}) as http:
            assert (await http.get("/jobs")).status_code == 429
