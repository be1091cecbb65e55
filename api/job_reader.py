"""Where a job's truth is, and the one way the API reads a job.

A finished job's truth is its row, which its workflow writes before it completes: it is read first, so a
finished job never shows as live. A live job's truth is its workflow: the `status` query's answer, with the
live progress of the activity it is waiting on (its last heartbeat, through describe). A query answer is
true when it is given; nothing is inferred from a race between two calls. A workflow that has closed is
read from its row or, if the row does not show the end yet, from the workflow itself (a query of a closed
workflow replays it to its end). That holds for a workflow that ended as Canceled too (the API cancels a job
through Temporal): it recorded the job as `cancelled`, with who and why, before it ended; its Temporal status
alone is never taken for the job's. Only a workflow Temporal itself terminated or timed out ends a job as
`cancelled`/JOB_TERMINATED; the worker's reconciler writes that end into the row.

A live job whose row is current needs no query: the workflow writes its row (a local activity) in the
workflow task that also upserts its `JobStatus` and `Backend` search attributes, and describe returns those
from the workflow's own state, not from visibility. When the described status and backend are the row's, the
row holds the state the workflow last recorded, and that state is what the read shows (with live progress from
the heartbeat, as always); when they differ (the workflow has moved on and its record is under way, or it is a
job from before its search attributes were kept), the workflow's `status` query answers. A status, final or
not, is only ever one the workflow wrote; and a workflow describe shows closed is read as a closed one is.
So a running job's read costs Temporal one describe and the worker nothing: with a thousand jobs running,
reads no longer queue behind the worker's event loop, which is busy following their prompts.

Once describe has found a live job's row current, the row alone is the job for CURRENT_ROW_SECONDS after (for up to
as long again while the describe that renews it is under way, late), as long as it still says the same status,
backend and attempt (`CurrentRows`): each read reads the row anew, so every
status the workflow records since shows at once, and a final one is the row's, as always; the live progress is
the row's live columns (written about once a second, from what the heartbeat says). What the row cannot show
in that time is what describe would catch: the workflow moving on while its record is under way (a moment, then
the row says it), and a workflow that Temporal itself terminated or timed out, until the reconciler closes its
row (within seconds) or the time runs out. So such a read may be a moment stale, and is never a guess: its
status is one the workflow wrote. A read that must see the workflow as it is now (`reuse_live=False`) describes
it with a describe begun then: not one already under way, which began before what the reader must see (its
cancel, a workflow's end), and no describe begun before it vouches for the row afterwards.
A read in the second half of that time has one describe made in the background, which vouches for the row anew,
or not (then the next read describes): a job read often is described about every 15 s, never on a reader's time.
With a thousand jobs running, 20 clients reading them made a describe each (Temporal at most of a core).
So does a job's first read, of a row never described (since the API started): it is the row, at once, and what
it cannot show is what a vouched read cannot show either; a row that describe then finds not current is described
on the next read's time.

Queries run on the worker, beside the jobs themselves, so a live job's snapshot is shared by the reads that
come while it is being made, and reused for a moment: however many clients poll, however often, each live job
costs Temporal at most a few describes and the worker a few queries a second.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError, RPCStatusCode

from api.database import Database
from api.errors import ApiError
from api.http_server import turn_aside
from api.shared_answers import SharedAnswers
from api.temporal_connection import TemporalConnection
from app.errors import ErrorCode
from app.jobstore import JobSnapshot, get_job_snapshot
from app.models import JobState, JobStatus, LiveProgress, PromptProgress, StepHeartbeat, accepted_state
from app.search_attributes import BACKEND, JOB_STATUS
from app.temporal_endings import ended_by_temporal, started_input, terminated_error, termination_reason
from workflows_temporal.generation import GenerationWorkflow

LIVE_VIEW_SECONDS = 0.25
CURRENT_ROW_SECONDS = 30.0
# Background describes at once (`CurrentRows.describe_if_due`): a thousand jobs first read within seconds are all
# due again together; unbounded, their describes flooded Temporal, and were still under way when the rows'
# vouches ran out, so reads then waited seconds on them (bench/long_jobs.py: p99 2.6 s, 30 s into its window).
BACKGROUND_DESCRIBES = 8
_CURRENT_ROWS_CAPACITY = 100_000
_NOT_CURRENT_KEPT_SECONDS = 60.0
_PROMPT_ACTIVITY = "run_prompt"
# A worker answers a query in milliseconds; with no worker polling, Temporal would hold one for 30 s.
_QUERY_TIMEOUT = timedelta(seconds=2)
# Only a job's workflow is a job: a batch's id (a UUID too) must read as no job, not fail as one.
_JOB_WORKFLOW_TYPE = "GenerationWorkflow"
_PROMPT_ACTIVITY = "run_prompt"
_QUERY_FAILURES = (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError)

# Live jobs as recently read, by job id: concurrent reads of one job share one describe and one query.
LiveViews = SharedAnswers[JobSnapshot]


def live_views() -> LiveViews:
    return LiveViews(reuse_seconds=LIVE_VIEW_SECONDS)


@dataclass
class CurrentRows:
    """Live jobs whose rows describe found current, each with what its row said then and until when that
    vouches for the row: a row that says something else (another status, backend or attempt) is described again."""

    vouch_seconds: float = CURRENT_ROW_SECONDS
    # job id → (vouched for until, what describe found the row saying, when that describe began). A row found not
    # current, or forgotten, stays as (0, None, when): a describe that began before then vouches for nothing.
    _rows: dict[str, tuple[float, tuple[JobStatus, str | None, int] | None, float]] = field(default_factory=dict)
    _renewals: dict[str, asyncio.Task[object]] = field(default_factory=dict)
    _describing: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(BACKGROUND_DESCRIBES))

    def vouch(self, state: JobState) -> bool:
        found = self._rows.get(state.job_id)
        return found is not None and found[1] == _what_describe_checks(state) and found[0] > time.monotonic()

    def may_answer(self, state: JobState) -> bool:
        """Whether the row may answer a read: vouched for, or never described (its first read, while a describe
        in the background says whether it is current), or its vouch ran out less than a vouch's time ago with the
        describe that renews it under way (waiting its turn, or for Temporal): the read is what that describe is
        about to vouch for, or not, and the row says what the workflow last recorded, as before."""
        found = self._rows.get(state.job_id)
        if found is None or self.vouch(state):
            return True
        return (state.job_id in self._renewals and found[1] == _what_describe_checks(state)
                and found[0] + self.vouch_seconds > time.monotonic())

    def describe_if_due(self, job_id: str, describe: Callable[[], Awaitable[object]]) -> None:
        """A row read is answered while one describe, in the background, vouches for it (or not): for a row
        never described, and past half of a vouch's time. A job read often is not described on a reader's time."""
        found = self._rows.get(job_id)
        due = found is None or (found[1] is not None and found[0] - time.monotonic() <= self.vouch_seconds / 2)
        if not due or job_id in self._renewals:
            return

        scheduled = time.monotonic()

        async def in_turn() -> object:
            # A read that cannot wait for its turn (its row's vouch ran out) describes by itself meanwhile.
            async with self._describing:
                said = self._rows.get(job_id)
                if said is not None and said[2] > scheduled:
                    return None  # a describe begun since has said what this one would, of a row as read later
                return await describe()

        renewal = asyncio.create_task(in_turn())
        self._renewals[job_id] = renewal

        def renewed(done: asyncio.Task[object]) -> None:
            self._renewals.pop(job_id, None)
            if not done.cancelled() and done.exception() is not None:
                self.forget(job_id)  # Temporal could not say: the next read describes on its own time

        renewal.add_done_callback(renewed)

    def found_current(self, state: JobState, began: float) -> None:
        """Describe, begun at `began`, found the row current."""
        self._said(state.job_id, (time.monotonic() + self.vouch_seconds, _what_describe_checks(state), began))

    def forget(self, job_id: str, began: float | None = None) -> None:
        """No vouching for the row from now, or from when the describe that found it not current began: not by
        a describe that began before either, whose answer may come later."""
        self._said(job_id, (0.0, None, time.monotonic() if began is None else began))

    def _said(self, job_id: str, found: tuple[float, tuple[JobStatus, str | None, int] | None, float]) -> None:
        """What a describe (or a forget) said, unless one that began later has said otherwise."""
        known = self._rows.get(job_id)
        if known is not None and known[2] > found[2]:
            return
        if len(self._rows) >= _CURRENT_ROWS_CAPACITY:
            # Kept: vouches still running, and for a while what a describe found not current (dropped, such a
            # row would read as never described, and be answered again).
            now = time.monotonic()
            self._rows = {key: entry for key, entry in self._rows.items()
                          if entry[0] > now or entry[2] > now - _NOT_CURRENT_KEPT_SECONDS}
        self._rows[job_id] = found


def _what_describe_checks(state: JobState) -> tuple[JobStatus, str | None, int]:
    return state.status, state.backend, state.attempts


def job_not_found(job_id: str) -> ApiError:
    return ApiError(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id}", {"jobId": job_id})


def _temporal_unavailable() -> ApiError:
    return ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal could not answer for this job")


def _is_job_id(job_id: str) -> bool:
    """A job id is a UUID as the gateway writes one: lower-case, with hyphens. uuid.UUID also reads braces,
    `urn:uuid:` and upper case, which name no job; such an id is a 404 like any other unknown one."""
    try:
        return str(uuid.UUID(job_id)) == job_id
    except ValueError:
        return False


@dataclass(frozen=True)
class JobReader:
    db: Database
    temporal: TemporalConnection
    live_views: LiveViews
    current_rows: CurrentRows

    async def read(self, job_id: str, *, reuse_live: bool = True) -> JobSnapshot:
        """The job as it is now; with `reuse_live`, a live job's snapshot may be up to LIVE_VIEW_SECONDS old.
        A finished job is one database read."""
        if not _is_job_id(job_id):
            raise job_not_found(job_id)
        recorded = await self.db.run(get_job_snapshot, job_id)
        if recorded is not None and recorded.state.status.is_terminal:
            return recorded
        client = self.temporal.client
        if client is None:
            if recorded is not None:
                return recorded  # the projection, while the API waits for Temporal
            raise _temporal_unavailable()
        if not reuse_live:
            self.current_rows.forget(job_id)
        elif recorded is not None and self.current_rows.may_answer(recorded.state):
            self.current_rows.describe_if_due(
                job_id, lambda: self.live_views.get(job_id, lambda: self._from_temporal(client, job_id, recorded)))
            return recorded
        async with turn_aside():  # mostly a wait for Temporal's answers
            return await self.live_views.get(job_id, lambda: self._from_temporal(client, job_id, recorded),
                                             fresh=not reuse_live)

    async def _from_temporal(self, client: Client, job_id: str, recorded: JobSnapshot | None) -> JobSnapshot:
        began = time.monotonic()
        handle = client.get_workflow_handle(job_id)
        try:
            description = await handle.describe()
        except RPCError as error:
            if recorded is not None:
                return recorded  # the projection, when Temporal cannot answer for the workflow right now
            if error.status is RPCStatusCode.NOT_FOUND:
                raise job_not_found(job_id) from error
            raise _temporal_unavailable() from error
        if description.workflow_type != _JOB_WORKFLOW_TYPE:
            raise job_not_found(job_id)  # another kind of workflow under this id: a batch's, say
        if description.status is not WorkflowExecutionStatus.RUNNING:
            self.current_rows.forget(job_id, began)
            return await self._closed(client, handle, description)
        if recorded is not None and _row_is_current(recorded.state, description):
            state = recorded.state
            self.current_rows.found_current(state, began)
        else:
            self.current_rows.forget(job_id, began)
            state = await self._query(client, handle, recorded)
        if state.status.is_terminal:
            return JobSnapshot(state, LiveProgress())
        return JobSnapshot(state, await _live_progress(client, description, recorded))

    async def _query(
        self, client: Client, handle: WorkflowHandle, recorded: JobSnapshot | None, *, live: bool = True
    ) -> JobState:
        """The workflow's own answer. When it cannot give one (no worker polls, say), a live workflow is shown
        by its row, else as it was started; a closed one must answer, or nothing is said of it."""
        try:
            return await handle.query(GenerationWorkflow.status, rpc_timeout=_QUERY_TIMEOUT)
        except _QUERY_FAILURES as error:
            if not live:
                raise _temporal_unavailable() from error
            if recorded is not None:
                return recorded.state
            try:
                return await _accepted(client, handle)
            except RPCError:
                raise _temporal_unavailable() from error

    async def _closed(
        self, client: Client, handle: WorkflowHandle, description: WorkflowExecutionDescription
    ) -> JobSnapshot:
        """A workflow that has closed, perhaps a moment ago: its row has its end, unless Temporal ended it."""
        recorded = await self.db.run(get_job_snapshot, handle.id)
        if recorded is not None and recorded.state.status.is_terminal:
            return recorded
        if not ended_by_temporal(description.status):
            # It wrote its end and closed between two reads: a query replays the closed workflow to its end.
            return JobSnapshot(await self._query(client, handle, recorded, live=False), LiveProgress())
        assert description.status is not None
        state = recorded.state if recorded is not None else await self._query(client, handle, None)
        try:
            reason = await termination_reason(client, handle.id, description.run_id)
        except RPCError:
            reason = ""  # the end is known; only the operator's words could not be read just now
        ended = state.model_copy(update={
            "status": JobStatus.cancelled,
            "error": terminated_error(description.status, reason),
            "completed_at": description.close_time or datetime.now(timezone.utc),
        })
        return JobSnapshot(ended, recorded.live if recorded is not None else LiveProgress())


def _row_is_current(state: JobState, description: WorkflowExecutionDescription) -> bool:
    """Whether the running workflow's search attributes, which it upserts in the workflow task that writes its
    row, say what its row says: its status, and the backend its prompt is on (absent when on none)."""
    attributes = description.typed_search_attributes
    # Only while the job waits on its prompt: once ComfyUI is done the workflow counts it running (collecting its
    # outputs) without a record, and a prompt that ended within moments never recorded `running`.
    on_prompt = all(pending.activity_type.name == _PROMPT_ACTIVITY
                    for pending in description.raw_description.pending_activities)
    return (on_prompt and attributes.get(JOB_STATUS) == state.status.value and not state.status.is_terminal
            and attributes.get(BACKEND) == state.backend)


async def _accepted(client: Client, handle: WorkflowHandle) -> JobState:
    """The job as its workflow was started with it, from the first event of its history."""
    return accepted_state(await started_input(client, handle))


async def _live_progress(
    client: Client, description: WorkflowExecutionDescription, recorded: JobSnapshot | None
) -> LiveProgress:
    """Progress is not in workflow history tick by tick: it is the last heartbeat of the prompt's activity,
    while it runs; otherwise (staging images, storing outputs) the row's, with the warning of the activity the
    job waits on."""
    live = recorded.live.model_copy() if recorded is not None else LiveProgress()
    for pending in description.raw_description.pending_activities:
        if not pending.heartbeat_details.payloads:
            continue
        [details] = await client.data_converter.decode(pending.heartbeat_details.payloads)
        if not isinstance(details, dict):
            continue  # a heartbeat of an older release (a bare count)
        if pending.activity_type.name == _PROMPT_ACTIVITY:
            live = PromptProgress.model_validate(details).live()
        elif (warning := StepHeartbeat.model_validate(details).warning) is not None:
            live.warning = warning
    return live
