"""End-to-end plumbing: the ComfyUI simulator and the worker as real processes, the API in-process."""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import boto3
import httpx
from aiohttp import web
from fastapi import FastAPI
from httpx import ASGITransport
from sqlalchemy import make_url
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowHistory

from api.deps import get_temporal
from api.main import create_app
from app.db import make_engine, migrate
from app.models import PromptProgress
from app.settings import Settings

SHARED_COMFYUI = Path(__file__).resolve().parents[2] / "shared" / "comfyui"
REPO_ROOT = Path(__file__).resolve().parents[1]
DONE = {"succeeded", "failed", "cancelled"}

T = TypeVar("T")


async def assert_eventually(
    check: Callable[[], T | Awaitable[T]], *, timeout: float = 30, interval: float = 0.05, what: str = "the condition"
) -> T:
    """Call `check` until it returns something true (which is returned) without failing an assertion; after
    `timeout` seconds, fail with its last answer or its last assertion."""
    deadline = time.monotonic() + timeout
    while True:
        failure: AssertionError | None = None
        try:
            answer = check()
            if inspect.isawaitable(answer):
                answer = await answer
            if answer:
                return answer  # type: ignore[return-value]
        except AssertionError as error:
            failure, answer = error, None
        if time.monotonic() > deadline:
            if failure is not None:
                raise failure
            raise AssertionError(f"{what} did not hold within {timeout} s; last answer: {answer!r}")
        await asyncio.sleep(interval)


def recorded_workflow(name: str) -> dict[str, Any]:
    return json.loads((SHARED_COMFYUI / "workflows" / name).read_text())


class ComfyUITarget:
    """A ComfyUI the end-to-end tests run jobs on; `time_scale` < 1 is a simulator that runs faster."""

    url: str
    time_scale: float = 1.0

    def slow_prompt(self, seconds: float) -> dict[str, Any]:
        """slow.json set to run for `seconds` of wall time on this ComfyUI, reporting progress as it goes."""
        prompt = recorded_workflow("slow.json")
        prompt["2"]["inputs"]["seconds"] = round(seconds / self.time_scale, 1)
        return prompt


class ExternalComfyUI(ComfyUITarget):
    """A ComfyUI the tests did not start (`TEST_COMFYUI_URL`): a real one with the test nodes of
    `shared/comfyui/test_nodes` installed, to check that the gateway's flows hold there unchanged."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SimulatorProcess(ComfyUITarget):
    """`comfyui-gateway simulate-comfyui` in a child process: killing it loses its queue and history,
    exactly like restarting a real ComfyUI."""

    def __init__(self, data_dir: Path, time_scale: float = 1.0, node_delay: float = 0.0) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.time_scale = time_scale
        self.node_delay = node_delay
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.data_dir.parent / "simulator.log", "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.simulator", "--port", str(self.port), "--data-dir", str(self.data_dir),
                 "--time-scale", str(self.time_scale), "--node-delay", str(self.node_delay)],
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/system_stats", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the ComfyUI simulator did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


class MotoServerProcess:
    """moto's S3 server (`python -m moto.server`) in a child process: a real S3 HTTP endpoint, in memory. Killing
    it loses every bucket, like a store that is gone. Its memory is its own, not the test process's."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.log_dir = log_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_dir / "moto.log", "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the moto S3 server did not start")

    def client(self) -> Any:
        """A plain boto3 client of this server, to look at buckets as a user of the store would."""
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="test",
                            aws_secret_access_key="test")

    def create_bucket(self, bucket: str | None = None) -> str:
        """A new empty bucket, by default named for the caller alone."""
        bucket = bucket or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def storage_settings(self, bucket: str) -> dict[str, Any]:
        """gateway_settings(...) overrides for STORAGE_PROVIDER=s3 on this server."""
        return {"storage_provider": "s3", "s3_endpoint": self.url, "s3_bucket": bucket, "s3_access_key": "test",
                "s3_secret_key": "test", "s3_region": "us-east-1"}

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


# How long the suite's gateways wait for a worker that went silent: a running prompt's heartbeat, a job's next
# workflow task. Short, so that the crash tests do not spend their time waiting; far above what a live worker
# takes, even on a loaded machine.
SUITE_HEARTBEAT_TIMEOUT_S = 3.0
SUITE_STICKY_TIMEOUT_S = 2.0


