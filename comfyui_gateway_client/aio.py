"""AsyncGatewayClient: the gateway's API from asyncio code, call for call the same as GatewayClient."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource

from comfyui_gateway_client import calls
from comfyui_gateway_client.calls import Call
from comfyui_gateway_client.config import ClientConfig, next_try
from comfyui_gateway_client.downloads import CHUNK_BYTES, OutputWriter, external_request, target_path
from comfyui_gateway_client.endpoints import awaiting
from comfyui_gateway_client.errors import GatewayError, TryLater, error_from_answer, succeeded, unreachable
from comfyui_gateway_client.models import Event, Job, OutputFile
from comfyui_gateway_client.streams import (
    BATCH_FINAL_EVENTS,
    JOB_FINAL_EVENTS,
    STREAM_BROKEN,
    EventCursor,
    tells_progress,
)

T = TypeVar("T")


class AsyncGatewayClient:
    """`AsyncGatewayClient(url, api_key=...)`, as GatewayClient; `async with`, or `await close()`."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, token: str | None = None,
                 timeout: float = 30.0, retries: int = 2, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = ClientConfig.make(url, api_key, token, timeout, retries)
        self._http = httpx.AsyncClient(base_url=self.config.url, headers=self.config.headers,
                                  timeout=self.config.timeouts(), transport=transport)

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        tries = 0
        while True:
            tries += 1
            try:
                response = await self._http.request(call.method, call.path, params=call.params, json=call.json,
                                                  headers=call.headers, timeout=self.config.timeouts(call.waits))
                return call.result(response)
            except (GatewayError, httpx.TransportError) as error:
                delay = next_try(error, tries, self.config)
            await asyncio.sleep(delay)

    health = awaiting(calls.health)
    capabilities = awaiting(calls.capabilities)
    submit = awaiting(calls.submit)
    get_job = awaiting(calls.get_job)
    list_jobs = awaiting(calls.list_jobs)
    cancel = awaiting(calls.cancel_job)
    logs = awaiting(calls.job_logs)
    outputs = awaiting(calls.outputs)
    download_base64 = awaiting(calls.output_base64)
    list_workflows = awaiting(calls.list_workflows)
    get_workflow = awaiting(calls.get_workflow)
    create_workflow = awaiting(calls.create_workflow)
    update_workflow = awaiting(calls.update_workflow)
    delete_workflow = awaiting(calls.delete_workflow)
    submit_batch = awaiting(calls.submit_batch)
    get_batch = awaiting(calls.get_batch)
    batch_jobs = awaiting(calls.batch_jobs)
    cancel_batch = awaiting(calls.cancel_batch)

    async def download(self, job_id: str, filename: str, destination: str | Path, *,
                 expected: OutputFile | None = None) -> Path:
        """Stream one output into `destination` (a file, or a folder to put it in under its own name); with
        `expected` (the job's entry for it), its size and sha256 are checked. Returns the file's path."""
        writer = OutputWriter(target_path(Path(destination), filename), expected)
        try:
            request = self._http.build_request("GET", calls.output_path(job_id, filename))
            response = await self._http.send(request, stream=True)
            if response.is_redirect:  # S3 storage: a presigned URL
                await response.aclose()
                response = await self._http.send(external_request(self._http, response.headers["location"]), stream=True)
            try:
                if response.status_code != 200:
                    await response.aread()
                    raise error_from_answer(response)
                async for chunk in response.aiter_bytes(CHUNK_BYTES):
                    writer.write(chunk)
            finally:
                await response.aclose()
            return writer.finish()
        except httpx.TransportError as error:
            writer.abandon()
            raise unreachable(self.config.url, error) from error
        except BaseException:
            writer.abandon()
            raise

    async def download_outputs(self, job_id: str, folder: str | Path) -> list[Path]:
        """Every output of the job into `folder` (made if missing), each checked against its size and sha256."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [await self.download(job_id, file.filename, folder, expected=file)
                for file in (await self.outputs(job_id)).files]

    def events(self, job_id: str, *, reconnects: int = 5) -> AsyncIterator[Event]:
        """The job's Server-Sent Events until its final one (`succeeded`, `failed`, `cancelled`). A dropped
        connection is resumed with Last-Event-ID; after `reconnects` failures in a row, GatewayUnreachable."""
        return self._stream(f"/jobs/{calls.segment(job_id)}/events", JOB_FINAL_EVENTS, reconnects)

    def batch_events(self, batch_id: str, *, reconnects: int = 5) -> AsyncIterator[Event]:
        """The batch's Server-Sent Events until its final one (`completed`, `cancelled`), resumed as `events`."""
        return self._stream(f"/batches/{calls.segment(batch_id)}/events", BATCH_FINAL_EVENTS, reconnects)

    def feed(self, *, status: str | Sequence[str] | None = None, workflow_id: str | None = None,
             batch_id: str | None = None, reconnects: int = 5) -> AsyncIterator[Event]:
        """Every job the caller may see, live (`GET /events`), each event with its `jobId`; filtered by status
        (one or several), template or batch. It has no final event: it runs until the caller stops reading. A
        dropped connection, or the gateway ending the stream of a listener that fell behind, is resumed with
        Last-Event-ID, so that no event is missed within the gateway's FEED_REPLAY_WINDOW_S."""
        return self._stream(calls.feed_path(status, workflow_id, batch_id), frozenset(), reconnects)

    async def _stream(self, path: str, final_events: frozenset[str], reconnects: int) -> AsyncIterator[Event]:
        cursor = EventCursor(self.config.url + path, final_events, reconnects)
        while not cursor.ended:
            try:
                async with self._http.stream("GET", path, headers=cursor.headers(),
                                       timeout=self.config.stream_timeouts()) as response:
                    if response.status_code == 204:  # the id we sent was the final event's
                        return
                    if response.status_code != 200:
                        await response.aread()
                        raise error_from_answer(response)
                    async for sse in EventSource(response).aiter_sse():
                        if (event := cursor.accept(sse)) is not None:
                            yield event
                reason = "closed before its final event"
            except STREAM_BROKEN as error:
                reason = str(error) or type(error).__name__
            except TryLater as error:  # TOO_MANY_STREAMS, or the API busy: it says when to come back
                await asyncio.sleep(cursor.refused(error))
                continue
            if not cursor.ended:
                await asyncio.sleep(cursor.broken(reason))

    async def wait(self, job_id: str, *, on_progress: Callable[[Job], Awaitable[None] | None] | None = None) -> Job:
        """Follow the job's events until it ends; `on_progress` gets the job as each event leaves it. Returns
        the finished job, or raises JobFailed when it failed or was cancelled. `on_progress` may be a coroutine
        function."""
        live: dict[str, Any] = {}
        async for event in self.events(job_id):
            live.update(event.data)
            if on_progress is None or not tells_progress(event, live):
                continue
            if inspect.isawaitable(told := on_progress(Job.model_validate(live))):
                await told
        return succeeded(await self.get_job(job_id))

    async def generate(self, template: str, *, on_progress: Callable[[Job], Awaitable[None] | None] | None = None,
                 options: Mapping[str, Any] | None = None, **inputs: Any) -> Job:
        """Run template `template` with `inputs`, follow it to its end and return the finished job (its `outputs`
        ready to download); JobFailed if it failed or was cancelled. `options`: more of submit's arguments
        (priority, output_format, idempotency_key, ...)."""
        submitted = await self.submit(template, inputs, **(options or {}))
        return await self.wait(submitted.job_id, on_progress=on_progress)
