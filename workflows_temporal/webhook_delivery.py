"""WebhookDeliveryWorkflow: one webhook event of one job (or of one batch), delivered durably. Workflow id =
webhook-id = `<job id>:webhook:<event>` (`<batch id>:webhook:batch.completed`), so that one event is never
started twice.

A child of GenerationWorkflow, abandoned when the job's workflow closes: the job has ended (its row written)
before this starts, and nothing here can change it. The body is built once, by a local activity whose result
is in history, and the same bytes are posted on every attempt, for up to WEBHOOK_RETRY_FOR_S.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.delivery import ATTEMPT_SECONDS, WebhookDelivery
    from app.errors import NON_RETRYABLE_TYPES
    from app.models import (
        BuildWebhookInput,
        DeliverWebhookInput,
        WebhookDeliveryInput,
        WebhookGivenUpInput,
        WebhookStatus,
    )

# Resolving, posting and writing the attempt down; the receiver itself has ATTEMPT_SECONDS of it.
_ATTEMPT_TIMEOUT = timedelta(seconds=ATTEMPT_SECONDS + 5)
_BOOKKEEPING_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=10))


def webhook_workflow_id(job_id: str, event: str) -> str:
    """The delivery workflow's id, and the `webhook-id` header of every attempt of the event."""
    return f"{job_id}:webhook:{event}"


@workflow.defn(name="WebhookDeliveryWorkflow")
class WebhookDeliveryWorkflow:
    @workflow.run
    async def run(self, request: WebhookDeliveryInput) -> WebhookStatus:
        webhook_id = workflow.info().workflow_id
        built = await workflow.execute_local_activity_method(
            WebhookDelivery.build_webhook,
            BuildWebhookInput(event=request.event, job=request.job, batch=request.batch),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=_BOOKKEEPING_RETRY,
        )
        try:
            result = await workflow.execute_activity_method(
                WebhookDelivery.deliver_webhook,
                DeliverWebhookInput(
                    job_id=request.subject_id, event=request.event, webhook_id=webhook_id,
                    callback_url=request.callback_url, body=built.body, request_id=request.request_id,
                ),
                start_to_close_timeout=_ATTEMPT_TIMEOUT,
                schedule_to_close_timeout=timedelta(seconds=built.retry_for_seconds),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=built.first_retry_seconds),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=built.max_retry_interval_seconds),
                    non_retryable_error_types=NON_RETRYABLE_TYPES,
                ),
            )
        except ActivityError as failure:
            cause = failure.cause
            if isinstance(cause, TemporalTimeoutError):
                reason = f"not delivered within {built.retry_for_seconds:g} s of trying"
            elif isinstance(cause, ApplicationError):
                reason = cause.message
            else:
                reason = str(cause or failure)
            await workflow.execute_local_activity_method(
                WebhookDelivery.webhook_given_up,
                WebhookGivenUpInput(job_id=request.subject_id, event=request.event, webhook_id=webhook_id, reason=reason),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=_BOOKKEEPING_RETRY,
            )
            return WebhookStatus(delivered=False)
        return WebhookStatus(delivered=True, attempts=result.attempts, last_status=result.status_code)
