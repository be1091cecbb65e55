"""The Temporal worker: GenerationWorkflow and its activities, the workers that place prompts on the ComfyUI
backends, the reconciler that closes the rows of jobs Temporal itself ended, and RetentionWorkflow with the
schedule that starts it (RETENTION_DAYS).

The main task queue runs workflows (jobs, and the delivery of their webhooks) and the short activities (render,
record, collect, cancel, webhook attempts). Each backend runs one worker per queue it serves (the shared queue,
one per tag, its own), all under one slot supplier that lets a poll through only while the backend is healthy
and has a free slot, least loaded first (app.comfy.slots); slot leases in the database keep several worker
processes sharing a backend list from over-filling a backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.service import ServiceClient
from temporalio.worker import FixedSizeSlotSupplier, PollerBehaviorSimpleMaximum, Worker, WorkerTuner

from activities.comfy import ComfyActivities, Placement
from activities.batches import BatchActivities
from activities.delivery import WebhookDelivery, WebhookPoster
from activities.inputs import ImageStager, InputActivities
from activities.progress_webhooks import ProgressWebhooks
from activities.records import RecordActivities
from activities.render import RenderActivities
from activities.retention import RetentionActivities
from app.comfy.backends import backend_task_queue, configured_backends, served_queues
from app.comfy.client import ComfyClient
from app.comfy.health import BackendHealth
from app.comfy.prober import probe_backend
from app.comfy.slots import BackendSlots, Fleet, SlotLeases
from app.db import make_engine
from app.metrics import serving_worker_metrics
from app.settings import Settings
from app.storage import build_storage
from app.templates.store import prepare_database
from app.temporal_client import register_search_attributes
from app.webhooks.signing import WebhookSigner
from worker.bytecode import cache_workflow_bytecode
from worker.log_context import LogContextInterceptor
from worker.reconciler import JobReconciler
from worker.retention_schedule import ensure_retention_schedule
from workflows_temporal.batch import BatchWorkflow
from workflows_temporal.generation import GenerationWorkflow
from workflows_temporal.retention import RetentionWorkflow
from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow

log = logging.getLogger(__name__)

# Long enough for short activities to finish; a prompt being followed is handed to the next worker
# (which re-attaches to it) rather than waited for.
_GRACEFUL_SHUTDOWN = timedelta(seconds=5)
_HEARTBEAT_THROTTLE = timedelta(seconds=1)
_PROBE_TIMEOUT_S = 2.0
# The SDK's default workflow cache. A job whose prompt is on the fleet wakes every few seconds (signals, its
# activity's end, queries): evicted, each wake replays its whole history, so the cache holds at least two
# workflows per prompt the fleet may have at once (a large fleet's jobs, and the others around them).
_CACHED_WORKFLOWS = 1000
# Workflow tasks the worker takes at once (the SDK's default is 100). Each runs in a thread of its own and most
# wait on a local activity's database write: at a thousand jobs, 100 at once held the GIL in turns with the
# event loop that follows the prompts, and past the 10 s workflow task timeout each was done again. Fewer at
# once finish sooner; the others wait in Temporal's task queue, where no timeout runs.
_WORKFLOW_TASKS_AT_ONCE = 16


@dataclass
class GatewayWorkers:
    workers: list[Worker]
    fleet: Fleet
    # What runs beside them: each backend's prober, and the renewal and count of slot leases.
    background: list[Coroutine[Any, Any, None]]


async def connection_of_its_own(client: Client) -> Client:
    """A client like `client` on a connection of its own. The SDK lets one connection run only one worker per
    task queue, and every backend runs one on the shared queue."""
    config = client.config()
    del config["service_client"]
    return Client(await ServiceClient.connect(client.service_client.config), **config)


def build_workers(
    client: Client, settings: Settings, engine: Engine, comfy_http: dict[str, httpx.AsyncClient],
    image_http: httpx.AsyncClient, probe_http: httpx.AsyncClient, backend_clients: dict[str, Client],
) -> GatewayWorkers:
    backends = configured_backends(settings)
    healths = {backend.id: BackendHealth(backend.id, backend.public_url) for backend in backends}
    clients = {backend.id: ComfyClient(backend.url, comfy_http[backend.id], healths[backend.id])
               for backend in backends}
    storage = build_storage(settings)
    # Webhooks go to users' URLs: the SSRF-safe client of image inputs (no proxy, pinned addresses).
    signer = WebhookSigner(settings.webhook_secret) if settings.webhook_secret else None
    poster = WebhookPoster(image_http, signer, settings.webhook_allowed_domains)
    progress_webhooks = partial(
        ProgressWebhooks, poster, storage, settings.resolved_public_base_url, settings.webhook_progress_interval_s
    )
    comfy = ComfyActivities(
        clients=clients, storage=storage, engine=engine, scratch_dir=settings.data_dir / "tmp",
        progress_webhooks=progress_webhooks,
    )
    delivery = WebhookDelivery(poster, engine, storage, settings)
    stager = ImageStager(
        image_http, storage, max_bytes=settings.input_image_max_bytes, max_pixels=settings.input_image_max_pixels,
        allow_private_urls=settings.input_image_allow_private_urls,
    )
    inputs = InputActivities(clients, stager)
    render = RenderActivities(engine)
    records = RecordActivities(engine)
    batches = BatchActivities(engine)
    retention = RetentionActivities(engine, storage, client)
    prompts = sum(backend.capacity(settings.comfyui_prefetch) for backend in backends)
    log_context = LogContextInterceptor()  # the job's ids on its activities' log lines
    main = Worker(
        client,
        task_queue=settings.temporal_task_queue,
        max_cached_workflows=max(_CACHED_WORKFLOWS, 2 * prompts),
        max_concurrent_workflow_tasks=_WORKFLOW_TASKS_AT_ONCE,
        workflows=[GenerationWorkflow, BatchWorkflow, RetentionWorkflow, WebhookDeliveryWorkflow],
        activities=[
            render.render_prompt, records.record_job, batches.record_batch, comfy.collect_outputs, comfy.cancel_prompt, inputs.stage_images,
            retention.find_expired_jobs, retention.delete_jobs,
            delivery.build_webhook, delivery.deliver_webhook, delivery.webhook_given_up,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=16, thread_name_prefix="activity"),
        interceptors=[log_context],
        graceful_shutdown_timeout=_GRACEFUL_SHUTDOWN,
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=settings.temporal_sticky_timeout_s),
    )
    fleet = Fleet(SlotLeases(engine))
    queues = {backend.id: served_queues(settings, backend) for backend in backends}
    servers = Counter(queue for served in queues.values() for queue in served)
    per_backend: list[Worker] = []
    for backend in backends:
        slots = BackendSlots(
            backend=backend, capacity=backend.capacity(settings.comfyui_prefetch), health=healths[backend.id],
            fleet=fleet, own_queue=backend_task_queue(settings, backend.id), sole_queues=frozenset(queue for queue in queues[backend.id] if servers[queue] == 1),
        )
        fleet.add(slots, queues[backend.id])
        placed = ComfyActivities(
            clients=clients, storage=storage, engine=engine, scratch_dir=settings.data_dir / "tmp",
            progress_webhooks=progress_webhooks,
            placement=Placement(backend=backend.id, fleet=fleet, images=stager,
                                grace_seconds=settings.comfyui_heartbeat_timeout_s),
        )
        # One tuner, so one count of the backend's prompts, for all the queues it serves.
        tuner = WorkerTuner.create_composite(
            workflow_supplier=FixedSizeSlotSupplier(1), activity_supplier=slots,
            local_activity_supplier=FixedSizeSlotSupplier(1), nexus_supplier=FixedSizeSlotSupplier(1),
        )
        per_backend += [
            Worker(
                backend_clients.get(backend.id, client),
                task_queue=queue,
                activities=[placed.run_prompt],
                interceptors=[log_context],
                tuner=tuner,
                # One poll at a time per queue: each poll is let through on a free slot (app.comfy.slots).
                activity_task_poller_behavior=PollerBehaviorSimpleMaximum(maximum=1),
                graceful_shutdown_timeout=_GRACEFUL_SHUTDOWN,
                # Heartbeats carry the live progress, and their answers carry a cancel or a workflow gone away
                # (terminated): both must not wait for the SDK's default throttle of up to 80% of the timeout.
                max_heartbeat_throttle_interval=_HEARTBEAT_THROTTLE,
            )
            for queue in queues[backend.id]
        ]
    probes = [probe_backend(ComfyClient(backend.url, probe_http, healths[backend.id]), fleet.changed)
              for backend in backends]
    return GatewayWorkers([main, *per_backend], fleet, [fleet.keep_leases(), *probes])


class WorkerWatch:
    """Stops the task that runs the workers (the process's main task) when one of them stops on its own: a
    backend's worker gone would leave the backend's slots looking free to the others' placement and its queues
    unserved, so the whole process stops instead, with an error, for `dev` or the orchestrator to restart."""

    def __init__(self, owner: asyncio.Task[Any] | None) -> None:
        self.owner = owner
        self.stopping = False  # set when the workers are shut down on purpose
        self.died: list[str] = []

    def watch(self, task: asyncio.Task[None], queue: str) -> None:
        task.add_done_callback(lambda done: self._stopped(done, queue))

    def _stopped(self, task: asyncio.Task[None], queue: str) -> None:
        if self.stopping:
            return
        error = None if task.cancelled() else task.exception()
        log.error("the worker polling %s stopped (%s); stopping the process", queue,
                  repr(error) if error else "no error", exc_info=error)
        self.died.append(queue)
        if self.owner is not None:
            self.owner.cancel()


@asynccontextmanager
async def running_worker(client: Client, settings: Settings, engine: Engine | None = None) -> AsyncIterator[None]:
    """Run the gateway's workers for the duration of the block; shut them down gracefully after."""
    engine = engine or make_engine(settings.resolved_database_url)
    prepare_database(engine)
    cache_workflow_bytecode()
    await register_search_attributes(client)
    await ensure_retention_schedule(client, settings)
    # Image inputs are fetched from the internet with a client of their own: no cookies shared with the
    # ComfyUI client, and no proxy from the environment, which would defeat the address pinning.
    # Each backend's ComfyUI client has a connection pool of its own, with a connection for each prompt the
    # backend may run (twice over), or its calls wait for the pool and the backend reads as unreachable. Not one
    # pool for the fleet: httpcore looks through every connection of its pool on each request and each response,
    # which at a thousand prompts was a tenth of the worker's event loop.
    backends = configured_backends(settings)
    async with (
        serving_worker_metrics(settings.worker_metrics_address),
        AsyncExitStack() as pools,
        httpx.AsyncClient(trust_env=False) as image_http,
        httpx.AsyncClient(timeout=httpx.Timeout(_PROBE_TIMEOUT_S),
                          limits=httpx.Limits(max_connections=max(100, len(backends)))) as probe_http,
    ):
        comfy_http = {
            backend.id: await pools.enter_async_context(httpx.AsyncClient(
                timeout=httpx.Timeout(30.0, connect=5.0),
                limits=httpx.Limits(max_connections=max(10, 2 * backend.capacity(settings.comfyui_prefetch))),
            ))
            for backend in backends
        }
        # The first backend's workers share the main worker's connection; each other backend has its own.
        backend_clients = {backend.id: await connection_of_its_own(client) for backend in backends[1:]}
        built = build_workers(client, settings, engine, comfy_http, image_http, probe_http, backend_clients)
        workers = built.workers
        await built.fleet.count_others()
        tasks = [asyncio.create_task(worker.run()) for worker in workers]
        background = [asyncio.create_task(job) for job in built.background]
        reconciler = asyncio.create_task(JobReconciler(client, engine, settings.temporal_task_queue).run())
        log.info("worker polling %s", ", ".join(worker.task_queue for worker in workers))
        watch = WorkerWatch(asyncio.current_task())
        for task, worker in zip(tasks, workers):
            watch.watch(task, worker.task_queue)
        try:
            yield
        finally:
            watch.stopping = True
            reconciler.cancel()
            await asyncio.gather(*(worker.shutdown() for worker in workers), return_exceptions=True)
            for job in background:
                job.cancel()
            await asyncio.gather(reconciler, *tasks, *background, return_exceptions=True)
            if watch.died:
                raise RuntimeError(f"the worker polling {watch.died[0]} stopped on its own") from None
