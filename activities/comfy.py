"""Activities that talk to ComfyUI: run a prompt (submit + follow), stop a prompt, collect its outputs.

`run_prompt` is one activity, submit and wait together, so that one slot of the backend's task queue
covers a prompt from the moment it is queued in ComfyUI until it finishes: jobs beyond MAX_CONCURRENCY
wait in Temporal, never in ComfyUI's in-memory queue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.heartbeats import heartbeating
from activities.job_log import JobLog
from activities.live_row import LiveRow
from activities.progress_webhooks import ProgressWebhooks
from activities.prompt_run import PromptRun, stop_prompt
from activities.waiting import while_unreachable
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.errors import ErrorCode
from app.redaction import Redactor
from app.models import (
    CancelPromptInput,
    CollectOutputsInput,
    CollectOutputsResult,
    JobWarning,
    OutputRef,
    ProgressWebhook,
    PromptProgress,
    RunPromptInput,
    RunPromptResult,
    StepHeartbeat,
    prompt_id_for,
)
from app.output_formats import ScratchFile, in_output_format
from app.storage import OutputStorage


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


# Tries of one prompt's activity (worker crashes, faults of the gateway's own); past this, the job fails.
MAX_PROMPT_TRIES = 20


def unknown_backend(backend: str) -> ApplicationError:
    return ApplicationError(
        f"unknown ComfyUI backend {backend!r}", type=ErrorCode.CONFIGURATION_ERROR.value, non_retryable=True
    )


# A job's progress webhooks for one prompt run: (job id, what the job asked for) → its sender.
ProgressWebhooksFactory = Callable[[str, ProgressWebhook], ProgressWebhooks]


class ComfyActivities:
    def __init__(
        self, clients: Mapping[str, ComfyClient], storage: OutputStorage, engine: Engine, scratch_dir: Path,
        progress_webhooks: ProgressWebhooksFactory | None = None,
    ) -> None:
        self._clients = clients
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
                f"following prompt {prompt_id_for(request.job_id, request.attempt)} was tried {MAX_PROMPT_TRIES} "
                "times without an end (see the worker's log)", type=ErrorCode.INTERNAL_ERROR.value, non_retryable=True,
            )
        details = activity.info().heartbeat_details
        progress = (
            PromptProgress.model_validate(details[0])
            if details
            else PromptProgress(prompt_id=prompt_id_for(request.job_id, request.attempt))
        )
        redactor = Redactor(request.redacted_texts)
        log = JobLog(self._engine, request.job_id, redactor)
        run = PromptRun(self._client(request.backend), request, progress, log)
        live_row = LiveRow(self._engine, request.job_id, request.attempt)
        webhooks = (
            self._progress_webhooks(request.job_id, request.progress_webhook)
            if request.progress_webhook is not None and self._progress_webhooks is not None else None
        )

        def after_heartbeat() -> None:
            live_row.offer(progress.live())
            if webhooks is not None:
                webhooks.offer(progress)

        try:
            async with heartbeating(lambda: run.tick().model_dump(by_alias=True), after_heartbeat):
                return await while_unreachable(run.run, on_wait=run.waiting, give_up=run.past_time_limit)
        except ComfyError as error:
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
            # running so that the next attempt re-attaches to it.
            if cancellation is not None and (cancellation.cancel_requested or cancellation.not_found):
                await asyncio.shield(run.stop())
            raise
        finally:
            await live_row.close()
            if webhooks is not None:
                await webhooks.close()
            await log.flush(force=True)

    # --- cancel_prompt ---------------------------------------------------------------------------

    @activity.defn(name="cancel_prompt")
    async def cancel_prompt(self, request: CancelPromptInput) -> None:
        try:
            await stop_prompt(self._client(request.backend), request.prompt_id)
        except ComfyError as error:
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
