"""GenerationWorkflow on the real Temporal dev server, with its activities mocked by name."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from app.comfy.errors import STARTED_AT_MS_DETAIL
from app.errors import ErrorCode
from app.models import (
    CancelPromptInput,
    CancelRequest,
    CollectOutputsInput,
    CollectOutputsResult,
    GenerationInput,
    JobStatus,
    OutputRef,
    PromptStarted,
    RecordJobInput,
    RenderPromptInput,
    RenderPromptResult,
    RetrySpec,
    RunPromptInput,
    RunPromptResult,
    WebhookDeliveryInput,
    accepted_state,
    prompt_id_for,
)
from app.temporal_client import register_search_attributes
from tests.conftest import start_time_skipping
from tests.harness import assert_eventually, reset_job
from workflows_temporal.generation import GenerationWorkflow
from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow, webhook_workflow_id

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}


@dataclass
class FakeGateway:
    """Activities registered under the workflow's activity names; `run_outcomes` scripts each attempt."""

    run_outcomes: list[object] = field(default_factory=list)
    records: list[RecordJobInput] = field(default_factory=list)
    runs: list[RunPromptInput] = field(default_factory=list)
    renders: list[RenderPromptInput] = field(default_factory=list)
    cancelled_prompts: list[str] = field(default_factory=list)
    cancelled_on: list[str | None] = field(default_factory=list)
    run_started: asyncio.Event = field(default_factory=asyncio.Event)
    # The first record of a succeeded job waits until it is cancelled.
    hold_the_success: bool = False
    success_held: asyncio.Event = field(default_factory=asyncio.Event)
    # cancel_prompt (with `hold_the_stop`) and a ("fail when released", error) outcome wait for `release`.
    hold_the_stop: bool = False
    stop_held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @activity.defn(name="render_prompt")
    async def render_prompt(self, request: RenderPromptInput) -> RenderPromptResult:
        self.renders.append(request)
        return RenderPromptResult(prompt=request.workflow_json or PROMPT)

    @activity.defn(name="record_job")
    async def record_job(self, record: RecordJobInput) -> None:
        if self.hold_the_success and record.job.status is JobStatus.succeeded and not self.success_held.is_set():
            self.success_held.set()
            await asyncio.sleep(60)  # until the workflow's cancellation cancels this record
        self.records.append(record)

    @activity.defn(name="run_prompt")
    async def run_prompt(self, request: RunPromptInput) -> RunPromptResult:
        self.runs.append(request)
        outcome = self.run_outcomes.pop(0) if self.run_outcomes else "succeed"
        if outcome == "hang":  # placed and waiting in ComfyUI's queue: it never signals `running`
            self.run_started.set()
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.1)
        if outcome == "block":
            handle = activity.client().get_workflow_handle(request.job_id)
            await handle.signal("prompt_started", PromptStarted(attempt=request.attempt, prompt_id="p"))
            self.run_started.set()
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.1)
        if isinstance(outcome, tuple) and outcome[0] == "fail when released":
            self.run_started.set()
            await asyncio.wait_for(self.release.wait(), 10)
            raise outcome[1]
        if isinstance(outcome, tuple):  # ("started on", backend, error): ComfyUI started it there, then it failed
            _, backend, error = outcome
            handle = activity.client().get_workflow_handle(request.job_id)
            await handle.signal("prompt_started",
                                PromptStarted(attempt=request.attempt, prompt_id="p", backend=backend))
            raise error
        if isinstance(outcome, ApplicationError):
            raise outcome
        return RunPromptResult(prompt_id=prompt_id_for(request.job_id, request.attempt),
                               outputs={"2": {"images": []}}, execution_time_ms=12,
                               backend="gpu2" if request.reattach else "gpu1")

    @activity.defn(name="collect_outputs")
    async def collect_outputs(self, request: CollectOutputsInput) -> CollectOutputsResult:
        return CollectOutputsResult(files=[OutputRef(
            filename="a.png", storage_key=f"{request.job_id}/0/a.png", size=3, sha256="abc", content_type="image/png",
            node_id="2")])

    @activity.defn(name="cancel_prompt")
    async def cancel_prompt(self, request: CancelPromptInput) -> None:
        if self.hold_the_stop:
            self.stop_held.set()
            await asyncio.wait_for(self.release.wait(), 10)
        self.cancelled_prompts.append(request.prompt_id)
        self.cancelled_on.append(request.backend)


