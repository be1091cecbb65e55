"""GenerationWorkflow: one generation job, from its template to stored outputs. Workflow id = job id.

Deterministic: no I/O, clock or randomness here; everything that touches the world is an activity.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from datetime import datetime, timedelta, timezone
from typing import Any

from temporalio import workflow
from temporalio.common import Priority, RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError, is_cancelled_exception
from temporalio.exceptions import TimeoutError as TemporalTimeoutError
from temporalio.exceptions import TimeoutType

with workflow.unsafe.imports_passed_through():
    from activities.comfy import ComfyActivities
    from activities.inputs import InputActivities
    from activities.records import RecordActivities
    from activities.render import RenderActivities
    from app.comfy.backends import own_task_queue, placement_queue
    from app.comfy.errors import STARTED_AT_MS_DETAIL
    from app.errors import ELAPSED_SECONDS_DETAIL, NON_RETRYABLE_TYPES, PROMPT_ON_OTHER_BACKEND, ErrorCode
    from app.models import (
        CachedResult,
        CancelPromptInput,
        CancelRequest,
        CollectOutputsInput,
        GenerationInput,
        JobError,
        JobEventInput,
        JobState,
        JobStatus,
        MAX_JOB_TIMEOUT_SECONDS,
        OutputCollection,
        PROMPT_STARTED_SIGNAL,
        ProgressWebhook,
        PromptStarted,
        RecordJobInput,
        RenderPromptInput,
        RunPromptInput,
        RunPromptResult,
        StageImagesInput,
        WebhookDeliveryInput,
        accepted_state,
        prompt_id_for,
    )
    from app.redaction import Redactor, free_texts
    from app.search_attributes import BACKEND, BATCH_ID, JOB_STATUS, OWNER, PRIORITY, TEMPLATE_ID
    from app.webhooks.events import PROGRESS_EVENT
    from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow, webhook_workflow_id

# Jobs started before the workflow wrote search attributes replay without them.
SEARCH_ATTRIBUTES_PATCH = "job-search-attributes"
# Jobs started before the workflow indexed its owner replay without the Owner attribute.
OWNER_PATCH = "job-owner"
# A job with a callbackUrl starts a WebhookDeliveryWorkflow as it ends (jobs before never had one).
WEBHOOKS_PATCH = "webhooks"
# A job that carries the prompt the API rendered runs it without the render_prompt local activity. Behind a
# patch: a job that carries one but whose first task ran on a worker from before rendered it, and replays so.
API_RENDERED_PROMPT_PATCH = "api-rendered-prompt"
# A job's prompt is placed on whichever backend frees a slot first (its shared or tag queue), runs again elsewhere
# when its backend is lost, and its images are staged there; jobs before name one backend and its queue.
FLEET_PATCH = "fleet"
# The Web UI as an operator console: the job's Backend (kept current as it is placed), Priority and BatchId are
# indexed too; a cancel signal followed by Temporal's cancellation (the API's cancel) ends the workflow as Canceled;
# and a cancellation through Temporal alone (Web UI, CLI) gives its reason to the job. Jobs before index only status,
# template and owner, complete when cancelled by signal, and name no reason of Temporal's.
CONSOLE_PATCH = "operator-console"
# run_prompt stores the prompt's outputs itself, in the slot that ran it, and collect_outputs runs only when it
# could not; jobs before always ran collect_outputs after it.
COLLECT_IN_PROMPT_PATCH = "collect-in-prompt"

# In a run an operator's reset started, each attempt it schedules records this marker (with the attempt's
# number): replayed there later, the attempt is known to be its own, not one of the run it replaced.
RESET_RUN_PROMPT_MARKER = "reset-run-prompt"

# A prompt ComfyUI lost (it restarted), or a backend lost with the prompt on it, is resubmitted this many
# times (each) before the job fails.
MAX_LOST_PROMPT_RESUBMITS = 3

# Which failures are retried is the error table's (app.errors); these only say how often and how long.
_TRANSIENT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=NON_RETRYABLE_TYPES,
)
_CLEANUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE_TYPES
)
# Storing outputs: trouble is retried, but a store that keeps failing fails the job. Bounded by tries, not
# time, so that time the gateway is down (no try runs then) is not spent on it.
_STORAGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=10,
    non_retryable_error_types=NON_RETRYABLE_TYPES,
)
# Fetching an image input: an image host that keeps failing must not hold the job forever.
_IMAGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE_TYPES,
)


# A step that ran out of Temporal's time: what ran out, in the terms of the step.
_TIMED_OUT = {
    "run_prompt": (ErrorCode.COMFYUI_TIMEOUT, "the job ran past its time limit"),
    "collect_outputs": (ErrorCode.STORAGE_ERROR, "storing the outputs did not finish in time"),
    "stage_images": (ErrorCode.IMAGE_FETCH_FAILED, "staging the image inputs did not finish in time"),
}


def _failure_details(cause: ApplicationError) -> dict[str, Any]:
    return cause.details[0] if cause.details and isinstance(cause.details[0], dict) else {}


def attempt_started_at(failure: ActivityError) -> datetime | None:
    """When ComfyUI started the prompt of an attempt that failed, if it got that far and said so."""
    cause = failure.cause
    started_ms = _failure_details(cause).get(STARTED_AT_MS_DETAIL) if isinstance(cause, ApplicationError) else None
    if isinstance(started_ms, bool) or not isinstance(started_ms, int | float):
        return None
    return datetime.fromtimestamp(started_ms / 1000, tz=timezone.utc)


def _never_started(failure: ActivityError) -> bool:
    """No worker took the activity's task before its schedule_to_start_timeout."""
    cause = failure.cause
    return isinstance(cause, TemporalTimeoutError) and cause.type is TimeoutType.SCHEDULE_TO_START


