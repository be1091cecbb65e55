"""Activities that talk to ComfyUI: run a prompt (stage its images, submit, follow), stop a prompt, collect
its outputs.

`run_prompt` is one activity, submit and wait together, so that one slot of a backend covers a prompt from the
moment it is queued in ComfyUI until it finishes: jobs beyond the backends' capacity wait in Temporal, never in
ComfyUI's in-memory queue. Each backend's workers run it with a ComfyActivities of their own (`placement`): the
backend that polled the task runs the prompt (app.comfy.slots).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.heartbeats import heartbeating
from activities.job_log import JobLog
from activities.live_row import LiveRow
from activities.progress_webhooks import ProgressWebhooks
from activities.prompt_run import POST_SETTLE_SECONDS, PromptRun, stop_prompt
from activities.waiting import while_unreachable
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.comfy.slots import Fleet, Lease
from app.errors import ELAPSED_SECONDS_DETAIL, PROMPT_ON_OTHER_BACKEND, ErrorCode
from app.redaction import Redactor
from app.models import (
    CancelPromptInput,
    CollectOutputsInput,
    CollectOutputsResult,
    JobWarning,
    OutputCollection,
    OutputRef,
    ProgressWebhook,
    PromptProgress,
    RunPromptInput,
    RunPromptResult,
    StepHeartbeat,
)
from app.output_formats import ScratchFile, in_output_format
from app.storage import OutputStorage

if TYPE_CHECKING:
    from activities.inputs import ImageStager

logger = logging.getLogger(__name__)


def to_application_error(error: ComfyError, redactor: Redactor | None = None) -> ApplicationError:
    """A ComfyUI failure → an activity failure typed by its classification (app.errors). A failure that is
    the job's outcome (a node error, OOM, a refused prompt) is benign to the worker: the job's log reports
    it, and the SDK logs it at DEBUG rather than as a WARNING with a traceback. So is an unreachable ComfyUI
    that reaches here: the activities wait it out (activities.waiting) and let it through only to give up,
    once the job's time is spent, and the outage itself is logged once, by the backend's BackendHealth.
    Under PRIVACY_MODE `redactor` takes the job's free texts out of ComfyUI's words before any log has them."""
    redactor = redactor or Redactor([])
    return ApplicationError(
        redactor.text(error.message),
        redactor.value(error.details),
        type=error.code.value,
        non_retryable=not error.retryable,
        category=ApplicationErrorCategory.UNSPECIFIED if error.retryable else ApplicationErrorCategory.BENIGN,
    )


# Tries that fetch a job's image inputs before it fails IMAGE_FETCH_FAILED (as the stage_images activity's policy).
IMAGE_FETCH_TRIES = 5
# Tries of one prompt's activity (worker crashes, faults of the gateway's own); past this, the job fails.
MAX_PROMPT_TRIES = 20


def unknown_backend(backend: str) -> ApplicationError:
    return ApplicationError(
        f"unknown ComfyUI backend {backend!r}", type=ErrorCode.CONFIGURATION_ERROR.value, non_retryable=True
    )


# A job's progress webhooks for one prompt run: (job id, what the job asked for) → its sender.
ProgressWebhooksFactory = Callable[[str, ProgressWebhook], ProgressWebhooks]


@dataclass(frozen=True)
class Placement:
    """The backend whose workers run these activities' prompts, and the process's fleet it belongs to."""

    backend: str
    fleet: Fleet
    images: "ImageStager"
    # How long the backend may stop answering with a prompt on it before the prompt is run elsewhere.
    grace_seconds: float


class ComfyActivities:
    def __init__(
        self, clients: Mapping[str, ComfyClient], storage: OutputStorage, engine: Engine, scratch_dir: Path,
        progress_webhooks: ProgressWebhooksFactory | None = None, placement: Placement | None = None,
        post_settle_seconds: float = POST_SETTLE_SECONDS,
    ) -> None:
        self._clients = clients
        self._post_settle_seconds = post_settle_seconds
        self._placement = placement
        self._progress_webhooks = progress_webhooks
        self._storage = storage
        self._engine = engine
        self._scratch_dir = scratch_dir
        scratch_dir.mkdir(parents=True, exist_ok=True)

    def _client(self, backend: str) -> ComfyClient:
        try:
            return self._clients[backend]
        except KeyError:
            raise unknown_backend(backend) from None

    # --- run_prompt ------------------------------------------------------------------------------

    @activity.defn(name="run_prompt")
    async def run_prompt(self, request: RunPromptInput) -> RunPromptResult:
        if activity.info().attempt > MAX_PROMPT_TRIES:
            raise ApplicationError(
                f"following prompt {request.the_prompt_id} was tried {MAX_PROMPT_TRIES} "
                "times without an end (see the worker's log)", type=ErrorCode.INTERNAL_ERROR.value, non_retryable=True,
            )
        details = activity.info().heartbeat_details
        progress = (
            PromptProgress.model_validate(details[0])
            if details
            # Sent back to the backend that has it: the prompt may be there already, so it is looked for first.
            else PromptProgress(prompt_id=request.the_prompt_id,
                                post_attempted=request.reattach, elapsed_seconds=request.elapsed_seconds)
        )
        # Jobs from before the fleet name their backend; later ones run on the backend that polled them.
        backend = request.backend or self._placed().backend
        elsewhere = progress.backend if progress.backend != backend else None
        if progress.backend is None and activity.info().attempt > 1 and self._placement is not None:
            # The heartbeat that names the prompt's backend, sent just before the post, may never have reached
            # Temporal (heartbeats are throttled: a worker killed within a second of the post). The prompt's slot
            # lease, claimed in the database before the post, names the backend.
            leased_to = await asyncio.to_thread(self._placement.fleet.leases.backends_leased_to, progress.prompt_id)
            elsewhere = min(leased_to - {backend}, default=None)
        if elsewhere is not None:
            raise ApplicationError(
                f"prompt {progress.prompt_id} may be on backend {elsewhere}; not posted on {backend}",
                {"backend": elsewhere, ELAPSED_SECONDS_DETAIL: progress.elapsed_seconds},
                type=PROMPT_ON_OTHER_BACKEND, non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,
            )
        redactor = Redactor(request.redacted_texts)
        log = JobLog(self._engine, request.job_id, redactor)
        client = self._client(backend)
        lease: Lease | None = None
        # The prompt's lease stays with it while it may run on ComfyUI with nobody following it (see below).
        keep_lease = False

        async def acquire() -> None:
            nonlocal lease
            if self._placement is not None and lease is None:
                lease = await self._placement.fleet.lease(self._placement.backend, progress.prompt_id)

        live_row = LiveRow(self._engine, request.job_id, request.attempt)
        run = PromptRun(client, request, progress, log, backend=backend, acquire=acquire,
                        on_report=lambda: live_row.offer(progress.live()),
                        post_settle_seconds=self._post_settle_seconds)
        webhooks = (
            self._progress_webhooks(request.job_id, request.progress_webhook)
            if request.progress_webhook is not None and self._progress_webhooks is not None else None
        )

        def after_heartbeat() -> None:
            live_row.offer(progress.live())
            if webhooks is not None:
                webhooks.offer(progress)

        logger.info("prompt %s on backend %s (the job's attempt %d)", progress.prompt_id, backend, request.attempt)
        try:
            async with heartbeating(lambda: run.tick().model_dump(by_alias=True), after_heartbeat, news=run.news):
                if request.image_sources:
                    run.request = request = await self._staged(client, request, run, progress, redactor, acquire)
                result = await while_unreachable(
                    run.run, on_wait=run.waiting, give_up=lambda: run.past_time_limit() or self._lost(request))
                if request.collect is not None:
                    result = await self._collected_here(client, backend, request, request.collect, result)
                logger.info("prompt %s ran on backend %s; %s", result.prompt_id, backend,
                            "its outputs are collected next" if result.files is None
                            else f"{len(result.files)} outputs stored")
                return result.model_copy(update={"backend": backend}) if request.backend is None else result
        except ComfyError as error:
            if error.code is ErrorCode.COMFYUI_UNREACHABLE and not run.past_time_limit() and self._lost(request):
                log.add(f"a{request.attempt}:backend-lost", "warning",
                        f"backend {backend} has not answered for {self._placed().grace_seconds:g} s; the job is run "
                        "again on another", {"code": ErrorCode.BACKEND_LOST.value, "backend": backend})
                raise ApplicationError(
                    f"backend {backend} stopped answering with prompt {progress.prompt_id} on it",
                    {"backend": backend, "promptId": progress.prompt_id}, type=ErrorCode.BACKEND_LOST.value,
                    non_retryable=True, category=ApplicationErrorCategory.BENIGN,
                ) from None
            if error.code is ErrorCode.COMFYUI_UNREACHABLE:
                log.add(f"a{request.attempt}:gave-up", "warning", f"{error.message}; the job's time limit has passed",
                        {"code": error.code.value})
            if redactor:
                # The cause would travel too (as the failure's cause, into tracebacks), with ComfyUI's words unredacted.
                raise to_application_error(error, redactor) from None
            raise to_application_error(error) from error
        except asyncio.CancelledError:
            cancellation = activity.cancellation_details()
            # A cancel the workflow asked for stops the prompt, and so does a workflow that is gone (terminated
            # in Temporal): nobody will collect the result. A worker shutdown or a timed-out attempt leaves it
            # running so that the next attempt re-attaches to it, and the prompt keeps its lease: renewed no
            # more, it is adopted by that attempt, or expires.
            if cancellation is not None and (cancellation.cancel_requested or cancellation.not_found):
                await asyncio.shield(run.stop())
            else:
                keep_lease = progress.post_attempted
            raise
        finally:
            if lease is not None:
                await self._let_go(lease, keep=keep_lease)
            await live_row.close()
            if webhooks is not None:
                await webhooks.close()
            await log.flush(force=True)

    async def _collected_here(self, client: ComfyClient, backend: str, request: RunPromptInput,
                              collect: OutputCollection, result: RunPromptResult) -> RunPromptResult:
        """The result with its outputs stored, from the backend that ran the prompt, within this activity: the
        workflow needs no collect_outputs (its scheduling, its workflow task, its dispatch), which for a short
        prompt is a large part of what the gateway adds. Tried once: any trouble (ComfyUI unreachable, the store
        failing) leaves the outputs to collect_outputs, whose retries and limits then handle it, so a store in
        trouble never makes the prompt run again. Keys are the same either way: a file stored here and again
        there replaces itself."""
        request_here = CollectOutputsInput(
            job_id=request.job_id, backend=backend, outputs=result.outputs, timeout_seconds=request.timeout_seconds,
            output_format=collect.output_format, output_quality=collect.output_quality,
        )
        files: list[OutputRef] = []
        taken: set[str] = set()
        try:
            for node_id, entry in _output_files(result.outputs):
                files.append(await self._store_output(client, request_here, len(files), node_id, entry, taken))
        except Exception as error:  # whatever went wrong, collect_outputs (its retries, its limits) takes over
            # The type only: the message may quote a file name made from the job's inputs (PRIVACY_MODE).
            code = (error.code.value if isinstance(error, ComfyError)
                    else error.type if isinstance(error, ApplicationError) else type(error).__name__)
            activity.logger.info("storing prompt %s's outputs failed (%s); collect_outputs stores them",
                                 result.prompt_id, code)
            return result
        return result.model_copy(update={"files": files})

    async def _let_go(self, lease: Lease, *, keep: bool) -> None:
        """Release the lease (or leave it to the prompt still on ComfyUI). Never fails the activity: a lease
        not released expires (Fleet.release retries it meanwhile)."""
        fleet = self._placed().fleet
        if keep:
            fleet.abandon(lease)
            return
        try:
            await asyncio.shield(fleet.release(lease))
        except Exception:  # noqa: BLE001 — the prompt's outcome stands whatever became of its lease
            activity.logger.exception("releasing slot lease %s/%d failed", lease.backend, lease.slot)

    def _placed(self) -> Placement:
        if self._placement is None:
            raise ApplicationError("run_prompt without a backend reached a worker that places none",
                                   type=ErrorCode.CONFIGURATION_ERROR.value, non_retryable=True)
        return self._placement

    async def _staged(self, client: ComfyClient, request: RunPromptInput, run: PromptRun, progress: PromptProgress,
                      redactor: Redactor, acquire: Callable[[], Awaitable[None]]) -> RunPromptInput:
        """The request with its image inputs uploaded to this backend (content-named: a retry uploads the same).
        The images are fetched before the slot lease is taken, so a slow or failing image host holds no slot;
        fetching is tried IMAGE_FETCH_TRIES times over the activity's tries, then fails the job."""
        progress.image_tries += 1
        activity.heartbeat(run.tick().model_dump(by_alias=True))
        try:
            images = await self._placed().images.load(request.image_sources, redactor)
        except ApplicationError as error:
            if error.type == ErrorCode.IMAGE_FETCH_FAILED.value and progress.image_tries >= IMAGE_FETCH_TRIES:
                raise ApplicationError(error.message, *error.details, type=error.type, non_retryable=True) from error
            raise
        await acquire()
        staged = await self._placed().images.upload(
            client, request.job_id, images, request.prompt, on_wait=run.waiting,
            max_wait=request.timeout_seconds, give_up=lambda: self._lost(request))
        return request.model_copy(update={"prompt": staged.prompt, "image_sources": {}})

    def _lost(self, request: RunPromptInput) -> bool:
        """The backend has not answered for the grace period, and the job could run on another: one that serves
        the queue it was placed from (a job sent back to a backend that is gone starts over anywhere)."""
        if request.backend is not None or self._placement is None:
            return False
        placement = self._placement
        down_since = placement.fleet.slots[placement.backend].health.down_since
        if down_since is None or time.time() - down_since < placement.grace_seconds:
            return False
        return request.reattach or len(placement.fleet.serving(activity.info().task_queue)) > 1

    # --- cancel_prompt ---------------------------------------------------------------------------

    @activity.defn(name="cancel_prompt")
    async def cancel_prompt(self, request: CancelPromptInput) -> None:
        clients = [self._client(request.backend)] if request.backend is not None else list(self._clients.values())
        # Deleting or interrupting a prompt a ComfyUI does not have changes nothing there, so it is stopped on
        # every backend that answers: one that does not cannot be running it for anyone (its prompts are run
        # elsewhere once it is lost). Only when none answers is the cancel retried.
        outcomes = await asyncio.gather(*(stop_prompt(client, request.prompt_id) for client in clients),
                                        return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for failure in failures:
            if not isinstance(failure, ComfyError):
                raise failure
        if failures and len(failures) == len(outcomes):
            error = failures[0]
            assert isinstance(error, ComfyError)
            raise to_application_error(error) from error

    # --- collect_outputs -------------------------------------------------------------------------

    @activity.defn(name="collect_outputs")
    async def collect_outputs(self, request: CollectOutputsInput) -> CollectOutputsResult:
        client = self._client(request.backend)
        files: list[OutputRef] = []
        taken: set[str] = set()
        beat = StepHeartbeat()

        def waiting(warning: JobWarning | None) -> None:
            beat.warning = warning

        try:
            async with heartbeating(lambda: beat.model_dump(by_alias=True)):
                for node_id, entry in _output_files(request.outputs):
                    index = len(files)
                    files.append(await while_unreachable(
                        lambda: self._store_output(client, request, index, node_id, entry, taken),
                        on_wait=waiting, max_wait=request.timeout_seconds,
                    ))
                    beat.done = len(files)
        except ComfyError as error:
            raise to_application_error(error) from error
        logger.info("%d outputs stored", len(files))
        return CollectOutputsResult(files=files)

    async def _store_output(
        self, client: ComfyClient, request: CollectOutputsInput, index: int, node_id: str, entry: dict[str, Any],
        taken: set[str],
    ) -> OutputRef:
        """One output file from ComfyUI's /view, in the job's output format, to storage under `job id / index /
        name`: stored again by a retry, it replaces itself. Streamed to a scratch file and from there to the
        store, so that no file is ever held whole in memory (but for a still image being re-encoded)."""
        download = self._scratch_dir / f"{uuid.uuid4().hex}.download"
        converted = download.with_suffix(".converted")
        try:
            downloaded = await client.download(
                filename=entry["filename"], subfolder=entry.get("subfolder", ""),
                folder_type=entry.get("type", "output"), destination=download,
            )
            file = ScratchFile(path=download, filename=entry["filename"], content_type=downloaded.content_type,
                               size=downloaded.size, sha256=downloaded.sha256)
            if request.output_format is not None and not entry["animated"] and file.content_type.startswith("image/"):
                file = await asyncio.to_thread(
                    in_output_format, file, converted, request.output_format, request.output_quality
                )
            name = file.filename if file.filename not in taken else f"{index}_{file.filename}"
            taken.add(name)
            key = f"{request.job_id}/{index}/{name}"
            # The store's SDK (boto3) blocks, so it runs on a thread; it stays inside this async activity, not a
            # sync activity of its own, because the file it uploads is on this worker's disk: another activity
            # could run on another worker. Heartbeats go on meanwhile, from the event loop.
            await asyncio.to_thread(self._storage.put_file, key, file.path, file.content_type)
        except OSError as exc:  # the scratch disk, a file Pillow cannot decode, or the store (StorageError)
            raise ApplicationError(
                f"storing {entry['filename']} failed: {exc}", type=ErrorCode.STORAGE_ERROR.value
            ) from exc
        finally:
            download.unlink(missing_ok=True)
            converted.unlink(missing_ok=True)
        return OutputRef(
            filename=name, storage_key=key, size=file.size, sha256=file.sha256, content_type=file.content_type,
            node_id=node_id, animated=entry["animated"],
        )


def _output_files(outputs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every file of every output node: images, batches, animated WEBP/PNG, video (under "images" with
    `animated: [true]`), and any other list of {filename, subfolder, type} such as audio or gifs."""
    found = []
    for node_id in sorted(outputs, key=lambda n: (len(n), n)):
        ui = outputs[node_id]
        animated = any(ui.get("animated") or [])
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    found.append((node_id, {**item, "animated": animated}))
    return found