def gateway_settings(temporal: Client, simulator_url: str, data_dir: Path, task_queue: str, **overrides: Any) -> Settings:
    # COMFYUI_URLS in `overrides` names the backends instead (the two do not go together).
    values: dict[str, Any] = {
        **({} if "comfyui_urls" in overrides else {"comfyui_url": simulator_url}),
        "data_dir": data_dir,
        "temporal_address": temporal.service_client.config.target_host,
        "temporal_task_queue": task_queue,
        "comfyui_heartbeat_timeout_s": SUITE_HEARTBEAT_TIMEOUT_S,
        # A killed worker's jobs wait this long for it before another takes their next step (Temporal's sticky
        # queue; the server's own fallback takes 10 s).
        "temporal_sticky_timeout_s": SUITE_STICKY_TIMEOUT_S,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def migrate_database(settings: Settings) -> None:
    """What an operator runs before starting the API and the worker: `comfyui-gateway migrate`."""
    migrated_database(settings.resolved_database_url)


def migrated_database(url: str) -> None:
    """Migrate the database at `url` to the head revision. A SQLite file not made yet is a copy of one migrated
    once per test process: the same schema, without Alembic's 0.2 s per test (tests/test_migrations.py runs
    `migrate` itself on empty and older databases)."""
    target = make_url(url)
    if target.get_backend_name() == "sqlite" and target.database not in (None, "", ":memory:"):
        path = Path(target.database)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_migrated_sqlite_file(), path)
            return
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()


@functools.cache
def _migrated_sqlite_file() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="gateway-migrated-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "gateway.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    # The last connection's close checkpointed the write-ahead log into the file: the file alone is the database.
    assert not path.with_name(f"{path.name}-wal").exists(), "the migrated SQLite database kept its WAL file"
    return path


def cli_environment(data_dir: Path, **variables: str) -> dict[str, str]:
    """The environment of a `python -m app.cli` run as a user runs it: this checkout's code, DATA_DIR, and a
    COMFYUI_URL where nothing listens; `variables` on top."""
    return {**os.environ, "DATA_DIR": str(data_dir), "COMFYUI_URL": f"http://127.0.0.1:{free_port()}",
            "PYTHONPATH": str(REPO_ROOT), **variables}


def settings_environment(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for a gateway process of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COMFYUI_", "TEMPORAL_"))}
    env.update({"COMFYUI_URLS": settings.comfyui_urls} if settings.comfyui_urls else {"COMFYUI_URL": settings.comfyui_url})
    env.update({
        "COMFYUI_PREFETCH": str(settings.comfyui_prefetch),
        "DATA_DIR": str(settings.data_dir),
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "COMFYUI_HEARTBEAT_TIMEOUT_S": str(settings.comfyui_heartbeat_timeout_s),
        "MAX_CONCURRENCY": str(settings.max_concurrency),
        "TEMPORAL_STICKY_TIMEOUT_S": str(settings.temporal_sticky_timeout_s),
    })
    return env


class WorkerProcess:
    """`comfyui-gateway worker` in a child process; `variables` are settings on top of `settings`."""

    def __init__(self, settings: Settings, **variables: str) -> None:
        self.settings = settings
        self.variables = variables
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.settings.data_dir / "worker.log", "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"], cwd=REPO_ROOT,
                env={**settings_environment(self.settings), **self.variables}, stdout=log, stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class ApiProcess:
    """`comfyui-gateway api` in a child process on a free port: the API server as it is deployed. `variables`
    are settings on top of `settings`."""

    def __init__(self, settings: Settings, **variables: str) -> None:
        self.settings = settings
        self.port = free_port()
        self.variables = variables
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        log_path = self.settings.data_dir / "api.log"
        with open(log_path, "ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "api"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**settings_environment(self.settings), "PORT": str(self.port), **self.variables},
            )

        async def answers() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    await client.get(f"{self.url}/health")
            except httpx.TransportError:
                return False
            return True

        await assert_eventually(answers, timeout=60, interval=0.2, what=f"the API answering (log: {log_path})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # uvicorn waits for requests still running; a test may leave some
                self.process.kill()
                self.process.wait()


# --- the API alone: no worker, no Temporal, no ComfyUI -------------------------------------------------------


class UnusableTemporal:
    """Temporal for an app whose requests must all be refused before a job is started or read. Routes still
    receive the connection (FastAPI resolves a route's dependencies before the route makes its own checks);
    using it fails the test."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"the request reached Temporal ({name})")


def api_alone_settings(data_dir: Path, **overrides: Any) -> Settings:
    """An API's settings with a SQLite database of its own and nothing listening where Temporal and ComfyUI are."""
    return Settings(
        _env_file=None, data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'gateway.db'}",
        comfyui_url=f"http://127.0.0.1:{free_port()}", temporal_address=f"127.0.0.1:{free_port()}", **overrides,
    )


