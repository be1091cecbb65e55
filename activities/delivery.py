"""Webhook delivery: build an event's body once, then post it, signed, one attempt per activity try.

The retry policy is the workflow's (workflows_temporal/webhook_delivery.py); here each attempt is classified:
2xx is delivered; 410 Gone, a host that resolves to an address the gateway may not reach, or a URL that cannot
be posted to at all (a port out of range), stops; anything else (another status, a redirect, which is never
followed, a timeout, a refused connection) is tried again, 429 and 503 after their Retry-After. Every attempt is written to the job's row and log. None changes the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from app.db import session_scope
from app.errors import ErrorCode
from app.jobstore import add_events, record_webhook_attempt
from app.metrics import WEBHOOK_ATTEMPTS, WEBHOOKS_GIVEN_UP
from app.models import (
    BuildWebhookInput,
    BuiltWebhook,
    DeliverWebhookInput,
    DeliverWebhookResult,
    JobEventInput,
    WebhookGivenUpInput,
    WebhookStatus,
)
from app.safe_http import RefusedTarget, TargetUnavailable, describe_url, parse_http_url, send_pinned
from app.settings import Settings
from app.storage import OutputStorage
from app.webhooks.payload import compact_json, webhook_body
from app.webhooks.signing import WebhookSigner
from app.webhooks.targets import resolve_callback

log = logging.getLogger(__name__)

# A receiver's time to answer one attempt, resolving its host included.
ATTEMPT_SECONDS = 10.0
_RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Attempt:
    """What one post of a webhook came to."""

    status_code: int | None
    latency_ms: int
    retry_after_seconds: float | None = None
    error: str | None = None
    refused: bool = False  # the target may not be reached at all: trying again cannot help

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def outcome(self) -> str:
        """As gateway_webhook_attempts counts it."""
        return "delivered" if self.delivered else "refused" if self.refused else "failed"


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None


class WebhookPoster:
    """Posts signed bodies to callback URLs, each attempt's addresses resolved, checked and pinned."""

    def __init__(self, http: httpx.AsyncClient, signer: WebhookSigner | None, allowed_domains: Sequence[str]) -> None:
        self._http = http
        self._signer = signer
        self._allowed = list(allowed_domains)

    async def post(
        self, callback_url: str, webhook_id: str, body: str, *, timeout: float = ATTEMPT_SECONDS,
        request_id: str | None = None,
    ) -> Attempt:
        """One attempt; `request_id`, the job's, goes as X-Request-ID for the receiver to correlate with."""
        if self._signer is None:
            raise ApplicationError(
                "the worker has no WEBHOOK_SECRET; webhooks are never sent unsigned",
                type=ErrorCode.WEBHOOK_NOT_CONFIGURED.value, non_retryable=True,
            )
        now = datetime.now(timezone.utc)
        headers = {
            **self._signer.headers(webhook_id, body, now),
            "Content-Type": "application/json",
            "User-Agent": "comfyui-gateway-webhooks",
            **({"X-Request-ID": request_id} if request_id else {}),
        }
        started = time.monotonic()

        def took() -> int:
            return round((time.monotonic() - started) * 1000)

        try:
            async with asyncio.timeout(timeout):
                url = parse_http_url(callback_url)  # as checked at submit: a trailing dot dropped
                addresses = await resolve_callback(url, self._allowed)
                response = await send_pinned(
                    self._http, "POST", url, addresses, headers=headers, content=body.encode(),
                    timeout=httpx.Timeout(timeout),
                )
                await response.aclose()  # the answer's body is not read: only its status counts
        except RefusedTarget as refused:
            return Attempt(None, took(), error=str(refused), refused=True)
        except TargetUnavailable as unavailable:
            return Attempt(None, took(), error=str(unavailable))
        except TimeoutError:
            return Attempt(None, took(), error=f"no answer within {timeout:g} s")
        except httpx.TransportError as error:
            return Attempt(None, took(), error=f"{type(error).__name__} {error}".rstrip())
        except (ValueError, OverflowError, httpx.InvalidURL) as error:
            # A URL that no submit check foresaw (a job from before one) can never be posted to: said once.
            return Attempt(None, took(), error=f"the callback URL cannot be used: {type(error).__name__} {error}",
                           refused=True)
        status = response.status_code
        if status == 410:
            return Attempt(status, took(), error="the receiver answered 410 Gone", refused=True)
        wait = retry_after_seconds(response.headers.get("retry-after"), now) if status in _RETRY_AFTER_STATUSES else None
        error = None
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        elif not 200 <= status < 300:
            error = f"HTTP {status}"
        return Attempt(status, took(), retry_after_seconds=wait, error=error)


def _shown(callback_url: str) -> str:
    try:
        return describe_url(httpx.URL(callback_url))
    except httpx.InvalidURL:
        return "(not a valid URL)"


