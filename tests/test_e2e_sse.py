"""Live progress over Server-Sent Events (`GET /jobs/{id}/events`), through the whole stack: the API served by
uvicorn (a stream must reach the client while it lasts, which an in-process transport does not do), the
worker, the session's simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from temporalio.client import Client

from api.main import create_app
from tests.harness import ComfyUITarget, assert_eventually, free_port, gateway_settings, migrate_database
from tests.test_auth import ALICE_KEY, API_KEYS, BOB_KEY
from worker.main import running_worker

FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Served:
    app: FastAPI
    url: str
    comfyui: ComfyUITarget


@asynccontextmanager
async def served_gateway(temporal: Client, comfyui: ComfyUITarget, data_dir: Path, task_queue: str,
                         **overrides: Any) -> AsyncIterator[Served]:
    settings = gateway_settings(temporal, comfyui.url, data_dir, task_queue, **overrides)
    migrate_database(settings)
    app = create_app(settings, temporal)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    async with running_worker(temporal, settings):
        serving = asyncio.create_task(server.serve())
        try:
            await assert_eventually(lambda: server.started, timeout=20, what="the API serving")
            yield Served(app, f"http://127.0.0.1:{port}", comfyui)
        finally:
            server.should_exit = True
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(serving, timeout=30)


@pytest.fixture
async def served(temporal_client: Client, comfyui: ComfyUITarget, tmp_path: Path, task_queue: str
                 ) -> AsyncIterator[Served]:
    async with served_gateway(temporal_client, comfyui, tmp_path, task_queue, sse_keepalive_s=0.5) as gateway:
        yield gateway


@dataclass
class Event:
    name: str
    id: str
    data: dict[str, Any]


async def read_events(response: httpx.Response, comments: list[str] | None = None) -> AsyncIterator[Event]:
    """The events of a text/event-stream answer, as they come; comment lines go to `comments`."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            if comments is not None:
                comments.append(line)
        elif line == "":
            if "data" in fields:
                yield Event(fields.get("event", "message"), fields.get("id", ""), json.loads(fields["data"]))
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def submit(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["jobId"]


async def test_a_stream_follows_a_job_to_its_end_and_resumes_from_its_last_event_id(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        job_id = await submit(http, {"workflowJson": served.comfyui.slow_prompt(3)})

        first: list[Event] = []
        comments: list[str] = []
        async with http.stream("GET", f"/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in read_events(response, comments):
                first.append(event)
                if event.name == "running" and 0 < event.data["progress"] < 100:
                    break  # the client goes away mid-job
        # The first event tells the whole job; every event has its status and progress.
        assert first[0].data["jobId"] == job_id and first[0].name in {"queued", "running"}, first[0]
        assert all({"status", "progress"} <= set(event.data) for event in first)
        assert all(event.data["status"] == event.name for event in first)
        last = first[-1]

        resumed: list[Event] = []
        async with http.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": last.id}) as response:
            assert response.status_code == 200
            async for event in read_events(response, comments):
                resumed.append(event)
        # The stream closed after the final event, and nothing the client had was told again.
        assert resumed[-1].name == "succeeded", resumed
        assert [event.name for event in resumed if event.name in FINAL] == ["succeeded"]
        assert "queued" not in [event.name for event in resumed]
        assert all(event.data["progress"] >= last.data["progress"] for event in resumed)
        progress = [event.data["progress"] for event in first + resumed]
        assert progress == sorted(progress) and progress[-1] == 100
        # Ids go on from where the first stream stopped.
        counts = [int(event.id.split(".")[0]) for event in first + resumed]
        assert counts == list(range(1, len(counts) + 1))
        # Each stored file is told before the end, then the end carries the job's final fields.
        [output] = [event for event in resumed if event.name == "output"]
        assert output.data["outputs"][0]["filename"].startswith("gw_slow")
        assert resumed[-1].data["timing"]["completedAt"] is not None
        assert comments, "no keep-alive comment while the job ran"

        # A client that had the final event is told there is no more (an EventSource then stops reconnecting).
        again = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": resumed[-1].id})
        assert again.status_code == 204
        # Without an id, a finished job's stream is its final state at once.
        async with http.stream("GET", f"/jobs/{job_id}/events") as response:
            ended = [event async for event in read_events(response)]
        assert [event.name for event in ended] == ["output", "succeeded"]


async def test_many_streams_of_one_job_share_one_reader(served: Served) -> None:
    feeds = served.app.state.job_feeds
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        job_id = await submit(http, {"workflowJson": served.comfyui.slow_prompt(2)})

        async def follow() -> list[Event]:
            async with http.stream("GET", f"/jobs/{job_id}/events") as response:
                return [event async for event in read_events(response)]

        streams = [asyncio.create_task(follow()) for _ in range(20)]
        await assert_eventually(lambda: feeds.readers == 1, timeout=10, what="one reader for the job")
        readers_seen = set()
        while not all(stream.done() for stream in streams):
            readers_seen.add(feeds.readers)
            await asyncio.sleep(0.05)
        assert readers_seen <= {0, 1}, readers_seen
        for stream in streams:
            assert stream.result()[-1].name == "succeeded"
        assert feeds.readers == 0


async def test_a_stream_is_cancelled_with_its_job_and_another_s_job_is_404(
    temporal_client: Client, comfyui: ComfyUITarget, tmp_path: Path, task_queue: str
) -> None:
    async with (
        served_gateway(temporal_client, comfyui, tmp_path, task_queue, api_keys=API_KEYS) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30, headers={"X-API-Key": ALICE_KEY}) as http,
    ):
        job_id = await submit(http, {"workflowJson": served.comfyui.slow_prompt(10)})
        assert (await http.get(f"/jobs/{job_id}/events", headers={"X-API-Key": BOB_KEY})).status_code == 404
        assert (await http.get(f"/jobs/{job_id}/events", headers={"X-API-Key": ""})).status_code == 401

        async with http.stream("GET", f"/jobs/{job_id}/events") as response:
            events = read_events(response)
            async for event in events:
                if event.name == "running":
                    break
            cancel = await http.post(f"/jobs/{job_id}/cancel", json={"reason": "enough"})
            assert cancel.status_code == 200, cancel.text
            rest = [event async for event in events]
        assert rest[-1].name == "cancelled" and rest[-1].data["status"] == "cancelled", rest


# --- what a stream says, from the job as read (no stack needed) ----------------------------------------------


def job_view(status: str, progress: int, **fields: Any) -> dict[str, Any]:
    return {"jobId": "j", "status": status, "progress": progress, "currentNode": None, "queuePosition": None,
            "outputs": [], **fields}


def test_a_resumed_stream_says_nothing_until_the_job_moves_and_an_output_is_not_the_end() -> None:
    from api.job_streams import JobEvents

    first = JobEvents()
    [queued] = first.after(job_view("queued", 0, queuePosition=2))
    assert queued.name == "queued" and queued.data["queuePosition"] == 2
    assert first.after(job_view("queued", 0, queuePosition=2)) == []  # nothing changed: nothing said
    [running] = first.after(job_view("running", 40, currentNode="2"))
    assert running.data == {"status": "running", "progress": 40, "currentNode": "2", "queuePosition": None}

    resumed = JobEvents(running.id)
    assert resumed.after(job_view("running", 40, currentNode="2")) == []
    [moved] = resumed.after(job_view("running", 60, currentNode="2"))
    assert moved.data["jobId"] == "j"  # the first event after a resume tells the whole job
    files = [{"filename": "a.png"}, {"filename": "b.png"}]
    events = resumed.after(job_view("succeeded", 100, outputs=files))
    assert [event.name for event in events] == ["output", "output", "succeeded"]
    assert not JobEvents(events[1].id).ended and JobEvents(events[2].id).ended
    assert events[0].data["outputs"] == files[:1] and events[1].data["outputs"] == files
    assert JobEvents("not an id of ours").after(job_view("queued", 0))[0].data["jobId"] == "j"


async def test_the_fanout_hands_the_latest_value_and_the_reader_s_failure_to_every_subscriber() -> None:
    from api.fanout import Fanout

    published = asyncio.Event()
    go_on = asyncio.Event()
    starts: list[str] = []

    async def read(key: str) -> AsyncIterator[int]:
        starts.append(key)
        for value in (1, 2, 3):
            yield value
        published.set()
        await go_on.wait()
        raise RuntimeError("Temporal went away")

    fanout: Fanout[int] = Fanout(read)
    async with fanout.subscribe("job") as slow, fanout.subscribe("job") as other:
        assert fanout.readers == 1
        await published.wait()
        seen = []
        with pytest.raises(RuntimeError, match="went away"):
            async for value in slow:  # it was too slow for 1 and 2: it gets the latest, then the failure
                seen.append(value)
                go_on.set()
        assert seen == [3]
        with pytest.raises(RuntimeError):
            async for _ in other:
                pass
    assert fanout.readers == 0 and starts == ["job"]
