"""run_prompt on the fleet's path, in the SDK's ActivityEnvironment against a simulator of the test's own: a
prompt left running on ComfyUI (worker shutdown) keeps its slot lease; a re-attach that must post waits for a
lease; images are fetched before the lease, and a failing image host fails the job IMAGE_FETCH_FAILED after
five tries without pinning it to the backend; cancel_prompt stops a prompt on every backend that answers."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy.engine import Engine
from temporalio.activity import ActivityCancellationDetails
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.comfy import IMAGE_FETCH_TRIES, ComfyActivities, Placement
from activities.inputs import ImageStager
from activities.prompt_run import POST_SETTLE_SECONDS, stop_prompt
from app.comfy.backends import Backend
from app.comfy.client import ComfyClient
from app.comfy.health import BackendHealth
from app.comfy.slots import BackendSlots, Fleet, SlotLeases, live_leases
from app.errors import ELAPSED_SECONDS_DETAIL, PROMPT_ON_OTHER_BACKEND
from app.models import CancelPromptInput, PromptProgress, RunPromptInput
from app.storage import LocalStorage
from tests.harness import SimulatorProcess, assert_eventually, free_port, serve_locally

JOB_ID = "9b0c4e7e-5d1a-4a53-8c3e-2f7b1d9e6a01"


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """A simulator of this module's own, whose queue only these tests fill: each stops the prompts it leaves."""
    data_dir = tmp_path_factory.mktemp("gpu") / "comfyui"
    data_dir.mkdir()
    process = SimulatorProcess(data_dir, time_scale=0.1)
    process.start()
    yield process
    process.kill()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@dataclasses.dataclass
class Placed:
    activities: ComfyActivities
    fleet: Fleet
    client: ComfyClient


def placed_on(gpu: SimulatorProcess, http: httpx.AsyncClient, engine: Engine, capacity: int = 1,
              post_settle_seconds: float = POST_SETTLE_SECONDS) -> Placed:
    fleet = Fleet(SlotLeases(engine, "this-worker"))
    backend = Backend("gpu", gpu.url, slots=capacity)
    health = BackendHealth(backend.id, backend.url)
    fleet.add(BackendSlots(backend, capacity, health, fleet), ["queue"])
    stager = ImageStager(http, LocalStorage(Path(tempfile.mkdtemp())), max_bytes=1 << 20, max_pixels=1 << 24,
                         allow_private_urls=True)
    client = ComfyClient(gpu.url, http, health)
    activities = ComfyActivities({"gpu": client}, LocalStorage(Path(tempfile.mkdtemp())), engine,
                                 Path(tempfile.mkdtemp()),
                                 placement=Placement(backend="gpu", fleet=fleet, images=stager, grace_seconds=5),
                                 post_settle_seconds=post_settle_seconds)
    return Placed(activities, fleet, client)


def environment(heartbeats: list[PromptProgress], attempt: int = 1, progress: PromptProgress | None = None,
                ) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt, task_queue="queue",
                                   heartbeat_details=[progress.model_dump(by_alias=True)] if progress else [])
    env.on_heartbeat = lambda details: heartbeats.append(PromptProgress.model_validate(details))
    return env


async def post(client: ComfyClient, prompt: dict[str, Any]) -> str:
    prompt_id = str(uuid.uuid4())
    await client.post_prompt(prompt, prompt_id=prompt_id, client_id="another-job")
    return prompt_id


async def pending(client: ComfyClient, prompt_id: str) -> bool:
    return (await client.queue()).position(prompt_id) not in (None, 0)


async def test_a_prompt_left_running_for_a_retry_keeps_its_lease_and_the_retry_adopts_it(
    gpu: SimulatorProcess, http: httpx.AsyncClient, engine: Engine
) -> None:
    placed = placed_on(gpu, http, engine)
    blocker = await post(placed.client, gpu.slow_prompt(3))
    request = RunPromptInput(job_id=JOB_ID, attempt=1, prompt=gpu.slow_prompt(0.2), timeout_seconds=60)
    heartbeats: list[PromptProgress] = []
    shutdown = environment(heartbeats)
    try:
        running = asyncio.create_task(shutdown.run(placed.activities.run_prompt, request))
        await assert_eventually(lambda: pending(placed.client, request.the_prompt_id))
        shutdown.cancel(ActivityCancellationDetails(worker_shutdown=True))
        with pytest.raises(asyncio.CancelledError):
            await running
        # Still the prompt's (ComfyUI has it), renewed by nobody: no other prompt may take the slot.
        assert live_leases(engine) == {"gpu": [request.the_prompt_id]} and not placed.fleet.leases.held
        assert SlotLeases(engine, "another-worker").claim("gpu", 1, "another-prompt") is None
        retry = environment(heartbeats, attempt=2, progress=heartbeats[-1])
        following = asyncio.create_task(retry.run(placed.activities.run_prompt, request))
        await assert_eventually(lambda: len(placed.fleet.leases.held) == 1)  # the prompt's lease, adopted
        assert live_leases(engine) == {"gpu": [request.the_prompt_id]} and await pending(placed.client, request.the_prompt_id)
        retry.cancel()  # the workflow's cancel: the prompt is stopped and its lease released
        with pytest.raises(asyncio.CancelledError):
            await following
        assert live_leases(engine) == {} and not placed.fleet.leases.held
    finally:
        await stop_prompt(placed.client, blocker)


