"""run_prompt stores the outputs of the prompt it ran (RunPromptInput.collect), in the SDK's ActivityEnvironment
against the session's ComfyUI; a store in trouble leaves them to collect_outputs, and the prompt's slot
lease is let go either way."""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine
from temporalio.testing import ActivityEnvironment

from activities.comfy import ComfyActivities, Placement
from activities.inputs import ImageStager
from app.comfy.backends import Backend
from app.comfy.client import ComfyClient
from app.comfy.health import BackendHealth
from app.comfy.slots import BackendSlots, Fleet, SlotLeases, live_leases
from app.models import OutputCollection, OutputFormat, RunPromptInput
from app.storage import LocalStorage, StorageError
from tests.harness import ComfyUITarget, recorded_workflow


class RefusingStorage(LocalStorage):
    """A store that is down: every file it is given fails, as a store's trouble does (StorageError)."""

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        raise StorageError(f"the store refused {key}")


class BrokenStorage(LocalStorage):
    """A store that fails in a way nobody classified (a bug, a library's own error)."""

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        raise ValueError(f"unexpected trouble with {key}")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def activities_on(comfyui: ComfyUITarget, http: httpx.AsyncClient, engine: Engine,
                  storage: LocalStorage) -> ComfyActivities:
    fleet = Fleet(SlotLeases(engine, "this-worker"))
    backend = Backend("gpu", comfyui.url, slots=1)
    health = BackendHealth(backend.id, backend.url)
    fleet.add(BackendSlots(backend, 1, health, fleet), ["queue"])
    stager = ImageStager(http, LocalStorage(Path(tempfile.mkdtemp())), max_bytes=1 << 20, max_pixels=1 << 24,
                         allow_private_urls=True)
    return ComfyActivities({"gpu": ComfyClient(comfyui.url, http, health)}, storage, engine,
                           Path(tempfile.mkdtemp()),
                           placement=Placement(backend="gpu", fleet=fleet, images=stager, grace_seconds=5))


def request() -> RunPromptInput:
    # A job id of its own: the session's ComfyUI keeps every prompt of the session in its history.
    return RunPromptInput(job_id=str(uuid.uuid4()), attempt=1, prompt=recorded_workflow("image.json"), timeout_seconds=60,
                          collect=OutputCollection(output_format=OutputFormat.jpg, output_quality=80))


async def test_run_prompt_stores_the_outputs_in_the_jobs_format(
    comfyui: ComfyUITarget, http: httpx.AsyncClient, engine: Engine, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    job = request()
    result = await ActivityEnvironment().run(activities_on(comfyui, http, engine, storage).run_prompt, job)
    assert result.backend == "gpu" and result.outputs
    [stored] = result.files or []
    assert stored.storage_key == f"{job.job_id}/0/{stored.filename}" and stored.filename.endswith(".jpg")
    assert stored.content_type == "image/jpeg" and stored.node_id == "2"
    content = (tmp_path / "outputs" / stored.storage_key).read_bytes()
    assert hashlib.sha256(content).hexdigest() == stored.sha256 and len(content) == stored.size
    assert live_leases(engine) == {}


@pytest.mark.parametrize("store", [RefusingStorage, BrokenStorage])
async def test_a_store_in_trouble_leaves_the_outputs_to_collect_outputs(
    comfyui: ComfyUITarget, http: httpx.AsyncClient, engine: Engine, tmp_path: Path, store: type[LocalStorage]
) -> None:
    # Whatever the trouble: a failure that escaped would make run_prompt retry, and ComfyUI run the prompt again.
    storage = store(tmp_path / "outputs")
    result = await ActivityEnvironment().run(activities_on(comfyui, http, engine, storage).run_prompt,
                                             request())
    # The prompt's result stands, for the workflow to collect from; no slot is held meanwhile.
    assert result.files is None and result.outputs and result.execution_time_ms is not None
    assert live_leases(engine) == {}
