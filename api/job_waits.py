"""Requests that wait for a job to end (`POST /jobs?wait=`, `GET /jobs/{id}?wait=`).

Nothing is polled: a job's end is its workflow's close, and Temporal itself holds the request for it (the
history long poll of `WorkflowHandle.result`, which returns when the close event is written). One long poll
per job and API process, however many requests wait on that job: each request waits on the shared poll with
its own deadline, and when the last one leaves (its wait ran out, its client went away) the poll is
cancelled, so nothing is left running for a job nobody waits on (unlike api.shared_answers, whose shared
call runs on when its callers leave: a read ends soon, a long poll does not). What the job then is, is read through the
JobReader, as `GET /jobs/{id}` reads it: the close only says when to read.

`API_MAX_CONCURRENT_WAITS` bounds the requests waiting at once: each holds a place, taken before anything
else is done (at `POST /jobs`, before the job is created), and refused with 503 TOO_MANY_WAITS when none is
free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError
from app.errors import ErrorCode
from app.metrics import JOB_WAIT_POLLS, JOB_WAIT_POLLS_OPEN, JOB_WAITS

log = logging.getLogger(__name__)


@dataclass
class _Poll:
    task: asyncio.Task[None]
    waiters: int = 0


@dataclass
class JobWaits:
    max_waiting: int
    waiting: int = 0
    _polls: dict[str, _Poll] = field(default_factory=dict)

    @contextmanager
    def place(self) -> Iterator[None]:
        """A place among the requests that wait, for as long as the request waits and answers."""
        if self.waiting >= self.max_waiting:
            raise ApiError(
                ErrorCode.TOO_MANY_WAITS,
                f"{self.max_waiting} requests are waiting for jobs already; try again shortly, or without wait",
                {"limit": self.max_waiting}, headers={"Retry-After": "1"},
            )
        self.waiting += 1
        JOB_WAITS.inc()
        try:
            yield
        finally:
            self.waiting -= 1
            JOB_WAITS.dec()

    async def until_closed(self, client: Client, job_id: str, seconds: float, abandon: asyncio.Future[Any]) -> bool:
        """Whether the job's workflow closed within `seconds`; waiting stops early, with False, when `abandon`
        is done (the client went away). A workflow Temporal cannot be asked about ends the wait at once: the
        caller reads the job and answers with what it is."""
        poll = self._polls.get(job_id)
        if poll is None:
            task = asyncio.create_task(self._closed(client, job_id))
            # Its failure reaches the waiters; with none left to hear it, it must not be reported as unheard.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            poll = self._polls[job_id] = _Poll(task)
        poll.waiters += 1
        try:
            done, _ = await asyncio.wait(
                {poll.task, abandon}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            return poll.task in done and not poll.task.cancelled() and poll.task.exception() is None
        finally:
            poll.waiters -= 1
            if poll.waiters == 0:
                poll.task.cancel()  # nobody waits on this job any more: its long poll goes
                if self._polls.get(job_id) is poll:
                    del self._polls[job_id]

    async def _closed(self, client: Client, job_id: str) -> None:
        """Returns when the job's workflow has closed, however it ended."""
        JOB_WAIT_POLLS.inc()
        JOB_WAIT_POLLS_OPEN.inc()
        try:
            with suppress(WorkflowFailureError):  # failed, cancelled, terminated, timed out: closed all the same
                await client.get_workflow_handle(job_id).result()
        except RPCError as error:
            if error.status is not RPCStatusCode.NOT_FOUND:  # no workflow: nothing to wait for, the row says all
                log.warning("could not wait for job %s to end: %s", job_id, error)
                raise
        finally:
            JOB_WAIT_POLLS_OPEN.dec()
            # A request that comes after the close gets its own poll, which answers at once.
            if (poll := self._polls.get(job_id)) is not None and poll.task is asyncio.current_task():
                del self._polls[job_id]
