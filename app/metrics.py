"""The gateway's Prometheus metrics (prometheus-client), each observed in the process that serves it.

The API's are in the default registry, beside the process's own (CPU, memory, GC), and `GET /metrics` serves
them with what is read at scrape time (api.metrics_collectors). The worker's are in WORKER_REGISTRY, which the
worker serves at WORKER_METRICS_ADDRESS: a job's end, its durations and its webhooks happen in the worker's
activities. Several processes each serve their own; Prometheus scrapes each and sums.

Label values are bounded and never private: template ids, statuses, backend ids, route templates. Never a job
id, a principal, an input or a URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from app.jobstore import RecordedChange
from app.models import JobState

# The `template` label of a job that ran a raw graph (workflowJson) rather than a template; no template id has
# parentheses (app.templates.registry).
RAW_WORKFLOW = "(raw)"

# --- the API's (default registry) --------------------------------------------------------------------------------

# Lookups of cacheable jobs with CACHE_ENABLED; a job that is not cacheable looks nothing up.
CACHE_LOOKUPS = Counter(
    "gateway_result_cache_lookups", "result cache lookups by POST /jobs, by result (hit or miss)", ["result"]
)
CACHE_HITS = CACHE_LOOKUPS.labels(result="hit")
CACHE_MISSES = CACHE_LOOKUPS.labels(result="miss")

# Requests refused for their credentials, by what was wrong: the answer never says, the operator may see it.
AUTH_FAILURES = Counter("gateway_auth_failures", "requests refused with 401 AUTH_FAILED", ["reason"])

# Requests waiting for a job's end (`wait=`), and the Temporal long polls they share: one per job waited on.
JOB_WAITS = Gauge("gateway_job_waits", "requests waiting (wait=) for a job to end")
JOB_WAIT_POLLS = Counter("gateway_job_wait_polls", "Temporal long polls for a job's end, each shared by the requests "
                                                   "waiting on that job")
JOB_WAIT_POLLS_OPEN = Gauge("gateway_job_wait_polls_open", "Temporal long polls for a job's end open now")

# The feed of all jobs (GET /events, WS /ws): its listeners, and its one reader's queries, however many listen.
FEED_LISTENERS = Gauge("gateway_feed_listeners", "listeners of the feed of all jobs (SSE streams, WebSocket "
                                                 "subscriptions) now")
FEED_READS = Counter("gateway_feed_reads", "queries of the feed log by the API process's one feed reader, one per "
                                           "FEED_POLL_S while anyone listens")

# Labelled by the route's template (`/jobs/{job_id}`), never the path a client sent: ids make no new series.
HTTP_REQUESTS = Counter(
    "gateway_http_requests", "API requests answered, by method, route template and status", ["method", "route", "status"]
)
HTTP_REQUEST_DURATION = Histogram(
    "gateway_http_request_duration_seconds",
    "time from when the API begins to work on a request (a read once it has its read turn) to its answer's first "
    "byte (an event stream: until it opens), by method and route template", ["method", "route"],
)

# --- the worker's (WORKER_REGISTRY) ------------------------------------------------------------------------------

WORKER_REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    WORKER_REGISTRY.register(_collector)

# From a second's prompt to an hour's render.
_JOB_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))

JOBS_CREATED = Counter(
    "gateway_jobs_created", "jobs accepted (POST /jobs, batch items, result cache hits), by template",
    ["template"], registry=WORKER_REGISTRY,
)
JOBS_FINISHED = Counter(
    "gateway_jobs_finished", "jobs ended, by template and status (succeeded, failed, cancelled)",
    ["template", "status"], registry=WORKER_REGISTRY,
)
JOB_DURATION = Histogram(
    "gateway_job_duration_seconds", "from a job's acceptance to its end, by template and status",
    ["template", "status"], buckets=_JOB_SECONDS_BUCKETS, registry=WORKER_REGISTRY,
)
JOB_QUEUE_WAIT = Histogram(
    "gateway_job_queue_wait_seconds", "from a job's acceptance until ComfyUI started it (result cache hits, which "
    "run nothing, are not observed), by template", ["template"], buckets=_JOB_SECONDS_BUCKETS, registry=WORKER_REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "gateway_webhook_attempts", "posts of a job's or batch's end webhook, by outcome: delivered (2xx), failed (tried "
    "again) or refused (the target may not be reached; not tried again)", ["outcome"], registry=WORKER_REGISTRY,
)
WEBHOOKS_GIVEN_UP = Counter(
    "gateway_webhooks_given_up", "end webhooks given up: refused, or still failing after WEBHOOK_RETRY_FOR_S",
    registry=WORKER_REGISTRY,
)


def template_label(template_id: str | None) -> str:
    return template_id if template_id is not None else RAW_WORKFLOW


def count_job_record(job: JobState, change: RecordedChange) -> None:
    template = template_label(job.template_id)
    if change.created:
        JOBS_CREATED.labels(template=template).inc()
    if change.started and job.started_at is not None and not job.cache_hit:
        JOB_QUEUE_WAIT.labels(template=template).observe(_seconds_between(job.created_at, job.started_at))
    if change.ended:
        count_job_end(job)


def count_job_end(job: JobState) -> None:
    """A job's end, observed by whichever writer ended its row: its workflow's record, or the reconciler."""
    template, status = template_label(job.template_id), job.status.value
    assert job.status.is_terminal, status
    JOBS_FINISHED.labels(template=template, status=status).inc()
    if job.completed_at is not None:
        JOB_DURATION.labels(template=template, status=status).observe(
            _seconds_between(job.created_at, job.completed_at))


def _seconds_between(start: datetime, end: datetime) -> float:
    return max((end - start).total_seconds(), 0.0)


@asynccontextmanager
async def serving_worker_metrics(address: str | None) -> AsyncIterator[None]:
    """WORKER_REGISTRY served at `address` (host:port) for the block; nothing when `address` is None."""
    if address is None:
        yield
        return
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host, registry=WORKER_REGISTRY)
    try:
        yield
    finally:
        await asyncio.to_thread(server.shutdown)  # waits out the server's poll, up to half a second
        server.server_close()
        thread.join()