class WebhookDelivery:
    """The activities of WebhookDeliveryWorkflow."""

    def __init__(self, poster: WebhookPoster, engine: Engine, storage: OutputStorage, settings: Settings) -> None:
        self._poster = poster
        self._engine = engine
        self._storage = storage
        self._settings = settings

    @activity.defn(name="build_webhook")
    async def build_webhook(self, request: BuildWebhookInput) -> BuiltWebhook:
        """The event's body, once: its result in history is what every attempt sends."""
        if request.job is not None:
            body = webhook_body(request.event, request.job, self._storage, self._settings.resolved_public_base_url)
        else:  # a batch's: made by its workflow, the shape of `GET /batches/{id}`
            assert request.batch is not None
            body = {"event": request.event, **request.batch}
        return BuiltWebhook(
            body=compact_json(body),
            first_retry_seconds=self._settings.webhook_retry_first_interval_s,
            max_retry_interval_seconds=self._settings.webhook_retry_max_interval_s,
            retry_for_seconds=self._settings.webhook_retry_for_s,
        )

    @activity.defn(name="deliver_webhook")
    async def deliver_webhook(self, request: DeliverWebhookInput) -> DeliverWebhookResult:
        number = activity.info().attempt
        attempt = await self._poster.post(request.callback_url, request.webhook_id, request.body,
                                          request_id=request.request_id)
        log.info("webhook %s attempt %d to %s: %s", request.event, number, _shown(request.callback_url),
                 f"HTTP {attempt.status_code}" if attempt.status_code is not None else attempt.error,
                 extra={"webhook_id": request.webhook_id, "delivered": attempt.delivered,
                        "status_code": attempt.status_code, "latency_ms": attempt.latency_ms})
        try:
            await asyncio.to_thread(self._record, request, number, attempt)
        except SQLAlchemyError:
            if not attempt.delivered:
                raise  # retried with the post: the attempt is written next time
            # Delivered: a retry would post the event again. The job's log misses this attempt instead.
            log.warning("webhook %s delivered, but its attempt could not be written", request.webhook_id,
                        exc_info=True)
        WEBHOOK_ATTEMPTS.labels(outcome=attempt.outcome).inc()
        if attempt.delivered:
            assert attempt.status_code is not None
            return DeliverWebhookResult(status_code=attempt.status_code, attempts=number)
        if attempt.refused:
            raise ApplicationError(
                attempt.error or "refused", type=ErrorCode.WEBHOOK_TARGET_REFUSED.value, non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,
            )
        delay = None
        if attempt.retry_after_seconds is not None:
            # Honoured, within the policy's longest wait: a receiver cannot park a webhook past its 24 hours.
            delay = timedelta(seconds=min(attempt.retry_after_seconds, self._settings.webhook_retry_max_interval_s))
        raise ApplicationError(
            attempt.error or "not delivered", type=ErrorCode.WEBHOOK_DELIVERY_FAILED.value, next_retry_delay=delay,
            category=ApplicationErrorCategory.BENIGN,  # the receiver's trouble, in the job's log; not the worker's
        )

    @activity.defn(name="webhook_given_up")
    async def webhook_given_up(self, request: WebhookGivenUpInput) -> None:
        event = JobEventInput(
            key=f"webhook:{request.event}:given-up", at=datetime.now(timezone.utc), kind="webhook",
            message=f"webhook {request.event} given up: {request.reason}",
            data={"event": request.event, "webhookId": request.webhook_id, "delivered": False},
        )

        def write() -> int:
            with session_scope(self._engine) as session:
                return add_events(session, request.job_id, [event])

        if await asyncio.to_thread(write):
            WEBHOOKS_GIVEN_UP.inc()  # by the write that logged it first: a retried activity counts it once

    def _record(self, request: DeliverWebhookInput, number: int, attempt: Attempt) -> None:
        outcome = "delivered" if attempt.delivered else f"not delivered ({attempt.error})"
        answer = f"HTTP {attempt.status_code}" if attempt.status_code is not None else "no answer"
        event = JobEventInput(
            key=f"webhook:{request.event}:{number}", at=datetime.now(timezone.utc), kind="webhook",
            message=f"webhook {request.event} attempt {number}: {answer} in {attempt.latency_ms} ms, {outcome}",
            data={
                "event": request.event, "webhookId": request.webhook_id, "attempt": number,
                "url": _shown(request.callback_url), "statusCode": attempt.status_code,
                "latencyMs": attempt.latency_ms, "delivered": attempt.delivered, "error": attempt.error,
            },
        )
        status = WebhookStatus(delivered=attempt.delivered, attempts=number, last_status=attempt.status_code)
        with session_scope(self._engine) as session:
            record_webhook_attempt(session, request.job_id, status, event)
