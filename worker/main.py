"""The Temporal worker: GenerationWorkflow and its activities, with one slot-limited queue per ComfyUI, the
reconciler that closes the rows of jobs Temporal itself ended, and RetentionWorkflow with the schedule that
starts it (RETENTION_DAYS).

The main task queue runs workflows (jobs, and the delivery of their webhooks) and the short activities (render,
record, collect, cancel, webhook attempts). Each
ComfyUI backend has its own queue for `run_prompt`, limited to MAX_CONCURRENCY at a time, so jobs beyond
that wait durably in Temporal. The limit holds per worker process: run one worker per backend queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial

import httpx
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.worker import Worker

from activities.comfy import ComfyActivities
from activities.delivery import WebhookDelivery, WebhookPoster
from activities.inputs import InputActivities
from activities.progress_webhooks import ProgressWebhooks
from activities.records import RecordActivities
from activities.render import RenderActivities
from activities.retention import RetentionActivities
from app.comfy.backends import backend_task_queue, configured_backends
from app.comfy.client import ComfyClient
from app.comfy.health import BackendHealth
from app.db import make_engine
from app.settings import Settings
from app.storage import build_storage
from app.templates.store import prepare_database
from app.temporal_client import register_search_attributes
from app.webhooks.signing import WebhookSigner
from worker.reconciler import JobReconciler
from worker.retention_schedule import ensure_retention_schedule
from workflows_temporal.generation import GenerationWorkflow
from workflows_temporal.retention import RetentionWorkflow
from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow

log = logging.getLogger(__name__)

# Long enough for short activities to finish; a prompt being followed is handed to the next worker
# (which re-attaches to it) rather than waited for.
_GRACEFUL_SHUTDOWN = timedelta(seconds=5)
_HEARTBEAT_THROTTLE = timedelta(seconds=1)


def build_workers(
    client: Client, settings: Settings, engine: Engine, http: httpx.AsyncClient, image_http: httpx.AsyncClient
) -> list[Worker]:
    backends = configured_backends(settings)
    clients = {backend.id: ComfyClient(backend.url, http, BackendHealth(backend.id, backend.url)) for backend in backends}
    storage = build_storage(settings)
    # Webhooks go to users' URLs: the SSRF-safe client of image inputs (no proxy, pinned addresses).
    signer = WebhookSigner(settings.webhook_secret) if settings.webhook_secret else None
    poster = WebhookPoster(image_http, signer, settings.webhook_allowed_domains)
    comfy = ComfyActivities(
        clients=clients, storage=storage, engine=engine, scratch_dir=settings.data_dir / "tmp",
        progress_webhooks=partial(
            ProgressWebhooks, poster, storage, settings.resolved_public_base_url, settings.webhook_progress_interval_s
        ),
    )
    delivery = WebhookDelivery(poster, engine, storage, settings)
    inputs = InputActivities(
        clients, image_http, storage,
        max_bytes=settings.input_image_max_bytes, max_pixels=settings.input_image_max_pixels,
        allow_private_urls=settings.input_image_allow_private_urls,
    )
    render = RenderActivities(engine)
    records = RecordActivities(engine)
    retention = RetentionActivities(engine, storage, client)
    main = Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[GenerationWorkflow, RetentionWorkflow, WebhookDeliveryWorkflow],
        activities=[
            render.render_prompt, records.record_job, comfy.collect_outputs, comfy.cancel_prompt, inputs.stage_images,
            retention.find_expired_jobs, retention.delete_jobs,
            delivery.build_webhook, delivery.deliver_webhook, delivery.webhook_given_up,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=16, thread_name_prefix="activity"),
        graceful_shutdown_timeout=_GRACEFUL_SHUTDOWN,
    )
    per_backend = [
        Worker(
            client,
            task_queue=backend_task_queue(settings, backend.id),
            activities=[comfy.run_prompt],
            max_concurrent_activities=settings.max_concurrency,
            graceful_shutdown_timeout=_GRACEFUL_SHUTDOWN,
            # Heartbeats carry the live progress, and their answers carry a cancel or a workflow gone away
            # (terminated): both must not wait for the SDK's default throttle of up to 80% of the timeout.
            max_heartbeat_throttle_interval=_HEARTBEAT_THROTTLE,
        )
        for backend in backends
    ]
    return [main, *per_backend]


@asynccontextmanager
async def running_worker(client: Client, settings: Settings, engine: Engine | None = None) -> AsyncIterator[None]:
    """Run the gateway's workers for the duration of the block; shut them down gracefully after."""
    engine = engine or make_engine(settings.resolved_database_url)
    prepare_database(engine)
    await register_search_attributes(client)
    await ensure_retention_schedule(client, settings)
    # Image inputs are fetched from the internet with a client of their own: no cookies shared with the
    # ComfyUI client, and no proxy from the environment, which would defeat the address pinning.
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as http,
        httpx.AsyncClient(trust_env=False) as image_http,
    ):
        workers = build_workers(client, settings, engine, http, image_http)
        tasks = [asyncio.create_task(worker.run()) for worker in workers]
        reconciler = asyncio.create_task(JobReconciler(client, engine, settings.temporal_task_queue).run())
        log.info("worker polling %s", ", ".join(worker.task_queue for worker in workers))
        try:
            yield
        finally:
            reconciler.cancel()
            await asyncio.gather(*(worker.shutdown() for worker in workers), return_exceptions=True)
            await asyncio.gather(reconciler, *tasks, return_exceptions=True)
