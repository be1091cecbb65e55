"""What `/health` and `/ready` answer, found out in the background about once a second rather than per
request: no burst of requests can multiply the calls to ComfyUI and Temporal, wedge the API's connection pool,
or make a healthy ComfyUI look down.

`/health`: does each ComfyUI answer, does Temporal; for `/metrics`, how long each ComfyUI's queue is and how much
of its devices' memory is used. `/ready`: does a worker poll the job queue and each ComfyUI's queue, so that a job
can run; a gateway that has just started answers `/health` before its worker polls. Temporal lists a queue's recent
pollers with the time each last polled. An idle worker polls again at least once a minute (a long poll ends after
about a minute), so a poller seen within the last 90 s is a live one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from api.temporal_connection import TemporalConnection
from app.comfy.backends import Backend
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.comfy.system_stats import DeviceMemory, device_memory

log = logging.getLogger(__name__)

PROBE_EVERY_SECONDS = 1.0
# A round (one a second) probes at most this many backends, the next ones in turn: a backend's probe is two
# requests and their answers' parse, and a fleet of 16 probed every second took a fifth of the API's event loop
# while a thousand jobs ran (bench/long_jobs.py). So a larger fleet's backend is probed every
# len(backends) / BACKENDS_PER_ROUND seconds (16: every 4 s). Placement does not wait on these: each backend's
# worker probes it every second (app.comfy.prober).
BACKENDS_PER_ROUND = 4
_LIVE_POLLER = timedelta(seconds=90)
_PROBE_TIMEOUT = timedelta(seconds=2)


@dataclass(frozen=True)
class ProbeResult:
    comfyui: dict[str, bool]  # backend id → answers
    temporal: bool
    workers: dict[str, bool]  # task queue → a worker polls it
    checked_at: datetime

    @property
    def healthy(self) -> bool:
        """Temporal answers and a ComfyUI does: jobs can run (one backend down of several is reported, not fatal)."""
        return self.temporal and any(self.comfyui.values())

    @property
    def ready(self) -> bool:
        return self.temporal and bool(self.workers) and all(self.workers.values())


async def workers_poll(
    client: Client, task_queue: str, queue_type: TaskQueueType.ValueType, host: str | None = None
) -> bool:
    """A live poller of the queue; with `host`, one of that host's. The SDK names each poller pid@hostname."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
                                 task_queue_type=queue_type),
        timeout=_PROBE_TIMEOUT,
    )
    now = datetime.now(timezone.utc)
    return any(now - poller.last_access_time.ToDatetime(tzinfo=timezone.utc) < _LIVE_POLLER
               and (host is None or poller.identity.endswith(f"@{host}"))
               for poller in response.pollers)


async def worker_polls_here(client: Client, task_queue: str) -> bool:
    """A worker of this host polls the job queue: a container's hostname is its own, so another container's
    worker does not count (the worker container's health check, `comfyui-gateway health --worker`)."""
    return await workers_poll(client, task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, host=socket.gethostname())


@dataclass(frozen=True)
class BackendReading:
    queue_remaining: int | None  # its prompts, running and pending; None when GET /prompt did not say
    devices: list[DeviceMemory]


@dataclass
class Probes:
    backends: list[Backend]
    queues: dict[str, TaskQueueType.ValueType]
    temporal: TemporalConnection
    http: httpx.AsyncClient  # its own, with the probe's timeout: a probe is never cut short from outside
    latest: ProbeResult | None = field(default=None)
    # backend id → why its last failed probe failed (kept after it answers again, for GET /backends).
    last_errors: dict[str, str] = field(default_factory=dict)
    # backend id → what its last probe read of it (for GET /metrics); none for a backend that did not answer.
    readings: dict[str, BackendReading] = field(default_factory=dict)
    # Where the next round's turn of backends begins.
    _next_backend: int = field(default=0, init=False)

    async def refresh(self, spread_seconds: float = 0.0, backends: list[Backend] | None = None) -> ProbeResult:
        """Probe Temporal, its workers and BACKENDS (by default all) once; the others' answers are their last.
        With `spread_seconds`, the backends' probes start one after another over that time rather than all at
        once: 16 backends' probes at once, two requests each, held the API's event loop for tens of milliseconds
        each second, and every read that came meanwhile waited (bench/long_jobs.py)."""
        probed = self.backends if backends is None else backends
        step = spread_seconds / len(probed) if probed else 0.0
        comfyui, temporal, workers = await asyncio.gather(
            asyncio.gather(*(self._comfyui_answers(backend, after=index * step)
                             for index, backend in enumerate(probed))),
            self._temporal_answers(), self._workers_poll(),
        )
        answers = {backend.id: answered for backend, answered in zip(probed, comfyui)}
        before = self.latest.comfyui if self.latest is not None else {}
        self.latest = ProbeResult(
            comfyui={backend.id: answers.get(backend.id, before.get(backend.id, False)) for backend in self.backends},
            temporal=temporal, workers=workers, checked_at=datetime.now(timezone.utc),
        )
        return self.latest

    def _turn(self) -> list[Backend]:
        """The next BACKENDS_PER_ROUND backends, in turn (all of them, for a fleet no larger)."""
        if len(self.backends) <= BACKENDS_PER_ROUND:
            return self.backends
        turn = [self.backends[(self._next_backend + index) % len(self.backends)]
                for index in range(BACKENDS_PER_ROUND)]
        self._next_backend = (self._next_backend + BACKENDS_PER_ROUND) % len(self.backends)
        return turn

    def answering_backend(self) -> Backend:
        """A backend that answered the last probe (the first listed, when none did): for what any ComfyUI of the
        fleet can tell (node types, models)."""
        answers = self.latest.comfyui if self.latest is not None else {}
        return next((backend for backend in self.backends if answers.get(backend.id)), self.backends[0])

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.refresh(spread_seconds=PROBE_EVERY_SECONDS, backends=self._turn())
            except Exception:  # a fault of the probe's own must not leave /health frozen at its last answer
                log.exception("health probe failed")
            # A round takes about a period, the spread included.
            await asyncio.sleep(max(PROBE_EVERY_SECONDS - (time.monotonic() - began), PROBE_EVERY_SECONDS / 10))

    async def _comfyui_answers(self, backend: Backend, after: float = 0.0) -> bool:
        if after:
            await asyncio.sleep(after)
        client = ComfyClient(backend.url, self.http)
        try:
            stats = await client.system_stats()
        except ComfyError as error:
            # ComfyClient's messages name the URL: without its credentials here.
            self.last_errors[backend.id] = error.message
            self.readings.pop(backend.id, None)
            return False
        try:
            queue: int | None = await client.queue_remaining()
        except ComfyError:
            queue = None  # it answers, which is what /health asks; only the metric goes without
        self.readings[backend.id] = BackendReading(queue_remaining=queue, devices=device_memory(stats))
        return True

    async def _temporal_answers(self) -> bool:
        client = self.temporal.client
        if client is None:
            return False
        try:
            return await client.service_client.check_health(timeout=_PROBE_TIMEOUT)
        except Exception:  # any failure to answer is "not reachable", which is what the probe reports
            return False

    async def _workers_poll(self) -> dict[str, bool]:
        client = self.temporal.client
        if client is None:
            return {}
        try:
            polled = await asyncio.gather(*(workers_poll(client, queue, kind) for queue, kind in self.queues.items()))
        except RPCError:
            return {}
        return dict(zip(self.queues, polled))
