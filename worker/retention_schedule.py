"""The Temporal Schedule that runs RetentionWorkflow every hour, kept by the worker at start-up to match
RETENTION_DAYS: created when missing, updated when what it starts or when has changed, deleted when
RETENTION_DAYS is unset. An operator pauses it in the Temporal Web UI (Schedules) or with
`temporal schedule toggle --pause`; an update keeps the pause and its note, so a restart does not undo it.

Every worker of a deployment should have the same RETENTION_DAYS: each one that starts makes the schedule
match its own. Several starting at once are fine (creating one that another just made is not an error).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Literal

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.service import RPCError, RPCStatusCode

from app.models import RetentionInput
from app.settings import Settings
from workflows_temporal.retention import RetentionWorkflow

log = logging.getLogger(__name__)

RETENTION_INTERVAL = timedelta(hours=1)
# A run that takes longer ends there; the next one carries on where it stopped (deleting is idempotent).
_RUN_TIMEOUT = timedelta(hours=6)

ScheduleChange = Literal["created", "updated", "unchanged", "deleted", "absent"]


def retention_schedule_id(settings: Settings) -> str:
    """One per deployment: the task queue names the deployment."""
    return f"{settings.temporal_task_queue}.retention"


def _wanted(settings: Settings, retention_days: int) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            RetentionWorkflow.run,
            RetentionInput(retention_days=retention_days),
            id=retention_schedule_id(settings),  # Temporal appends each run's scheduled time
            task_queue=settings.temporal_task_queue,
            execution_timeout=_RUN_TIMEOUT,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=RETENTION_INTERVAL)]),
        # A run still going when the next is due: the next is skipped. After an outage, one run catches up.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=RETENTION_INTERVAL),
    )


async def _matches(client: Client, current: Schedule, wanted: Schedule) -> bool:
    action, wanted_action = current.action, wanted.action
    assert isinstance(wanted_action, ScheduleActionStartWorkflow)
    if not isinstance(action, ScheduleActionStartWorkflow):
        return False
    decoded = await client.data_converter.decode(action.args, [RetentionInput]) if len(action.args) == 1 else []
    return (
        [interval.every for interval in current.spec.intervals] == [RETENTION_INTERVAL]
        and not current.spec.calendars and not current.spec.cron_expressions
        and current.policy.overlap is wanted.policy.overlap
        and current.policy.catchup_window == wanted.policy.catchup_window
        and action.workflow == wanted_action.workflow
        and action.id == wanted_action.id
        and action.task_queue == wanted_action.task_queue
        and action.execution_timeout == wanted_action.execution_timeout
        and decoded == list(wanted_action.args)
    )


async def ensure_retention_schedule(client: Client, settings: Settings) -> ScheduleChange:
    """Make the deployment's retention schedule match RETENTION_DAYS; says what it changed."""
    handle = client.get_schedule_handle(retention_schedule_id(settings))
    if settings.retention_days is None:
        try:
            await handle.delete()
        except RPCError as error:
            if error.status is not RPCStatusCode.NOT_FOUND:
                raise
            return "absent"
        log.info("retention schedule %s deleted: RETENTION_DAYS is unset", handle.id)
        return "deleted"

    wanted = _wanted(settings, settings.retention_days)
    try:
        await client.create_schedule(handle.id, wanted)
        log.info("retention schedule %s created: hourly, jobs ended over %d days ago", handle.id, settings.retention_days)
        return "created"
    except ScheduleAlreadyRunningError:
        pass
    changed = False

    async def update(existing: ScheduleUpdateInput) -> ScheduleUpdate | None:
        nonlocal changed
        current = existing.description.schedule
        changed = not await _matches(client, current, wanted)
        if not changed:
            return None
        wanted.state = current.state  # an operator's pause and note stay
        return ScheduleUpdate(schedule=wanted)

    await handle.update(update)
    if changed:
        log.info("retention schedule %s updated: hourly, jobs ended over %d days ago", handle.id, settings.retention_days)
        return "updated"
    return "unchanged"