@asynccontextmanager
async def running(client: Client, task_queue: str, fake: FakeGateway) -> AsyncIterator[None]:
    main = Worker(client, task_queue=task_queue, workflows=[GenerationWorkflow],
                  activities=[fake.render_prompt, fake.record_job, fake.collect_outputs, fake.cancel_prompt])
    # A job is placed through the shared queue; `gpu2`'s own queue takes an attempt sent back to it.
    gpu = Worker(client, task_queue=f"{task_queue}.comfyui", activities=[fake.run_prompt])
    gpu2 = Worker(client, task_queue=f"{task_queue}.gpu2", activities=[fake.run_prompt])
    async with main, gpu, gpu2:
        yield


def job_input(task_queue: str, retry: RetrySpec | None = None) -> GenerationInput:
    return GenerationInput(
        job_id=str(uuid.uuid4()), workflow_json=PROMPT, inputs={"width": 8}, retry=retry or RetrySpec(),
        timeout_seconds=60, heartbeat_timeout_seconds=5, backend="comfyui-1",
        backend_task_queue=f"{task_queue}.gpu", created_at=datetime.now(timezone.utc),
    )


async def replays(history: WorkflowHistory) -> None:
    """The run replays on the workflow that made it: its cancel path is deterministic."""
    replayer = Replayer(workflows=[GenerationWorkflow], data_converter=pydantic_data_converter)
    assert (await replayer.replay_workflow(history)).replay_failure is None


def failure(code: ErrorCode) -> ApplicationError:
    return ApplicationError(f"{code.value} happened", {"nodeId": "2"}, type=code.value, non_retryable=True)


# The cancel the API sends: who and why by signal; Temporal's cancellation (cancel_as_the_api_does) follows it.
API_CANCEL = CancelRequest(reason="changed my mind", actor="alice", temporal_cancel_follows=True)


async def signal_as_the_api_does(handle: WorkflowHandle, request: CancelRequest = API_CANCEL) -> None:
    await handle.signal(GenerationWorkflow.cancel, request)


async def cancel_as_the_api_does(handle: WorkflowHandle, request: CancelRequest = API_CANCEL) -> None:
    """The API's whole cancel: its signal, then Temporal's cancellation."""
    await signal_as_the_api_does(handle, request)
    await handle.cancel(reason=f"cancelled through the gateway's API by {request.actor}")


def assert_recorded_cancelled(fake: FakeGateway, message: str = "cancelled by alice: changed my mind") -> None:
    final = fake.records[-1].job
    assert final.status is JobStatus.cancelled and final.error is not None
    assert final.error.message == message


async def test_success_records_queued_then_succeeded(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway()
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        view = await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    assert view.status is JobStatus.succeeded
    assert view.attempts == 1
    assert [f.storage_key for f in view.outputs] == [f"{job.job_id}/0/a.png"]
    assert view.execution_time_ms == 12 and view.completed_at is not None
    assert [r.job.status for r in fake.records] == [JobStatus.queued, JobStatus.succeeded]
    assert fake.runs[0].prompt == PROMPT
    assert len(fake.renders) == 1  # a job without the API's rendered prompt renders it in the worker


async def test_a_prompt_the_api_rendered_runs_as_given_without_rendering_again(
    temporal_client: Client, task_queue: str
) -> None:
    api_rendered = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16}}}
    fake = FakeGateway()
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue).model_copy(update={"rendered": RenderPromptResult(prompt=api_rendered)})
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        view = await handle.result()
    assert view.status is JobStatus.succeeded
    assert fake.renders == [] and fake.runs[0].prompt == api_rendered
    markers = [event.marker_recorded_event_attributes for event in (await handle.fetch_history()).events
               if event.HasField("marker_recorded_event_attributes")]
    # The patch, and local activities for the two records only (queued, succeeded).
    assert [marker.marker_name for marker in markers].count("core_local_activity") == 2


