"""The Python client (comfyui_gateway_client), blocking and asyncio, driving real jobs through the whole stack:
the API served by uvicorn on a port, the worker, the session's simulator, Temporal. One gateway for the module."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx import ASGITransport
from temporalio.testing import WorkflowEnvironment

from comfyui_gateway_client import (
    AsyncGatewayClient,
    AuthFailed,
    Conflict,
    Forbidden,
    GatewayClient,
    GatewayUnreachable,
    InvalidRequest,
    Job,
    JobFailed,
    JobStatus,
    NotFound,
    TryLater,
)
from tests.harness import REPO_ROOT, ComfyUITarget, api_alone, api_alone_settings, free_port, recorded_workflow
from tests.test_auth import ADMIN_KEY, ALICE_KEY, API_KEYS, BOB_KEY, JWT_SECRET, claims, token
from tests.test_e2e_sse import Served, served_gateway

SLOW_TEMPLATE = "client_slow"
FAILING_TEMPLATE = "client_fail"  # ComfyUI runs out of memory on it


def slow_template(comfyui: ComfyUITarget) -> dict[str, Any]:
    """slow.json with its running time as an input, `seconds` of wall time on this ComfyUI."""
    graph = recorded_workflow("slow.json")
    graph["2"]["inputs"]["seconds"] = "{{seconds}}"
    return graph


@pytest.fixture(scope="module")
async def served(temporal_env: WorkflowEnvironment, comfyui: ComfyUITarget, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Served]:
    async with served_gateway(temporal_env.client, comfyui, tmp_path_factory.mktemp("client"),
                              f"test-{uuid.uuid4()}", api_keys=API_KEYS, jwt_secret=JWT_SECRET) as gateway:
        async with AsyncGatewayClient(gateway.url, api_key=ADMIN_KEY) as admin:
            await admin.create_workflow(SLOW_TEMPLATE, slow_template(comfyui), name="Slow", input_schema={
                "type": "object", "fields": {"seconds": {"type": "number", "min": 0, "max": 600, "default": 0}}})
            await admin.create_workflow(FAILING_TEMPLATE, recorded_workflow("fail.json"))
        yield gateway


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def seconds(comfyui: ComfyUITarget, wall: float) -> float:
    return round(wall / comfyui.time_scale, 1)


async def test_the_blocking_client_generates_a_job_follows_its_progress_and_downloads_its_outputs(
        served: Served, tmp_path: Path) -> None:
    def as_a_script_would() -> tuple[Job, list[Job], list[Path], Any, Any]:
        seen: list[Job] = []
        with GatewayClient(served.url, api_key=ALICE_KEY) as gateway:
            assert gateway.health().ok
            assert SLOW_TEMPLATE in gateway.capabilities().workflows
            job = gateway.generate(SLOW_TEMPLATE, seconds=seconds(served.comfyui, 1.0), on_progress=seen.append)
            paths = gateway.download_outputs(job.job_id, tmp_path / "out")
            inline = gateway.download_base64(job.job_id, job.outputs[0].filename)
            listed = gateway.list_jobs(template=SLOW_TEMPLATE, status="succeeded")
            return job, seen, paths, inline, (gateway.logs(job.job_id), listed, gateway.get_job(job.job_id))

    job, seen, paths, inline, (logs, listed, again) = await asyncio.to_thread(as_a_script_would)
    assert job.status is JobStatus.succeeded and job.workflow_id == SLOW_TEMPLATE and job.progress == 100
    # The callback saw the job live, as each event left it: running with a node, then its end.
    running = [update for update in seen if update.status is JobStatus.running]
    assert running and any(0 < update.progress < 100 and update.current_node == "2" for update in running), seen
    assert seen[-1].status is JobStatus.succeeded and seen[-1].job_id == job.job_id
    # The end is told once, by the final event: not also by the output event before it, which carries the
    # status the job ended with already.
    assert [update.status for update in seen].count(JobStatus.succeeded) == 1, seen
    # The file is the job's, byte for byte, and so is its base64 copy.
    [path] = paths
    [recorded] = job.outputs
    assert path == tmp_path / "out" / recorded.filename and path.read_bytes().startswith(b"\x89PNG")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()  # a file as any other, not a private temporary
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded.sha256
    assert inline.content == path.read_bytes() and inline.content_type == "image/png"
    assert not list((tmp_path / "out").glob(".*.part"))
    assert any(entry.kind for entry in logs.events) and logs.job_id == job.job_id
    assert job.job_id in {listed_job.job_id for listed_job in listed.jobs}
    assert again == job


async def test_the_async_client_types_the_gateways_errors(served: Served) -> None:
    async with AsyncGatewayClient(served.url, api_key=ALICE_KEY) as alice:
        with pytest.raises(NotFound) as missing:
            await alice.get_job(str(uuid.uuid4()))
        assert (missing.value.code, missing.value.status) == ("JOB_NOT_FOUND", 404)
        with pytest.raises(NotFound) as no_template:
            await alice.get_workflow("no_such_template")
        assert no_template.value.code == "WORKFLOW_NOT_FOUND" and no_template.value.details["workflowId"]
        with pytest.raises(InvalidRequest) as invalid:
            await alice.submit("solid_color", {"width": "wide"})
        assert invalid.value.code == "VALIDATION_ERROR" and invalid.value.status == 400
        assert [field["field"] for field in invalid.value.fields] == ["inputs.width"]
        with pytest.raises(Forbidden) as forbidden:
            await alice.delete_workflow(SLOW_TEMPLATE)
        assert forbidden.value.code == "FORBIDDEN"
    async with AsyncGatewayClient(served.url, api_key="not-a-key") as stranger:
        with pytest.raises(AuthFailed) as refused:
            await stranger.list_jobs()
        assert (refused.value.code, refused.value.status) == ("AUTH_FAILED", 401)
    async with AsyncGatewayClient(served.url, token="not.a.jwt") as stranger:
        with pytest.raises(AuthFailed):
            await stranger.list_workflows()
    bearer = token(claims(sub="carol"))["Authorization"].removeprefix("Bearer ")
    async with AsyncGatewayClient(served.url, token=bearer) as carol:
        submitted = await carol.submit("solid_color", {"width": 8, "height": 8})
        assert (await carol.get_job(submitted.job_id, wait=10)).owner == "carol"  # the token's subject


async def test_failed_and_cancelled_jobs_raise_with_their_codes_and_batches_run(served: Served) -> None:
    async with AsyncGatewayClient(served.url, api_key=BOB_KEY) as bob:
        with pytest.raises(JobFailed) as failed:
            await bob.generate(FAILING_TEMPLATE)
        assert failed.value.code == "COMFYUI_OOM" and failed.value.job.status is JobStatus.failed

        slow = await bob.submit(SLOW_TEMPLATE, {"seconds": seconds(served.comfyui, 20)})
        cancelled = await bob.cancel(slow.job_id, "changed my mind")
        assert cancelled.job_id == slow.job_id
        with pytest.raises(JobFailed) as ended:
            await bob.wait(slow.job_id)
        assert ended.value.code == "JOB_CANCELLED" and "changed my mind" in ended.value.message
        with pytest.raises(Conflict) as finished:
            await bob.cancel(slow.job_id)
        assert finished.value.code == "JOB_ALREADY_FINISHED"

        batch = await bob.submit_batch("solid_color", [{"width": 8, "height": 8, "color": n} for n in (1, 2)])
        statuses = [event.event async for event in bob.batch_events(batch.batch_id)]
        assert statuses[-1] == "completed"
        done = await bob.get_batch(batch.batch_id)
        assert done.counts.succeeded == 2 and done.progress == 100
        items = await bob.batch_jobs(batch.batch_id)
        assert items.count == 2 and {job.batch_id for job in items.jobs} == {batch.batch_id}
        with pytest.raises(Conflict) as ended_batch:
            await bob.cancel_batch(batch.batch_id)
        assert ended_batch.value.code == "BATCH_ALREADY_FINISHED"


async def test_templates_are_managed_through_the_api_and_a_ui_export_gets_a_hint(served: Served) -> None:
    async with AsyncGatewayClient(served.url, api_key=ADMIN_KEY) as admin:
        graph = recorded_workflow("image.json")
        created = await admin.create_workflow("client_crud", graph, description="first")
        assert created.workflow.version == 1 and created.workflow.workflow_json == graph
        updated = await admin.update_workflow("client_crud", description="second")
        assert (updated.workflow.version, updated.workflow.description) == (2, "second")
        assert "client_crud" in {summary.id for summary in await admin.list_workflows()}
        with pytest.raises(Conflict) as exists:
            await admin.create_workflow("client_crud", graph)
        assert exists.value.code == "WORKFLOW_EXISTS"
        await admin.delete_workflow("client_crud")
        with pytest.raises(NotFound):
            await admin.get_workflow("client_crud")

        ui_export = {"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "version": 0.4}
        with pytest.raises(InvalidRequest) as refused:
            await admin.create_workflow("from_the_editor", ui_export)
        [issue] = refused.value.fields
        assert issue["field"] == "workflowJson" and '"Export (API)"' in issue["message"]
        with pytest.raises(InvalidRequest) as as_a_job:
            await admin.submit(workflow_json=ui_export)
        assert '"Export (API)"' in as_a_job.value.fields[0]["message"]


class DroppingProxy:
    """A TCP proxy in front of the API that breaks its first `drops` connections just after the first event of
    their answer, as a flaky network does; it records each request's Last-Event-ID."""

    def __init__(self, upstream_port: int, drops: int) -> None:
        self.upstream_port = upstream_port
        self.drops = drops
        self.last_event_ids: list[str | None] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        head = await client_reader.readuntil(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
        self.last_event_ids.append(next((v for k, v in headers.items() if k.lower() == "last-event-id"), None))
        drop = len(self.last_event_ids) <= self.drops
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        upstream_writer.write(head)  # a GET: no body follows
        answer = b""
        try:
            while chunk := await upstream_reader.read(65536):
                if not drop:
                    client_writer.write(chunk)
                    continue
                answer += chunk
                body_at = answer.index(b"\r\n\r\n") + 4 if b"\r\n\r\n" in answer else len(answer)
                data_at = answer.find(b"data:", body_at)
                event_end = answer.find(b"\r\n\r\n", data_at) if data_at >= 0 else -1
                if event_end >= 0:
                    client_writer.write(answer[:event_end + 4])  # the first whole event, then the line dies
                    await client_writer.drain()
                    break
        finally:
            upstream_writer.close()
            client_writer.transport.abort()


async def test_an_event_stream_resumes_after_a_dropped_connection(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    proxy = DroppingProxy(port, drops=2)
    async with AsyncGatewayClient(served.url, api_key=ALICE_KEY) as direct:
        submitted = await direct.submit(SLOW_TEMPLATE, {"seconds": seconds(served.comfyui, 1.0)})
    async with proxy as proxied, AsyncGatewayClient(proxied, api_key=ALICE_KEY) as alice:
        events = [event async for event in alice.events(submitted.job_id)]
    assert events[-1].event == "succeeded"
    # Each reconnect sent the id of the last event it had, and the events went on from there, none twice.
    assert proxy.last_event_ids[0] is None and proxy.last_event_ids[1:3] == [events[0].id, events[1].id]
    counts = [int(event.id.split(".")[0]) for event in events]
    assert counts == list(range(1, len(counts) + 1))


async def test_the_feed_of_all_jobs_is_the_callers_own_and_resumes_after_dropped_connections(
        served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    proxy = DroppingProxy(port, drops=2)
    async with AsyncGatewayClient(served.url, api_key=ALICE_KEY) as alice_direct, \
            AsyncGatewayClient(served.url, api_key=BOB_KEY) as bob:
        bobs = await bob.submit(SLOW_TEMPLATE, {"seconds": seconds(served.comfyui, 0.3)})
        alices = await alice_direct.submit(SLOW_TEMPLATE, {"seconds": seconds(served.comfyui, 1.0)})
        async with proxy as proxied, AsyncGatewayClient(proxied, api_key=ALICE_KEY) as alice:
            events = []
            async with asyncio.timeout(60):
                async for event in alice.feed(status=["running", "succeeded"], workflow_id=SLOW_TEMPLATE):
                    events.append(event)
                    if event.data["jobId"] == alices.job_id and event.event == "succeeded":
                        break
    assert {event.data["jobId"] for event in events} == {alices.job_id}  # never bob's job
    assert bobs.job_id != alices.job_id
    assert {event.data["status"] for event in events} <= {"running", "succeeded"}
    # Each reconnect sent the last id it had; the ids went on from there, none twice.
    assert proxy.last_event_ids[0] is None and proxy.last_event_ids[1:3] == [events[0].id, events[1].id]
    ids = [int(event.id) for event in events]
    assert ids == sorted(set(ids))


class RecordingTransport(httpx.AsyncBaseTransport):
    """The app in process, with the status of every answer it gave, in order."""

    def __init__(self, app: Any) -> None:
        self.app = ASGITransport(app=app)
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.app.handle_async_request(request)
        self.statuses.append(response.status_code)
        return response


async def test_a_refusal_carries_retry_after_and_is_tried_again_after_it(tmp_path: Path) -> None:
    # 3 s: the three first requests must fall in one window even on a loaded machine (1 s did not, at load 17).
    settings = api_alone_settings(tmp_path, rate_limit_max=1, rate_limit_window_ms=3000)
    async with api_alone(settings) as app:
        transport = RecordingTransport(app)
        async with AsyncGatewayClient("http://gateway", transport=transport, retries=0) as once:
            await once.capabilities()
            with pytest.raises(TryLater) as limited:
                await once.capabilities()
        assert limited.value.code == "RATE_LIMITED" and limited.value.status == 429
        assert 1 <= limited.value.retry_after <= 3
        async with AsyncGatewayClient("http://gateway", transport=transport, retries=1) as patient:
            assert (await patient.capabilities()).workflows
    # The patient client was refused too, waited the seconds it was told to, and was answered.
    assert transport.statuses == [200, 429, 429, 200]


def test_an_absent_gateway_is_named_by_its_url() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    with GatewayClient(nowhere, retries=1) as client, pytest.raises(GatewayUnreachable) as unreachable:
        client.health()
    assert unreachable.value.url == nowhere and nowhere in str(unreachable.value)


def test_the_client_and_the_commands_for_people_load_nothing_of_the_server() -> None:
    """They use the API only: no database, no Temporal, no server settings. `app.cli` neither, until a command
    that runs the gateway needs them, so a command for people starts in about 0.5 s of CPU, not 0.9 s."""
    loaded = subprocess.run(
        [sys.executable, "-c",
         "import sys, app.cli, comfyui_gateway_client, app.cli_user; print(' '.join(sys.modules))"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    ).stdout.split()
    server = {"temporalio", "sqlalchemy", "sqlmodel", "fastapi", "app.settings", "app.db", "api", "worker"}
    assert not server & set(loaded)


def test_an_application_with_an_app_package_of_its_own_imports_the_client(tmp_path: Path) -> None:
    """The client is a top-level package that imports nothing of `app`: an application whose own `app/` comes
    first on sys.path keeps it, and still gets the client."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("MINE = True\n")
    program = ("import sys, app, comfyui_gateway_client\n"
               "from comfyui_gateway_client import GatewayClient\n"
               "assert app.MINE\n"
               "print(sorted(name for name in sys.modules if name == 'app' or name.startswith('app.')))")
    loaded = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"},
    ).stdout.strip()
    assert loaded == "['app']"
