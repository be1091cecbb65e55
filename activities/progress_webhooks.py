"""A job's opt-in `job.progress` webhooks, sent by the activity that follows its prompt, from its heartbeat:
throttled (one per WEBHOOK_PROGRESS_INTERVAL_S at most, and only when the progress changed), best effort (one
attempt, never retried, one in flight at a time), and never in the job's way: a receiver that is slow, down or
refused only costs that webhook, logged by the worker at DEBUG.

Signed like every webhook; each has a webhook-id of its own. Not in the job's log: the job's final event is.
Its status is `running` as soon as ComfyUI executes the prompt; none is sent once the job's cancel has reached
the activity (its heartbeat's cancellation).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import suppress
from datetime import datetime, timezone

from temporalio import activity

from activities.delivery import WebhookPoster
from app.models import JobState, JobStatus, PromptProgress, ProgressWebhook
from app.storage import OutputStorage
from app.webhooks.events import PROGRESS_EVENT
from app.webhooks.payload import compact_json, instant, webhook_body

log = logging.getLogger(__name__)

# A progress webhook is stale soon: its receiver gets less time than a final event's.
_PROGRESS_TIMEOUT_SECONDS = 5.0


class ProgressWebhooks:
    """One prompt run's progress webhooks."""

    def __init__(
        self, poster: WebhookPoster, storage: OutputStorage, base_url: str, interval_seconds: float,
        job_id: str, webhook: ProgressWebhook,
    ) -> None:
        self._poster = poster
        self._storage = storage
        self._base_url = base_url
        self._interval = interval_seconds
        self._job_id = job_id
        self._webhook = webhook
        self._sent: tuple[int, str | None] | None = None
        self._sent_at = float("-inf")
        self._sender: asyncio.Task[None] | None = None

    def offer(self, progress: PromptProgress) -> None:
        """Send the job's progress if it changed and the interval has passed; returns at once."""
        now = time.monotonic()
        current = (progress.percent, progress.node)
        busy = self._sender is not None and not self._sender.done()
        if not progress.submitted or current == self._sent or busy or now - self._sent_at < self._interval:
            return
        if activity.is_cancelled():
            return  # the job is being cancelled: its next webhook is job.cancelled, not a progress
        self._sent, self._sent_at = current, now
        self._sender = asyncio.create_task(self._send(progress.model_copy()))

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with suppress(asyncio.CancelledError):
                await self._sender

    async def _send(self, progress: PromptProgress) -> None:
        try:  # best effort: nothing about a progress webhook may fail the job, its body included
            state = JobState(
                job_id=self._job_id, status=JobStatus.running if _executing(progress) else JobStatus.queued,
                template_id=self._webhook.template_id, created_at=self._webhook.created_at,
                metadata=self._webhook.metadata,
            )
            body = webhook_body(PROGRESS_EVENT, state, self._storage, self._base_url, progress={
                "percent": progress.percent, "node": progress.node, "queuePosition": progress.queue_position,
                "at": instant(datetime.now(timezone.utc)),
            })
            webhook_id = f"{self._job_id}:webhook:{PROGRESS_EVENT}:{uuid.uuid4().hex[:12]}"
            if activity.is_cancelled():
                return
            attempt = await self._poster.post(
                self._webhook.callback_url, webhook_id, compact_json(body), timeout=_PROGRESS_TIMEOUT_SECONDS,
                request_id=self._webhook.request_id,
            )
        except Exception as error:
            log.debug("job %s: progress webhook not sent: %s", self._job_id, error)
            return
        if not attempt.delivered:
            log.debug("job %s: progress webhook not delivered: %s", self._job_id, attempt.error)


def _executing(progress: PromptProgress) -> bool:
    """ComfyUI executes the prompt: the job is running, though its workflow may not have been told yet (it is
    told once the prompt has run for a moment)."""
    return progress.started_signalled or progress.percent > 0 or progress.node is not None