@asynccontextmanager
async def api_alone(settings: Settings, configure: Callable[[FastAPI], None] = lambda app: None) -> AsyncIterator[FastAPI]:
    """The API app, started, whose routes get `UnusableTemporal`; `configure` may override more dependencies."""
    migrate_database(settings)
    app = create_app(settings)  # no Temporal at temporal_address: the API keeps trying, and routes get the stand-in
    temporal = UnusableTemporal()
    app.dependency_overrides[get_temporal] = lambda: temporal  # what every route gets, however get_temporal works
    configure(app)
    async with app.router.lifespan_context(app):
        yield app


def asgi_client(app: FastAPI, address: str = "127.0.0.1", base_url: str = "http://gateway") -> httpx.AsyncClient:
    """A client of the app in process, calling from `address`; an exception in the app is its 500 answer."""
    transport = ASGITransport(app=app, client=(address, 40000), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=base_url)


@asynccontextmanager
async def serve_locally(app: web.Application) -> AsyncIterator[str]:
    """An aiohttp app on a free loopback port, for as long as the block runs; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def api_client(
    settings: Settings, temporal: Client, overrides: dict[Callable[..., Any], Callable[..., Any]] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process; `overrides` replace FastAPI dependencies (e.g. who the caller is)."""
    app = create_app(settings, temporal)
    app.dependency_overrides.update(overrides or {})
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


async def wait_for_job(api: httpx.AsyncClient, job_id: str, *, until: set[str], timeout: float = 30) -> dict[str, Any]:
    async def job_in_status() -> dict[str, Any]:
        response = await api.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        # The job as last read is the failure's message: what it was doing, or how it ended instead.
        assert job["status"] in until, job
        return job

    return await assert_eventually(job_in_status, timeout=timeout, what=f"job {job_id} reaching {sorted(until)}")


def error_of(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


async def prompt_heartbeat(client: Client, job_id: str) -> PromptProgress | None:
    """What Temporal holds of the job's prompt (the prompt activity's last heartbeat), if anything: what a retry
    after a crash resumes from. The API's read may show progress before it gets there (from the row's live
    columns, which the activity writes itself), so a test that kills a worker waits for this instead."""
    description = await client.get_workflow_handle(job_id).describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name == "run_prompt" and pending.heartbeat_details.payloads:
            [details] = await client.data_converter.decode(pending.heartbeat_details.payloads)
            return PromptProgress.model_validate(details)
    return None


async def comfy_history_for_job(simulator_url: str, job_id: str) -> list[dict[str, Any]]:
    """Every prompt ComfyUI ran for this job (the gateway tags prompts with their job id)."""
    async with httpx.AsyncClient() as client:
        history = (await client.get(f"{simulator_url}/history", params={"max_items": 10000})).json()
    return [entry for entry in history.values() if entry["prompt"][3].get("gateway_job_id") == job_id]


@dataclass
class Gateway:
    api: httpx.AsyncClient
    settings: Settings
    comfyui: ComfyUITarget

    async def submit(self, body: dict[str, Any]) -> str:
        response = await self.api.post("/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["jobId"]

    async def run(self, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        return await wait_for_job(self.api, await self.submit(body), until=DONE, timeout=timeout)


# The workflow histories committed for replay tests (see tests/histories/capture.py).
HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def committed_history(path: Path) -> WorkflowHistory:
    """A committed history as its worker saw it (see `as_its_worker_sees_it`)."""
    return as_its_worker_sees_it(WorkflowHistory.from_json(path.stem, path.read_text()))


def as_its_worker_sees_it(history: WorkflowHistory) -> WorkflowHistory:
    """The Replayer takes a run's id from its started event, which an operator's reset copies from the run it
    replaced; a worker is told the run's own id, the one the reset's failed workflow task names."""
    new_run_ids = [event.workflow_task_failed_event_attributes.new_run_id for event in history.events
                   if event.HasField("workflow_task_failed_event_attributes")
                   and event.workflow_task_failed_event_attributes.new_run_id]
    if new_run_ids:
        history.events[0].workflow_execution_started_event_attributes.original_execution_run_id = new_run_ids[-1]
    return history


async def reset_job(client: Client, job_id: str, *, to_last_task: bool = False, reason: str = "operator reset") -> None:
    """Reset the job's workflow as an operator does from the Web UI: to its first completed workflow task, or
    to its last one."""
    history = await client.get_workflow_handle(job_id).fetch_history()
    tasks = [event.event_id for event in history.events
             if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
    await client.workflow_service.reset_workflow_execution(ResetWorkflowExecutionRequest(
        namespace=client.namespace, reason=reason,
        workflow_execution=WorkflowExecution(workflow_id=job_id, run_id=history.run_id),
        workflow_task_finish_event_id=tasks[-1] if to_last_task else tasks[0], request_id=str(uuid.uuid4()),
    ))
