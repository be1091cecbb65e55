"""The FastAPI application: routes per resource, dependencies, JSON errors, OpenAPI docs at /docs and /redoc."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from temporalio.api.enums.v1 import TaskQueueType
from starlette.types import ASGIApp
from temporalio.client import Client

from api.codec_cors import CodecCors
from api.errors import install_error_handlers
from api.database import Database
from api.job_reader import CurrentRows, JobReader, live_views
from api.batch_streams import batch_feeds
from api.event_streams import StreamPlaces
from api.feed import Feed
from api.job_streams import job_feeds
from api.job_waits import JobWaits
from api.openapi import install_openapi
from api.plain_json import BodySizeLimit
from api.metrics_collectors import api_registry
from api.probes import Probes
from api.rate_limits import RateLimitMiddleware, RateLimits
from api.request_ids import RequestIds
from api.request_metrics import RequestMetrics
from api.security_headers import SecurityHeaders
from api.shared_answers import SharedAnswers
from api.temporal_connection import TemporalConnection
from api.auth import warn_if_open
from api.routes.batches import batch_json
from api.routes import audit, backends, batches, codec, events, feed, health, jobs, metrics, outputs, workflows
from app.codec import EncryptionCodec
from app.comfy.backends import configured_backends, served_queues
from app.db import make_engine
from app.queue_estimates import MeanRunTimes
from app.settings import Settings, get_settings
from app.storage import build_storage
from app.temporal_client import connect_temporal
from app.templates.store import prepare_database
from app.temporal_ui import TemporalUi

log = logging.getLogger(__name__)

_COMFYUI_ANSWERS_SECONDS = 10.0

# What a browser page on an allowed origin may send and read (CORS_ORIGINS).
CORS_METHODS = ["GET", "POST", "PUT", "DELETE"]
CORS_REQUEST_HEADERS = ["Content-Type", "Authorization", "X-API-Key", "Idempotency-Key", "X-Request-ID"]
CORS_EXPOSED_HEADERS = ["Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                        "Content-Disposition", "Location", "X-Request-ID"]


async def _keep_connecting(settings: Settings, connection: TemporalConnection) -> None:
    while connection.client is None:
        try:
            connection.client = await connect_temporal(settings)
            log.info("connected to Temporal at %s", settings.temporal_address)
        except Exception as error:  # connection errors vary by transport; all mean "try again"
            log.warning("Temporal at %s not reachable yet (%s); retrying", settings.temporal_address, error)
            await asyncio.sleep(2)


def _with_security_headers(app: FastAPI, settings: Settings) -> None:
    """SecurityHeaders and the request id outside Starlette's own outermost middleware, which answers a fault
    with a 500 of its own; `add_middleware` would put them inside. (FastAPIOffline makes a FastAPI; it is no
    class to extend.)"""
    build_stack = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return RequestIds(SecurityHeaders(build_stack()), access_log=settings.access_log,
                          routes=app.router.routes if settings.privacy_mode else None)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, temporal_client: Client | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_open(settings)
        app.state.settings = settings
        keys = settings.encryption_key_ring
        app.state.payload_codec = EncryptionCodec(keys) if keys else None  # for /codec, as the Temporal client's
        app.state.engine = make_engine(settings.resolved_database_url)
        prepare_database(app.state.engine)
        app.state.storage = build_storage(settings)
        app.state.live_views = live_views()
        app.state.current_rows = CurrentRows()
        app.state.run_times = MeanRunTimes()
        app.state.job_waits = JobWaits(settings.api_max_concurrent_waits)
        app.state.job_feeds = job_feeds(
            lambda: JobReader(Database(app.state.engine), app.state.temporal, app.state.live_views,
                              app.state.current_rows),
            app.state.job_waits, settings.sse_poll_s)
        app.state.batch_feeds = batch_feeds(
            lambda batch_id: batch_json(Database(app.state.engine), app.state.temporal,
                                  TemporalUi.of(settings), batch_id),
            settings.sse_poll_s)
        app.state.stream_places = StreamPlaces(settings.api_max_concurrent_streams)
        app.state.feed = Feed(Database(app.state.engine), app.state.storage, poll_s=settings.feed_poll_s,
                              window_s=settings.feed_replay_window_s, replay_max=settings.feed_replay_max_events,
                              queue_size=settings.feed_listener_queue)
        # What ComfyUI has (node types, models) changes rarely: a burst of requests asks it once.
        app.state.comfyui_answers = SharedAnswers(reuse_seconds=_COMFYUI_ANSWERS_SECONDS)
        app.state.started_at = time.monotonic()
        app.state.temporal = TemporalConnection(temporal_client)
        background = [] if temporal_client else [asyncio.create_task(_keep_connecting(settings, app.state.temporal))]
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0)) as http,
            httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as probe_http,
        ):
            app.state.http = http
            app.state.probes = Probes(
                backends=configured_backends(settings),
                queues={
                    settings.temporal_task_queue: TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    **{queue: TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
                       for backend in configured_backends(settings) for queue in served_queues(settings, backend)},
                },
                temporal=app.state.temporal, http=probe_http,
            )
            await app.state.probes.refresh()  # /health has an answer from the first request on
            app.state.metrics = api_registry(app.state.engine, app.state.probes)
            background.append(asyncio.create_task(app.state.probes.run()))
            background.append(asyncio.create_task(app.state.feed.prune()))
            try:
                yield
            finally:
                for task in background:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                await app.state.feed.stop()
                app.state.engine.dispose()

    # Swagger UI and ReDoc from the assets the package bundles, not a CDN: the docs work offline.
    app = FastAPIOffline(
        title="ComfyUI Gateway",
        description="A durable REST gateway for ComfyUI: every job is a Temporal workflow.",
        version=health.GATEWAY_VERSION,
        lifespan=lifespan,
        redirect_slashes=False,  # a 307 with an empty body is no answer for an API client: /jobs/ is a 404
    )
    _with_security_headers(app, settings)
    # Added innermost first: a request passes /codec's CORS, CORS, then the address limit, then the body's size limit.
    app.add_middleware(BodySizeLimit)
    if settings.rate_limited:
        app.add_middleware(RateLimitMiddleware, limits=RateLimits(settings))
    if settings.cors_origins:
        # Credentials are API keys and tokens in headers, never cookies: no `allow_credentials`, so that `*`
        # stays "any page, without the user's cookies".
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS, max_age=600,
        )
    # Outside those: a preflight for /codec is answered for the Web UI's origin before they see it.
    app.add_middleware(CodecCors, origins=settings.resolved_codec_cors_origins)
    # Outside them all: every request is counted, the ones they answer themselves too.
    app.add_middleware(RequestMetrics, routes=app.router.routes)
    install_error_handlers(app)
    # Each router but health's (/health and /ready are public) and metrics' (METRICS_TOKEN) requires a caller
    # (api.deps.get_principal).
    routers = [jobs.router, events.router, feed.router, feed.ws_router, batches.router, outputs.router, workflows.router, audit.router,
               health.router, codec.router, backends.router, metrics.router]
    for router in routers:
        app.include_router(router)
    install_openapi(app, routers)
    return app
