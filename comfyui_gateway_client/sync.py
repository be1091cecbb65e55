"""GatewayClient: the gateway's API from blocking code (scripts, notebooks, threads)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource

from comfyui_gateway_client import calls
from comfyui_gateway_client.calls import Call
from comfyui_gateway_client.config import ClientConfig, next_try
from comfyui_gateway_client.downloads import CHUNK_BYTES, OutputWriter, external_request, target_path
from comfyui_gateway_client.endpoints import blocking
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


class GatewayClient:
    """`GatewayClient(url, api_key=...)` or `token=` (a JWT); both default from GATEWAY_URL, GATEWAY_API_KEY and
    GATEWAY_TOKEN. Use it as a context manager, or call `close()`. `retries`: how often a request is tried again
    when it cannot have had an effect (no connection made; a 429 or 503 with Retry-After)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, token: str | None = None,
                 timeout: float = 30.0, retries: int = 2, transport: httpx.BaseTransport | None = None) -> None:
        self.config = ClientConfig.make(url, api_key, token, timeout, retries)
        self._http = httpx.Client(base_url=self.config.url, headers=self.config.headers,
                                  timeout=self.config.timeouts(), transport=transport)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        tries = 0
        while True:
            tries += 1
            try:
                response = self._http.request(call.method, call.path, params=call.params, json=call.json,
                                              headers=call.headers, timeout=self.config.timeouts(call.waits))
                return call.result(response)
            except (GatewayError, httpx.TransportError) as error:
                delay = next_try(error, tries, self.config)
            time.sleep(delay)

    health = blocking(calls.health)
    capabilities = blocking(calls.capabilities)
    submit = blocking(calls.submit)
    get_job = blocking(calls.get_job)
    list_jobs = blocking(calls.list_jobs)
    cancel = blocking(calls.cancel_job)
    logs = blocking(calls.job_logs)
    outputs = blocking(calls.outputs)
    download_base64 = blocking(calls.output_base64)
    list_workflows = blocking(calls.list_workflows)
    get_workflow = blocking(calls.get_workflow)
    create_workflow = blocking(calls.create_workflow)
    update_workflow = blocking(calls.update_workflow)
    delete_workflow = blocking(calls.delete_workflow)
    submit_batch = blocking(calls.submit_batch)
    get_batch = blocking(calls.get_batch)
    batch_jobs = blocking(calls.batch_jobs)
    cancel_batch = blocking(calls.cancel_batch)

    def download(self, job_id: str, filename: str, destination: str | Path, *,
                 expected: OutputFile | None = None) -> Path:
        """Stream one output into `destination` (a file, or a folder to put it in under its own name); with
        `expected` (the job's entry for it), its size and sha256 are checked. Returns the file's path."""
        writer = OutputWriter(target_path(Path(destination), filename), expected)
        try:
            request = self._http.build_request("GET", calls.output_path(job_id, filename))
            response = self._http.send(request, stream=True)
            if response.is_redirect:  # S3 storage: a presigned URL
                response.close()
                response = self._http.send(external_request(self._http, response.headers["location"]), stream=True)
            try:
                if response.status_code != 200:
                    response.read()
                    raise error_from_answer(response)
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    writer.write(chunk)
            finally:
                response.close()
            return writer.finish()
        except httpx.TransportError as error:
            writer.abandon()
            raise unreachable(self.config.url, error) from error
        except BaseException:
            writer.abandon()
            raise

    def download_outputs(self, job_id: str, folder: str | Path) -> list[Path]:
        """Every output of the job into `folder` (made if missing), each checked against its size and sha256."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [self.download(job_id, file.filename, folder, expected=file) for file in self.outputs(job_id).files]

    def events(self, job_id: str, *, reconnects: int = 5) -> Iterator[Event]:
        """The job's Server-Sent Events until its final one (`succeeded`, `failed`, `cancelled`). A dropped
        connection is resumed with Last-Event-ID; after `reconnects` failures in a row, GatewayUnreachable."""
        return self._stream(f"/jobs/{calls.segment(job_id)}/events", JOB_FINAL_EVENTS, reconnects)

    def batch_events(self, batch_id: str, *, reconnects: int = 5) -> Iterator[Event]:
        """The batch's Server-Sent Events until its final one (`completed`, `cancelled`), resumed as `events`."""
        return self._stream(f"/batches/{calls.segment(batch_id)}/events", BATCH_FINAL_EVENTS, reconnects)

    def feed(self, *, status: str | Sequence[str] | None = None, workflow_id: str | None = None,
             batch_id: str | None = None, reconnects: int = 5) -> Iterator[Event]:
        """Every job the caller may see, live (`GET /events`), each event with its `jobId`; filtered by status
        (one or several), template or batch. It has no final event: it runs until the caller stops reading. A
        dropped connection, or the gateway ending the stream of a listener that fell behind, is resumed with
        Last-Event-ID, so that no event is missed within the gateway's FEED_REPLAY_WINDOW_S."""
        return self._stream(calls.feed_path(status, workflow_id, batch_id), frozenset(), reconnects)

    def _stream(self, path: str, final_events: frozenset[str], reconnects: int) -> Iterator[Event]:
        cursor = EventCursor(self.config.url + path, final_events, reconnects)
        while not cursor.ended:
            try:
                with self._http.stream("GET", path, headers=cursor.headers(),
                                       timeout=self.config.stream_timeouts()) as response:
                    if response.status_code == 204:  # the id we sent was the final event's
                        return
                    if response.status_code != 200:
                        response.read()
                        raise error_from_answer(response)
                    for sse in EventSource(response).iter_sse():
                        if (event := cursor.accept(sse)) is not None:
                            yield event
                reason = "closed before its final event"
            except STREAM_BROKEN as error:
                reason = str(error) or type(error).__name__
            except TryLater as error:  # TOO_MANY_STREAMS, or the API busy: it says when to come back
                time.sleep(cursor.refused(error))
                continue
            if not cursor.ended:
                time.sleep(cursor.broken(reason))

    def wait(self, job_id: str, *, on_progress: Callable[[Job], None] | None = None) -> Job:
        """Follow the job's events until it ends; `on_progress` gets the job as each event leaves it. Returns
        the finished job, or raises JobFailed when it failed or was cancelled. The end is told once."""
        live: dict[str, Any] = {}
        for event in self.events(job_id):
            live.update(event.data)
            if on_progress is not None and tells_progress(event, live):
                on_progress(Job.model_validate(live))
        return succeeded(self.get_job(job_id))

    def generate(self, template: str, *, on_progress: Callable[[Job], None] | None = None,
                 options: Mapping[str, Any] | None = None, **inputs: Any) -> Job:
        """Run template `template` with `inputs`, follow it to its end and return the finished job (its `outputs`
        ready to download); JobFailed if it failed or was cancelled. `options`: more of submit's arguments
        (priority, output_format, idempotency_key, ...)."""
        submitted = self.submit(template, inputs, **(options or {}))
        return self.wait(submitted.job_id, on_progress=on_progress)
