"""Whether the gateway can run a job now: Temporal answers, and a worker polls the job queue and each
ComfyUI's queue. A gateway that has just started answers `/health` before its worker polls; `/ready` waits
for the worker, so a first job never waits for nothing visible.

Temporal lists a queue's recent pollers with the time each last polled. An idle worker polls again at least
once a minute (a long poll ends after about a minute), so a poller seen within the last 90 s is a live one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

_LIVE_POLLER = timedelta(seconds=90)
# A burst of probes costs Temporal one describe per queue a second.
_REUSE_SECONDS = 1.0


async def workers_poll(client: Client, task_queue: str, queue_type: TaskQueueType.ValueType) -> bool:
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
                                 task_queue_type=queue_type),
        timeout=timedelta(seconds=2),
    )
    now = datetime.now(timezone.utc)
    return any(now - poller.last_access_time.ToDatetime(tzinfo=timezone.utc) < _LIVE_POLLER
               for poller in response.pollers)


@dataclass
class Readiness:
    """The last answer, reused for a second."""

    queues: dict[str, TaskQueueType.ValueType]
    _answer: dict[str, bool] | None = None
    _answered_at: float = field(default=float("-inf"))
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def check(self, client: Client | None) -> dict[str, bool]:
        """queue name → whether a worker polls it; empty when Temporal cannot be asked."""
        async with self._lock:
            if self._answer is not None and time.monotonic() - self._answered_at < _REUSE_SECONDS:
                return self._answer
            answer: dict[str, bool] = {}
            if client is not None:
                try:
                    answer = dict(zip(self.queues, await asyncio.gather(
                        *(workers_poll(client, queue, kind) for queue, kind in self.queues.items())
                    )))
                except RPCError:
                    answer = {}
            self._answer, self._answered_at = answer, time.monotonic()
            return answer