def job_error_from(failure: BaseException) -> JobError:
    """An activity failure → the job's public error, keeping the activity's classification."""
    cause = failure.cause if isinstance(failure, ActivityError) else failure
    if isinstance(cause, ApplicationError) and cause.type in ErrorCode.__members__:
        details = {key: value for key, value in _failure_details(cause).items() if key != STARTED_AT_MS_DETAIL}
        return JobError(code=ErrorCode(cause.type), message=cause.message, details=details)
    if isinstance(cause, TemporalTimeoutError):
        step = failure.activity_type if isinstance(failure, ActivityError) else ""
        code, message = _TIMED_OUT.get(step, (ErrorCode.INTERNAL_ERROR, f"the job's step {step} did not finish in time"))
        return JobError(code=code, message=message)
    return JobError(code=ErrorCode.INTERNAL_ERROR, message=str(cause or failure))


@workflow.defn(name="GenerationWorkflow")
class GenerationWorkflow:
    def __init__(self) -> None:
        self._job: GenerationInput | None = None
        self._state: JobState | None = None
        self._cancel: CancelRequest | None = None
        self._work: asyncio.Task[None] | None = None
        self._prompt_id: str | None = None
        self._fleet = False
        # The backend that has (or may have) the current attempt's prompt, on the fleet's path.
        self._prompt_backend: str | None = None
        self._event_seq = 0
        self._pending_events: list[JobEventInput] = []
        # Records are written one at a time, each with the latest snapshot, so the row never goes back.
        self._record_lock = asyncio.Lock()
        self._indexed = False
        self._owner_indexed = False
        self._indexed_status: JobStatus | None = None
        self._console = False
        self._indexed_backend: str | None = None
        self._webhook_started = False
        self._redactor = Redactor([])

    @workflow.run
    async def run(self, job: GenerationInput) -> JobState:
        self._job = job
        # PRIVACY_MODE: what the job records (row, log, webhooks, failure) never quotes its free-text inputs.
        self._redactor = Redactor(self._free_texts())
        self._indexed = workflow.patched(SEARCH_ATTRIBUTES_PATCH)
        self._fleet = job.cached_result is None and workflow.patched(FLEET_PATCH)
        self._owner_indexed = job.owner is not None and workflow.patched(OWNER_PATCH)
        self._console = self._indexed and workflow.patched(CONSOLE_PATCH)
        self._state = accepted_state(job)
        if job.cached_result is not None:
            self._event("status", "job accepted; an identical earlier job's result answers it", {"status": "queued"})
            self._work = asyncio.create_task(self._reuse(job.cached_result))
        else:
            self._event("status", "job accepted; waiting for a ComfyUI slot", {"status": "queued"})
            self._work = asyncio.create_task(self._generate(job))
        if self._cancel is not None and self._stops_itself(self._cancel):
            self._work.cancel()
        try:
            await self._record()  # the queued row is written while the prompt renders
            await self._work
        except (asyncio.CancelledError, ActivityError, ApplicationError) as failure:
            if self._state.status.is_terminal:
                # The job had ended, its outputs stored, when a cancel from Temporal cut its last record short.
                await self._record()
                await self._start_webhook()
                return self._state
            # Stopped by a cancel signal that stops the job itself, or by Temporal's cancellation (the API's, which
            # follows its signal, or the Web UI's, the CLI's); a cancelled activity surfaces as an ActivityError
            # caused by CancelledError. A signal whose cancellation never came stops nothing: a real failure after
            # it is the job's failure.
            signalled = self._cancel is not None and self._stops_itself(self._cancel)
            if signalled or is_cancelled_exception(failure):
                if self._console:
                    await self._stop_work()
                await self._finish_cancelled()
                if not signalled or (self._console and workflow.cancellation_reason() is not None):
                    # Cancelled through Temporal (after the API's signal, or from the Web UI or the CLI): the
                    # workflow, its job recorded as cancelled, ends as Canceled.
                    raise
                return self._state
            error = self._redacted(job_error_from(failure))
            await self._finish(JobStatus.failed, error=error)
            raise ApplicationError(error.message, error.model_dump(mode="json"), type=error.code.value, non_retryable=True)
        return self._state

    @workflow.query
    def status(self) -> JobState:
        assert self._state is not None
        return self._state

    @workflow.signal
    def cancel(self, request: CancelRequest) -> None:
        # A signal that stopped the job keeps its who and why. One that waits for Temporal's cancellation gives way
        # to a later signal: a retried API cancel, a batch's cancel, or a cancel after an operator's reset re-applied
        # the API's signal but not its cancellation (the reset job runs again).
        stopping = self._cancel is not None and self._stops_itself(self._cancel)
        if stopping or (self._state is not None and self._state.status.is_terminal):
            return
        self._cancel = request
        # Before the workflow's run has begun, run() does this once it knows the job's patches.
        if self._work is not None and not self._work.done() and self._stops_itself(request):
            self._work.cancel()

    def _stops_itself(self, request: CancelRequest) -> bool:
        """Whether the cancel signal stops the job itself, or (sent by the API since the console patch) keeps only
        the who and why for the Temporal cancellation that follows it, which stops the job through the same path
        and ends the workflow as Canceled. A job whose Temporal cancellation never comes (the API stopped between
        its two calls) goes on: the API answered an error, and the client's retry cancels it.

        The same for jobs from before the console patch: were the signal to stop them, the cancellation that follows
        within moments would land in their recording of the end. No history holds such a signal before the patch
        (no API sent one), so this changes no replay."""
        return not request.temporal_cancel_follows

    async def _stop_work(self) -> None:
        """A Temporal cancellation that landed on run()'s own first record (sent before the workflow's first task,
        while no worker ran) did not reach the job's steps: stop them before the job's end is recorded, so that no
        prompt is scheduled alongside the workflow's end."""
        assert self._work is not None
        if not self._work.done():
            self._work.cancel()
        with suppress(asyncio.CancelledError, ActivityError, ApplicationError):
            await self._work

    @workflow.signal(name=PROMPT_STARTED_SIGNAL)
    async def prompt_started(self, started: PromptStarted) -> None:
        """Sent by run_prompt when ComfyUI starts executing; a retried activity may send it again."""
        state = self._state
        if state is None or state.status is not JobStatus.queued or started.attempt != state.attempts:
            return
        state.status = JobStatus.running
        state.started_at = state.started_at or workflow.now()
        if self._fleet and started.backend is not None:
            self._prompt_backend = state.backend = started.backend
        self._event("status", f"ComfyUI started executing prompt {started.prompt_id}", {"status": "running"})
        await self._record()

    # --- the job's steps -------------------------------------------------------------------------

    async def _generate(self, job: GenerationInput) -> None:
        rendered = job.rendered
        if rendered is None or not workflow.patched(API_RENDERED_PROMPT_PATCH):
            rendered = await workflow.execute_local_activity_method(
                RenderActivities.render_prompt,
                RenderPromptInput(
                    template_id=job.template_id,
                    template_version=job.template_version,
                    workflow_json=job.workflow_json,
                    inputs=job.inputs,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=5),
                retry_policy=_TRANSIENT_RETRY,
            )
        prompt = rendered.prompt
        if rendered.image_sources and not self._fleet:
            # Jobs from before the fleet stage on the main queue, so that downloads and uploads do not hold one of
            # the ComfyUI's slots. On the fleet's path run_prompt stages them itself, in its slot, once it is
            # placed: the images must go to the backend that runs the prompt, known only then.
            staged = await workflow.execute_activity_method(
                InputActivities.stage_images,
                StageImagesInput(
                    job_id=job.job_id, backend=job.backend, prompt=prompt, images=rendered.image_sources,
                    timeout_seconds=job.timeout_seconds, redacted_texts=self._free_texts(),
                ),
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=timedelta(seconds=90),
                retry_policy=_IMAGE_RETRY,
            )
            prompt = staged.prompt
        collect = (OutputCollection(output_format=job.output_format, output_quality=job.output_quality)
                   if workflow.patched(COLLECT_IN_PROMPT_PATCH) else None)
        result = await self._run_until_done(job, prompt, rendered.image_sources if self._fleet else {}, collect)
        assert self._state is not None
        if self._state.started_at is None and result.started_at_ms is not None:
            # A prompt that finished within moments never signalled `running`; ComfyUI says when it started.
            self._state.started_at = datetime.fromtimestamp(result.started_at_ms / 1000, tz=timezone.utc)
        if result.files is not None:
            self._state.outputs = result.files  # stored by run_prompt itself
        else:
            self._state.status = JobStatus.running  # ComfyUI is done; the gateway is collecting the outputs
            collected = await workflow.execute_activity_method(
                ComfyActivities.collect_outputs,
                CollectOutputsInput(
                    job_id=job.job_id, backend=result.backend or job.backend, outputs=result.outputs,
                    timeout_seconds=job.timeout_seconds, output_format=job.output_format,
                    output_quality=job.output_quality,
                ),
                start_to_close_timeout=timedelta(seconds=max(job.timeout_seconds, 300)),
                heartbeat_timeout=timedelta(seconds=120),
                retry_policy=_STORAGE_RETRY,
            )
            self._state.outputs = collected.files
        self._state.execution_time_ms = result.execution_time_ms
        await self._finish(JobStatus.succeeded)

    async def _reuse(self, cached: CachedResult) -> None:
        """A result cache hit: the job takes an earlier job's stored outputs as its own, and ComfyUI is not asked."""
        assert self._state is not None
        self._state.started_at = workflow.now()
        self._state.outputs = cached.outputs
        self._event("cache", f"result cache hit: the outputs of job {cached.source_job_id}, which ran the same "
                    "request; nothing ran on ComfyUI", {"cachedFrom": cached.source_job_id})
        await self._finish(JobStatus.succeeded)

    async def _run_until_done(
        self, job: GenerationInput, prompt: dict[str, Any], image_sources: dict[str, str],
        collect: OutputCollection | None,
    ) -> RunPromptResult:
        """Run the prompt on ComfyUI; resubmit when ComfyUI lost it (or, on the fleet's path, its backend was
        lost), and when the client's retry asks. On the fleet's path an attempt whose retry was polled by
        another backend goes back, the same attempt, to the backend that may have its prompt."""
        assert self._state is not None
        lost = backends_lost = 0
        pinned: str | None = None
        # Seconds the attempt's prompt had run by the time another backend's worker polled it: a re-attach
        # goes on counting from there, so the job's time limit holds across the hand-over.
        elapsed = 0.0
        while True:
            if pinned is None:
                self._state.attempts += 1
                # The new attempt's prompt is on no backend yet: until it says where, a cancel stops it on every
                # backend (one prefetched there is deleted), never on the backend of the attempt before.
                self._prompt_backend = None
                if self._fleet:
                    self._state.backend = None
                self._prompt_id = self._attempt_prompt_id(job.job_id, self._state.attempts)
                elapsed = 0.0
            attempt = self._state.attempts
            if attempt > 1 and pinned is None:
                self._state.status = JobStatus.queued  # the new attempt waits for a slot again
                await self._record()
            if self._fleet:
                main_queue = workflow.info().task_queue
                queue = own_task_queue(main_queue, pinned) if pinned else placement_queue(main_queue, job.backend_tag)
            else:
                queue = job.backend_task_queue
            try:
                result = await workflow.execute_activity_method(
                    ComfyActivities.run_prompt,
                    RunPromptInput(
                        job_id=job.job_id,
                        backend=None if self._fleet else job.backend,
                        attempt=attempt,
                        prompt_id=self._prompt_id,
                        prompt=prompt,
                        reattach=pinned is not None,
                        elapsed_seconds=elapsed,
                        image_sources=image_sources,
                        timeout_seconds=job.timeout_seconds,
                        progress_webhook=self._progress_webhook(job),
                        redacted_texts=self._free_texts(),
                        collect=collect,
                    ),
                    task_queue=queue,
                    start_to_close_timeout=self._prompt_activity_limit(job),
                    # A backend's own queue is always polled while its worker lives (app.comfy.slots): a
                    # re-attach nobody takes within the grace period found its backend gone (removed from
                    # COMFYUI_URLS, its worker dead), and must not wait for it forever.
                    schedule_to_start_timeout=timedelta(seconds=job.heartbeat_timeout_seconds) if pinned else None,
                    heartbeat_timeout=timedelta(seconds=job.heartbeat_timeout_seconds),
                    retry_policy=_TRANSIENT_RETRY,
                    # While prompts wait for a slot, Temporal hands out the highest priority first, and shares
                    # each priority between owners (app.queue_estimates counts the wait the same way).
                    priority=Priority(priority_key=job.priority, fairness_key=job.owner),
                )
                if self._fleet:
                    self._prompt_backend = self._state.backend = result.backend
                return result
            except ActivityError as failure:
                if is_cancelled_exception(failure):
                    raise
                was_pinned, pinned = pinned, self._elsewhere(failure)
                if pinned is not None:
                    self._prompt_backend = pinned
                    elapsed = self._elapsed_before(failure, elapsed)
                    self._event("placement", f"attempt {attempt}'s prompt may be on backend {pinned}; following it "
                                "there", {"attempt": attempt, "backend": pinned})
                    continue
                # A prompt that failed within moments never signalled `running`; ComfyUI says when it started.
                self._state.started_at = self._state.started_at or attempt_started_at(failure)
                error = job_error_from(failure)
                if was_pinned is not None and _never_started(failure):
                    error = JobError(
                        code=ErrorCode.BACKEND_LOST, details={"backend": was_pinned, "promptId": self._prompt_id},
                        message=f"no worker of backend {was_pinned} took attempt {attempt}'s prompt within "
                                f"{job.heartbeat_timeout_seconds:g} s")
                if error.code is ErrorCode.PROMPT_LOST and lost < MAX_LOST_PROMPT_RESUBMITS:
                    lost += 1
                    self._event("retry", f"ComfyUI lost prompt {self._prompt_id}; resubmitting", {"attempt": attempt})
                elif error.code is ErrorCode.BACKEND_LOST and backends_lost < MAX_LOST_PROMPT_RESUBMITS:
                    backends_lost += 1
                    self._event("retry", f"backend {error.details.get('backend')} stopped answering with prompt "
                                f"{self._prompt_id}; attempt {attempt + 1} runs on a healthy backend",
                                {"attempt": attempt, "error": error.model_dump(mode="json")})
                elif job.retry.allows(error.code, attempt):
                    self._event(
                        "retry",
                        f"attempt {attempt} failed with {error.code.value}; retrying in {job.retry.backoff_seconds:g} s",
                        {"attempt": attempt, "error": error.model_dump(mode="json")},
                    )
                    await self._record()
                    await workflow.sleep(job.retry.backoff_seconds)
                elif error.code is ErrorCode.BACKEND_LOST and was_pinned is not None:
                    raise ApplicationError(error.message, error.details, type=error.code.value, non_retryable=True)
                else:
                    raise

    def _prompt_activity_limit(self, job: GenerationInput) -> timedelta:
        """Temporal's limit on one try of run_prompt. The job's own limit counts only from when ComfyUI starts
        its prompt; on the fleet's path a try also covers the wait for a lease and, prefetched, the wait in
        ComfyUI's queue behind another job, which may run for as long as any job may. The heartbeat timeout,
        not this, is what notices a worker gone."""
        if not self._fleet:
            return timedelta(seconds=job.timeout_seconds + 60)
        # From the job's input, not the worker's settings: a replay schedules what the first run did.
        longest_other = job.max_timeout_seconds if job.max_timeout_seconds is not None else MAX_JOB_TIMEOUT_SECONDS
        return timedelta(seconds=job.timeout_seconds + longest_other + 60)

    def _attempt_prompt_id(self, job_id: str, attempt: int) -> str:
        """The prompt id the attempt's activity is given. A run that an operator's reset started (a run other
        than the job's first), on the fleet's path, gives the attempts it schedules prompt ids of their own,
        apart from those the run it replaced may still have in ComfyUI (with a slot prefetched, both can be
        there at once). An attempt scheduled before the reset point, replayed in the new run, keeps the id its
        pending activity carries: the marker says whether this run scheduled it. The token is drawn from the
        workflow's random: the same on every replay, and reseeded by each reset (a reset of a reset run draws
        anew). Not the run's id: a run reset again would replay its predecessor's attempts with its own."""
        info = workflow.info()
        if (self._fleet and info.run_id != info.first_execution_run_id
                and workflow.patched(f"{RESET_RUN_PROMPT_MARKER}-{attempt}")):
            return prompt_id_for(job_id, attempt, str(workflow.uuid4()))
        return prompt_id_for(job_id, attempt)

    def _elapsed_before(self, failure: ActivityError, known: float) -> float:
        """Seconds the attempt had run, as the PROMPT_ON_OTHER_BACKEND failure says (`elapsedSeconds`)."""
        cause = failure.cause
        seconds = _failure_details(cause).get(ELAPSED_SECONDS_DETAIL) if isinstance(cause, ApplicationError) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return known
        return max(known, float(seconds))

    def _elsewhere(self, failure: ActivityError) -> str | None:
        """The backend named by a PROMPT_ON_OTHER_BACKEND failure: where the attempt's prompt may be."""
        cause = failure.cause
        if self._fleet and isinstance(cause, ApplicationError) and cause.type == PROMPT_ON_OTHER_BACKEND:
            backend = _failure_details(cause).get("backend")
            return backend if isinstance(backend, str) else None
        return None

    async def _finish_cancelled(self) -> None:
        if not self._console:
            await self._stop_and_record_cancel()
            return
        # Shielded: a job stopped by a signal may still get Temporal's cancellation (a batch's cancel, then the API's
        # or the Web UI's), which must cut short neither the stop of its prompt nor the record of its end.
        ending = asyncio.create_task(self._stop_and_record_cancel())
        while not ending.done():
            with suppress(asyncio.CancelledError):
                await asyncio.shield(ending)
        ending.result()

    async def _stop_and_record_cancel(self) -> None:
        request = self._cancel or self._temporal_cancel_request()
        assert self._job is not None
        # On the fleet's path a prompt may be placed (waiting in ComfyUI's queue) before the workflow hears where:
        # then it is stopped on every backend (backend None).
        backend = self._prompt_backend if self._fleet else self._job.backend
        if self._prompt_id is not None:
            try:
                await workflow.execute_activity_method(
                    ComfyActivities.cancel_prompt,
                    CancelPromptInput(backend=backend, prompt_id=self._prompt_id),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=_CLEANUP_RETRY,
                )
            except ActivityError as failure:
                self._event("warning", "could not stop the prompt on ComfyUI", {"error": str(failure.cause)})
        message = f"cancelled by {request.actor}" + (f": {request.reason}" if request.reason else "")
        await self._finish(JobStatus.cancelled, error=JobError(code=ErrorCode.JOB_CANCELLED, message=message))

    def _temporal_cancel_request(self) -> CancelRequest:
        """A cancellation through Temporal alone (the Web UI, the CLI): the operator's reason, if they gave one."""
        reason = workflow.cancellation_reason() if self._console else None
        return CancelRequest(reason=reason or "cancelled through Temporal", actor="temporal")

    async def _finish(self, status: JobStatus, error: JobError | None = None) -> None:
        assert self._state is not None
        self._state.status = status
        error = self._redacted(error) if error is not None else None
        self._state.error = error
        self._state.completed_at = workflow.now()
        data: dict[str, Any] = {"status": status.value}
        if error is not None:
            data["error"] = error.model_dump(mode="json")
        self._event("status", f"job {status.value}" + (f": {error.message}" if error else ""), data)
        await self._record()
        await self._start_webhook()

    # --- webhooks --------------------------------------------------------------------------------

    async def _start_webhook(self) -> None:
        """Hand the job's end to its own delivery workflow and go on: the job ends now, whatever the receiver
        does. Abandoned when this workflow closes; its id is the event's, so a re-run of this job (a reset)
        finds it started and sends no second webhook."""
        assert self._job is not None and self._state is not None
        event = f"job.{self._state.status.value}"
        if self._webhook_started or not self._job.wants_webhook(event) or not workflow.patched(WEBHOOKS_PATCH):
            return
        assert self._job.callback_url is not None
        try:
            await workflow.start_child_workflow(
                WebhookDeliveryWorkflow.run,
                WebhookDeliveryInput(event=event, callback_url=self._job.callback_url, job=self._state.model_copy(),
                                     request_id=self._job.request_id),
                id=webhook_workflow_id(self._job.job_id, event),
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                cancellation_type=workflow.ChildWorkflowCancellationType.ABANDON,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            pass  # started before, by this job's run that was reset: one webhook per event
        self._webhook_started = True

    def _progress_webhook(self, job: GenerationInput) -> ProgressWebhook | None:
        if job.callback_url is None or not job.wants_webhook(PROGRESS_EVENT):
            return None
        return ProgressWebhook(
            callback_url=job.callback_url, template_id=job.template_id, metadata=job.metadata, created_at=job.created_at,
            request_id=job.request_id,
        )

    # --- the jobs table and the event log --------------------------------------------------------

    def _free_texts(self) -> list[str]:
        assert self._job is not None
        return free_texts(self._job.inputs, self._job.workflow_json) if self._job.privacy_mode else []

    def _redacted(self, error: JobError) -> JobError:
        if not self._redactor:
            return error
        return JobError(code=error.code, message=self._redactor.text(error.message),
                        details=self._redactor.value(error.details))

    def _event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._event_seq += 1
        self._pending_events.append(JobEventInput(
            key=f"wf:{self._event_seq}", at=workflow.now(), kind=kind,
            message=self._redactor.text(message), data=self._redactor.value(data or {}),
        ))

    def _index(self) -> None:
        """Keep the job's search attributes in step with its status (and, since the console patch, its backend),
        for operators searching the Web UI. Upserted only when one of them changes: each upsert is an event."""
        assert self._job is not None and self._state is not None
        job, state = self._job, self._state
        backend_moved = self._console and state.backend != self._indexed_backend
        if not self._indexed or (state.status is self._indexed_status and not backend_moved):
            return
        first = self._indexed_status is None
        updates: list[Any] = []
        if state.status is not self._indexed_status:
            updates.append(JOB_STATUS.value_set(state.status.value))
        if first and job.template_id is not None:
            updates.append(TEMPLATE_ID.value_set(job.template_id))
        if first and self._owner_indexed:
            updates.append(OWNER.value_set(job.owner))
        if first and self._console:
            updates.append(PRIORITY.value_set(job.priority))
            if job.batch_id is not None:
                updates.append(BATCH_ID.value_set(job.batch_id))
        if backend_moved:
            updates.append(BACKEND.value_set(state.backend) if state.backend else BACKEND.value_unset())
        workflow.upsert_search_attributes(updates)
        self._indexed_status = state.status
        self._indexed_backend = state.backend

    async def _record(self) -> None:
        assert self._job is not None and self._state is not None
        self._index()
        async with self._record_lock:
            events = list(self._pending_events)
            await workflow.execute_local_activity_method(
                RecordActivities.record_job,
                RecordJobInput(
                    job=self._state,
                    backend=(self._state.backend or "") if self._fleet else self._job.backend,
                    prompt_id=self._prompt_id,
                    inputs={} if self._job.privacy_mode else self._job.inputs,
                    cache_key=self._job.cache_key,
                    request_fingerprint=self._job.request_fingerprint,
                    events=events,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
            )
            del self._pending_events[: len(events)]  # kept until written: a cut-short record loses none