async def test_lost_prompt_is_resubmitted_with_a_new_prompt_id(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=[failure(ErrorCode.PROMPT_LOST), "succeed"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        view = await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    assert view.status is JobStatus.succeeded and view.attempts == 2
    assert [run.attempt for run in fake.runs] == [1, 2]
    assert prompt_id_for(job.job_id, 1) != prompt_id_for(job.job_id, 2)
    # The new attempt is recorded before it runs, so its progress is never mixed with the lost one's.
    assert (JobStatus.queued, 2) in [(record.job.status, record.job.attempts) for record in fake.records]
    logged = [event.message for record in fake.records for event in record.events]
    assert any("lost prompt" in message for message in logged)


async def test_a_lost_backend_starts_a_new_attempt_placed_anew(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=[failure(ErrorCode.BACKEND_LOST), "succeed"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        view = await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    assert view.status is JobStatus.succeeded and view.attempts == 2 and view.backend == "gpu1"
    assert [(run.attempt, run.reattach, run.backend) for run in fake.runs] == [(1, False, None), (2, False, None)]


def elsewhere(backend: str, elapsed_seconds: float | None = None) -> ApplicationError:
    details: dict[str, object] = {"backend": backend}
    if elapsed_seconds is not None:
        details["elapsedSeconds"] = elapsed_seconds
    return ApplicationError(f"on {backend}", details, type="PROMPT_ON_OTHER_BACKEND", non_retryable=True)


async def test_an_attempt_polled_by_another_backend_goes_back_to_its_own(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=[elsewhere("gpu2", elapsed_seconds=12.5), "succeed"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        view = await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    # The same attempt (the same prompt id), sent to gpu2's own queue, told to look for its prompt first.
    assert view.status is JobStatus.succeeded and view.attempts == 1 and view.backend == "gpu2"
    assert [(run.attempt, run.reattach) for run in fake.runs] == [(1, False), (1, True)]
    # The re-attach goes on counting the job's time from where the first backend had got.
    assert [run.elapsed_seconds for run in fake.runs] == [0, 12.5]
    assert fake.runs[0].prompt_id == fake.runs[1].prompt_id == prompt_id_for(job.job_id, 1)


async def test_a_cancel_after_a_lost_backend_stops_the_new_attempt_on_every_backend(
    temporal_client: Client, task_queue: str
) -> None:
    """Attempt 1's prompt was followed to gpu2, where it ran until gpu2 was lost; attempt 2 is placed and waits in
    some backend's queue without having said which: the cancel must not go to gpu2 alone."""
    lost_while_running = ("started on", "gpu2", failure(ErrorCode.BACKEND_LOST))
    fake = FakeGateway(run_outcomes=[elsewhere("gpu2"), lost_while_running, "hang"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        assert (await handle.query(GenerationWorkflow.status)).backend is None
        await handle.signal(GenerationWorkflow.cancel, CancelRequest(reason="changed my mind"))
        view = await handle.result()
    assert view.status is JobStatus.cancelled and view.attempts == 2
    assert list(zip(fake.cancelled_prompts, fake.cancelled_on)) == [(prompt_id_for(job.job_id, 2), None)]


async def test_a_reattach_no_worker_takes_is_a_lost_backend(temporal_client: Client, task_queue: str) -> None:
    """Attempt 1 is sent back to backend `gone`, whose queue no worker polls (it left COMFYUI_URLS): after the
    grace period (the heartbeat timeout) attempt 2 is placed anew."""
    fake = FakeGateway(run_outcomes=[elsewhere("gone"), "succeed"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue).model_copy(update={"heartbeat_timeout_seconds": 1})
        view = await asyncio.wait_for(temporal_client.execute_workflow(
            GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue), 20)
    assert view.status is JobStatus.succeeded and view.attempts == 2 and view.backend == "gpu1"
    assert [(run.attempt, run.reattach) for run in fake.runs] == [(1, False), (2, False)]
    logged = [event.message for record in fake.records for event in record.events]
    assert any("backend gone stopped answering" in message for message in logged), logged


async def test_reattaches_no_worker_takes_count_in_the_lost_backends_bound(
    temporal_client: Client, task_queue: str
) -> None:
    fake = FakeGateway(run_outcomes=[elsewhere("gone")] * 4)
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue).model_copy(update={"heartbeat_timeout_seconds": 1})
        with pytest.raises(WorkflowFailureError) as raised:
            await asyncio.wait_for(temporal_client.execute_workflow(
                GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue), 30)
    assert isinstance(raised.value.cause, ApplicationError) and raised.value.cause.type == "BACKEND_LOST"
    assert len(fake.runs) == 4 and fake.records[-1].job.attempts == 4


@pytest.mark.parametrize("reset_to", ["first task", "last task"])
async def test_a_reset_run_cancels_and_records_the_prompt_its_activity_carries(
    temporal_client: Client, task_queue: str, reset_to: str
) -> None:
    """Reset to the first workflow task (its run_prompt is scheduled again, by the new run: a prompt id of the
    new run's own) or to one after run_prompt was scheduled (the new run's pending activity carries the first
    run's prompt id): either way the id the new run cancels and records is the one its activity was given, and
    the new run's history replays."""
    fake = FakeGateway(run_outcomes=["block", "block"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await assert_eventually(lambda: any(r.job.status is JobStatus.running for r in fake.records), timeout=10)
        await reset_job(temporal_client, job.job_id, to_last_task=reset_to == "last task")
        await assert_eventually(lambda: len(fake.runs) == 2, timeout=15)
        reset_run = temporal_client.get_workflow_handle_for(GenerationWorkflow.run, job.job_id)
        await reset_run.signal(GenerationWorkflow.cancel, CancelRequest(reason="changed my mind"))
        view = await reset_run.result()
        new_history = await reset_run.fetch_history()
        new_run_id = (await reset_run.describe()).run_id
    assert view.status is JobStatus.cancelled
    carried = fake.runs[1].the_prompt_id
    assert (carried == prompt_id_for(job.job_id, 1)) is (reset_to == "last task")
    assert fake.cancelled_prompts == [carried]
    assert fake.records[-1].prompt_id == carried
    # The Replayer takes the run's id from its started event, which a reset copies from the first run; a worker
    # is told the run's own id, as the replay is here.
    new_history.events[0].workflow_execution_started_event_attributes.original_execution_run_id = new_run_id
    await Replayer(workflows=[GenerationWorkflow], data_converter=pydantic_data_converter).replay_workflow(new_history)


async def test_node_error_fails_the_job_unless_the_client_opted_in(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=[failure(ErrorCode.COMFYUI_NODE_ERROR)])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        with pytest.raises(WorkflowFailureError) as raised:
            await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    assert isinstance(raised.value.cause, ApplicationError)
    assert raised.value.cause.type == "COMFYUI_NODE_ERROR"
    final = fake.records[-1].job
    assert final.status is JobStatus.failed and final.error is not None
    assert final.error.code is ErrorCode.COMFYUI_NODE_ERROR and final.error.details == {"nodeId": "2"}


async def test_a_failed_prompt_comfyui_had_started_gives_the_job_its_start(
    temporal_client: Client, task_queue: str
) -> None:
    """It failed before `running` was signalled; its history's execution_start says when it started."""
    started = datetime(2026, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)
    oom = ApplicationError("out of memory", {"nodeId": "2", STARTED_AT_MS_DETAIL: int(started.timestamp() * 1000)},
                           type=ErrorCode.COMFYUI_OOM.value, non_retryable=True)
    fake = FakeGateway(run_outcomes=[oom])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        with pytest.raises(WorkflowFailureError):
            await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    final = fake.records[-1].job
    assert final.started_at == started
    assert final.error is not None and final.error.details == {"nodeId": "2"}  # the stamp is no public detail


async def test_retry_on_reruns_node_errors_up_to_max_attempts(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=[failure(ErrorCode.COMFYUI_NODE_ERROR), failure(ErrorCode.COMFYUI_OOM), "succeed"])
    retry = RetrySpec(max_attempts=3, backoff_seconds=0.1, retry_on=[ErrorCode.COMFYUI_NODE_ERROR, ErrorCode.COMFYUI_OOM])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue, retry)
        view = await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    assert view.status is JobStatus.succeeded and view.attempts == 3


async def test_cancel_signal_stops_the_running_prompt(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=["block"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await handle.signal(GenerationWorkflow.cancel, CancelRequest(reason="changed my mind"))
        view = await handle.result()
    assert view.status is JobStatus.cancelled
    assert view.error is not None and "changed my mind" in view.error.message
    assert fake.cancelled_prompts == [prompt_id_for(job.job_id, 1)]
    statuses = [r.job.status for r in fake.records]
    assert statuses[0] is JobStatus.queued and JobStatus.running in statuses and statuses[-1] is JobStatus.cancelled


async def test_the_apis_cancel_ends_the_workflow_as_canceled_with_the_signalled_reason(
    temporal_client: Client, task_queue: str
) -> None:
    """The API signals who and why, then requests Temporal's cancellation: the signal alone stops nothing, the
    cancellation stops the prompt, and the job, recorded with the signalled reason, ends its workflow as Canceled."""
    fake = FakeGateway(run_outcomes=["block"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await signal_as_the_api_does(handle)
        assert (await handle.query(GenerationWorkflow.status)).status is JobStatus.running
        assert fake.cancelled_prompts == []
        await handle.cancel(reason="cancelled through the gateway's API by alice")
        with pytest.raises(WorkflowFailureError) as raised:
            await handle.result()
    assert isinstance(raised.value.cause, CancelledError)
    assert fake.cancelled_prompts == [prompt_id_for(job.job_id, 1)]
    assert_recorded_cancelled(fake)


async def test_a_cancel_signal_whose_cancellation_never_came_leaves_a_failure_the_jobs(
    temporal_client: Client, task_queue: str
) -> None:
    """The API stopped between its signal and Temporal's cancellation: the signal alone stops nothing, and a prompt
    that then fails fails the job (it was never cancelled)."""
    fake = FakeGateway(run_outcomes=[("fail when released", failure(ErrorCode.COMFYUI_NODE_ERROR))])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await signal_as_the_api_does(handle)
        await handle.query(GenerationWorkflow.status)  # answered once the signal is applied
        fake.release.set()
        with pytest.raises(WorkflowFailureError) as raised:
            await handle.result()
    assert isinstance(raised.value.cause, ApplicationError) and raised.value.cause.type == "COMFYUI_NODE_ERROR"
    final = fake.records[-1].job
    assert final.status is JobStatus.failed and final.error is not None
    assert final.error.code is ErrorCode.COMFYUI_NODE_ERROR
    assert fake.cancelled_prompts == []


async def test_a_signal_that_stops_the_job_overrides_one_still_waiting_for_its_cancellation(
    temporal_client: Client, task_queue: str
) -> None:
    """An API signal left without its cancellation (the API stopped, or an operator's reset re-applied it) must
    not swallow a later cancel: a batch's signal stops the job, with the batch's who and why."""
    fake = FakeGateway(run_outcomes=["block"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await signal_as_the_api_does(handle)
        await handle.signal(GenerationWorkflow.cancel, CancelRequest(reason="the batch was cancelled", actor="batch"))
        view = await asyncio.wait_for(handle.result(), 10)
    assert view.status is JobStatus.cancelled and view.error is not None
    assert view.error.message == "cancelled by batch: the batch was cancelled"
    assert fake.cancelled_prompts == [prompt_id_for(job.job_id, 1)]


async def test_a_reset_of_a_job_the_api_cancelled_runs_it_again_and_a_later_cancel_is_the_new_ones(
    temporal_client: Client, task_queue: str
) -> None:
    """A reset re-applies the API's signal to the new run, but not Temporal's cancellation: the job runs again, and
    the next cancel's who and why are the job's, not those of the cancel before the reset."""
    fake = FakeGateway(run_outcomes=["block", "block"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await cancel_as_the_api_does(handle)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        await reset_job(temporal_client, job.job_id)
        await assert_eventually(lambda: len(fake.runs) == 2, timeout=15)
        reset_run = temporal_client.get_workflow_handle_for(GenerationWorkflow.run, job.job_id)
        await assert_eventually(
            lambda: fake.records[-1].job.status is JobStatus.running, timeout=10, what="the job running again")
        await cancel_as_the_api_does(
            reset_run, CancelRequest(reason="second thoughts", actor="bob", temporal_cancel_follows=True))
        with pytest.raises(WorkflowFailureError) as raised:
            await reset_run.result()
    assert isinstance(raised.value.cause, CancelledError)
    assert_recorded_cancelled(fake, "cancelled by bob: second thoughts")


async def test_the_apis_cancel_of_a_job_a_signal_already_stopped_cuts_short_neither_its_stop_nor_its_record(
    temporal_client: Client, task_queue: str
) -> None:
    """A batch's signal stops the job; the API's cancel (signal, then Temporal's cancellation) arrives while the
    job stops its prompt: the stop runs to its end, the job is recorded cancelled with the batch's who and why,
    and the workflow, cancelled through Temporal, ends as Canceled."""
    fake = FakeGateway(run_outcomes=["block"], hold_the_stop=True)
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await handle.signal(GenerationWorkflow.cancel, CancelRequest(reason="the batch was cancelled", actor="batch"))
        await asyncio.wait_for(fake.stop_held.wait(), 10)
        await cancel_as_the_api_does(handle)
        await handle.query(GenerationWorkflow.status)  # answered once the cancellation has reached the workflow
        fake.release.set()
        with pytest.raises(WorkflowFailureError) as raised:
            await handle.result()
    assert isinstance(raised.value.cause, CancelledError)
    assert fake.cancelled_prompts == [prompt_id_for(job.job_id, 1)]
    assert_recorded_cancelled(fake, "cancelled by batch: the batch was cancelled")
    warnings = [event.message for record in fake.records for event in record.events if event.kind == "warning"]
    assert warnings == []
    await replays(await handle.fetch_history())


async def test_a_cancel_sent_before_any_worker_ran_the_job_schedules_no_prompt(
    temporal_client: Client, task_queue: str
) -> None:
    """The API's signal and cancellation both wait for the job's first workflow task (no worker was up): the
    cancellation lands on the job's first record, and must stop its steps too, not only record its end."""
    fake = FakeGateway()
    job = job_input(task_queue)
    handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    await cancel_as_the_api_does(handle)
    async with running(temporal_client, task_queue, fake):
        with pytest.raises(WorkflowFailureError) as raised:
            await handle.result()
    assert isinstance(raised.value.cause, CancelledError)
    history = await handle.fetch_history()
    assert not [event for event in history.events if event.HasField("activity_task_scheduled_event_attributes")]
    assert fake.runs == [] and fake.cancelled_prompts == []
    assert_recorded_cancelled(fake)
    await replays(history)


async def test_temporal_cancellation_takes_the_same_path(temporal_client: Client, task_queue: str) -> None:
    fake = FakeGateway(run_outcomes=["block"])
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        await asyncio.wait_for(fake.run_started.wait(), 10)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as raised:
            await handle.result()
    assert isinstance(raised.value.cause, CancelledError)
    assert fake.cancelled_prompts == [prompt_id_for(job.job_id, 1)]
    assert fake.records[-1].job.status is JobStatus.cancelled


async def test_a_cancel_from_temporal_while_the_end_is_recorded_leaves_the_job_succeeded(
    temporal_client: Client, task_queue: str
) -> None:
    fake = FakeGateway(hold_the_success=True)
    async with running(temporal_client, task_queue, fake):
        job = job_input(task_queue)
        # The record is a local activity: the cancel reaches the workflow when its workflow task heartbeats, at
        # 80% of the task timeout (Temporal's 10 s by default), a wait of the test's, not of the behaviour.
        handle = await temporal_client.start_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue,
                                                      task_timeout=timedelta(seconds=3))
        await asyncio.wait_for(fake.success_held.wait(), 10)
        await handle.cancel()
        state = await handle.result()
    assert state.status is JobStatus.succeeded and state.outputs
    assert fake.records[-1].job.status is JobStatus.succeeded
    logged = [event.message for record in fake.records for event in record.events]
    assert logged.count("job succeeded") == 1  # the record cut short is written again, with its events


async def test_storage_that_keeps_failing_fails_the_job_once_its_tries_are_spent(task_queue: str) -> None:
    """Ten tries, backing off to a minute apart, on the time-skipping server: tries, not time, so that time
    the gateway is down is not spent. Then Temporal fails the activity with the last error, so the job
    reports what kept recurring."""
    fake = FakeGateway()

    @activity.defn(name="collect_outputs")
    async def broken_storage(request: CollectOutputsInput) -> CollectOutputsResult:
        raise ApplicationError("disk full", type=ErrorCode.STORAGE_ERROR.value)

    env = await start_time_skipping()
    try:
        await register_search_attributes(env.client)
        main = Worker(env.client, task_queue=task_queue, workflows=[GenerationWorkflow],
                      activities=[fake.render_prompt, fake.record_job, broken_storage, fake.cancel_prompt])
        gpu = Worker(env.client, task_queue=f"{task_queue}.comfyui", activities=[fake.run_prompt])
        async with main, gpu:
            job = job_input(task_queue)
            with pytest.raises(WorkflowFailureError) as raised:
                await env.client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
    finally:
        await env.shutdown()
    assert isinstance(raised.value.cause, ApplicationError) and raised.value.cause.type == "STORAGE_ERROR"
    final = fake.records[-1].job
    assert final.status is JobStatus.failed and final.error is not None and final.error.message == "disk full"


async def test_the_end_hands_its_webhook_to_one_delivery_workflow_and_does_not_wait(
    temporal_client: Client, task_queue: str
) -> None:
    """No worker runs the delivery here: the job completes all the same. A delivery already started for the
    event (as after a reset of the job's workflow) is left as it is, and no second one starts."""
    fake = FakeGateway()
    job = job_input(task_queue).model_copy(update={"callback_url": "https://hooks.example/x"})
    webhook_id = webhook_workflow_id(job.job_id, "job.succeeded")
    earlier = await temporal_client.start_workflow(
        WebhookDeliveryWorkflow.run, WebhookDeliveryInput(
            event="job.succeeded", callback_url="https://hooks.example/x", job=accepted_state(job)),
        id=webhook_id, task_queue=f"{task_queue}.nobody",
    )
    async with running(temporal_client, task_queue, fake):
        view = await temporal_client.execute_workflow(GenerationWorkflow.run, job, id=job.job_id, task_queue=task_queue)
        assert view.status is JobStatus.succeeded
        second = job_input(task_queue).model_copy(update={"callback_url": "https://hooks.example/x"})
        await temporal_client.execute_workflow(GenerationWorkflow.run, second, id=second.job_id, task_queue=task_queue)
    assert (await earlier.describe()).run_id == earlier.result_run_id  # the one started first, still alone
    started = temporal_client.get_workflow_handle(webhook_workflow_id(second.job_id, "job.succeeded"))
    described = await started.describe()
    assert described.workflow_type == "WebhookDeliveryWorkflow" and described.task_queue == task_queue
    await earlier.terminate("test over")
    await started.terminate("test over")