async def test_a_re_attach_that_must_post_waits_for_a_lease(
    gpu: SimulatorProcess, http: httpx.AsyncClient, engine: Engine
) -> None:
    # The settle wait before a post (5 s by default) is not what this test is about.
    placed = placed_on(gpu, http, engine, post_settle_seconds=0.2)
    lease_asked = asyncio.Event()
    lease = placed.fleet.lease

    async def asking_for_a_lease(*args: Any, **kwargs: Any) -> Any:
        lease_asked.set()
        return await lease(*args, **kwargs)

    placed.fleet.lease = asking_for_a_lease  # type: ignore[method-assign]
    other = SlotLeases(engine, "another-worker")
    taken = other.claim("gpu", 1, "another-prompt")
    assert taken is not None
    blocker = await post(placed.client, gpu.slow_prompt(10))
    # Sent back to its backend, the prompt is not there: it is posted again, but only under a lease.
    request = RunPromptInput(job_id=JOB_ID, attempt=1, prompt=gpu.slow_prompt(0.2), timeout_seconds=60,
                             reattach=True)
    heartbeats: list[PromptProgress] = []
    env = environment(heartbeats)
    try:
        running = asyncio.create_task(env.run(placed.activities.run_prompt, request))
        await asyncio.wait_for(lease_asked.wait(), 10)  # past the settle wait, the last step before a post
        await asyncio.sleep(0.5)  # time enough for a post that does not wait for the lease
        assert not running.done() and await placed.client.history(request.the_prompt_id) is None
        assert (await placed.client.queue()).position(request.the_prompt_id) is None
        other.release(taken)
        await assert_eventually(lambda: pending(placed.client, request.the_prompt_id))
        assert live_leases(engine) == {"gpu": [request.the_prompt_id]}
        env.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert live_leases(engine) == {}
    finally:
        await stop_prompt(placed.client, blocker)


@pytest.fixture
async def failing_image_host() -> AsyncIterator[str]:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/{name}", fail)
    async with serve_locally(app) as url:
        yield url


async def test_images_are_fetched_before_the_lease_and_a_failing_host_fails_the_job_after_five_tries(
    gpu: SimulatorProcess, http: httpx.AsyncClient, engine: Engine, failing_image_host: str
) -> None:
    placed = placed_on(gpu, http, engine)
    # Every slot is held: a fetch that waited for a lease would never fail.
    assert SlotLeases(engine, "another-worker").claim("gpu", 1, "another-prompt") is not None
    prompt: dict[str, Any] = {"1": {"class_type": "LoadImage", "inputs": {"image": "x"}}}
    request = RunPromptInput(job_id=JOB_ID, attempt=1, prompt=prompt, timeout_seconds=60,
                             image_sources={"1.image": f"{failing_image_host}/photo.png"})
    heartbeats: list[PromptProgress] = []
    progress: PromptProgress | None = None
    for attempt in range(1, IMAGE_FETCH_TRIES + 1):
        with pytest.raises(ApplicationError) as raised:
            await asyncio.wait_for(environment(heartbeats, attempt, progress).run(
                placed.activities.run_prompt, request), 10)
        assert raised.value.type == "IMAGE_FETCH_FAILED"
        assert raised.value.non_retryable == (attempt == IMAGE_FETCH_TRIES), attempt
        progress = heartbeats[-1]
    # Nothing reached ComfyUI: no retry was pinned to this backend.
    assert all(beat.backend is None for beat in heartbeats) and progress.image_tries == IMAGE_FETCH_TRIES


async def test_cancel_prompt_stops_it_on_every_backend_that_answers_and_fails_only_if_none_does(
    gpu: SimulatorProcess, http: httpx.AsyncClient, engine: Engine
) -> None:
    live = ComfyClient(gpu.url, http)
    gone = ComfyClient(f"http://127.0.0.1:{free_port()}", http)
    blocker = await post(live, gpu.slow_prompt(10))
    queued = await post(live, gpu.slow_prompt(0.2))
    scratch = Path(tempfile.mkdtemp())
    storage = LocalStorage(scratch)
    try:
        both = ComfyActivities({"gpu": live, "gone": gone}, storage, engine, scratch)
        await ActivityEnvironment().run(both.cancel_prompt, CancelPromptInput(backend=None, prompt_id=queued))
        assert (await live.queue()).position(queued) is None
        only_gone = ComfyActivities({"gone": gone}, storage, engine, scratch)
        with pytest.raises(ApplicationError) as raised:
            await ActivityEnvironment().run(only_gone.cancel_prompt, CancelPromptInput(backend=None, prompt_id=queued))
        assert raised.value.type == "COMFYUI_UNREACHABLE"
    finally:
        await stop_prompt(live, blocker)


async def test_a_prompt_on_another_backend_is_handed_back_with_the_time_it_used_and_counts_on_from_it(
    gpu: SimulatorProcess, http: httpx.AsyncClient, engine: Engine
) -> None:
    placed = placed_on(gpu, http, engine)
    request = RunPromptInput(job_id=JOB_ID, attempt=1, prompt=gpu.slow_prompt(0.2), timeout_seconds=60)
    elsewhere = PromptProgress(prompt_id=request.the_prompt_id, backend="gpu-other", post_attempted=True,
                               submitted=True, elapsed_seconds=12.5)
    with pytest.raises(ApplicationError) as handed_back:
        await environment([], attempt=2, progress=elsewhere).run(placed.activities.run_prompt, request)
    assert handed_back.value.type == PROMPT_ON_OTHER_BACKEND
    assert handed_back.value.details[0] == {"backend": "gpu-other", ELAPSED_SECONDS_DETAIL: 12.5}

    # On its own backend the re-attach starts from those seconds, not from 0.
    heartbeats: list[PromptProgress] = []
    reattach = request.model_copy(update={"reattach": True, "elapsed_seconds": 12.5})
    env = environment(heartbeats)
    running = asyncio.create_task(env.run(placed.activities.run_prompt, reattach))
    await assert_eventually(lambda: heartbeats)
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert min(beat.elapsed_seconds for beat in heartbeats) >= 12.5
