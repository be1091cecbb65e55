"""Long jobs: a time limit of hours, up to a settable maximum, and a history that does not grow with the
progress ComfyUI reports (progress travels in the prompt activity's heartbeats, never as history events)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from app.settings import Settings
from tests.harness import Gateway, api_alone, api_alone_settings, asgi_client, assert_eventually, error_of, wait_for_job

DONE = {"succeeded", "failed", "cancelled"}
# What the README states: a job that runs once, with one output and no retries, writes at most this many
# events into its history, however many progress messages ComfyUI sends.
HISTORY_EVENTS_BOUND = 50


def ticking_prompt(gateway: Gateway, seconds: float, ticks: int) -> dict[str, Any]:
    """slow.json, whose TestSleepProgress node reports `ticks` progress messages over `seconds` of wall time."""
    prompt = gateway.comfyui.slow_prompt(seconds)
    prompt["2"]["inputs"]["steps"] = ticks
    return prompt


_WORKFLOW_TASK_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
}


def without_workflow_tasks(events: list[EventType.ValueType]) -> list[EventType.ValueType]:
    return [event for event in events if event not in _WORKFLOW_TASK_EVENTS]


async def history_events(client: Client, job_id: str) -> list[EventType.ValueType]:
    history = await client.get_workflow_handle(job_id).fetch_history()
    return [event.event_type for event in history.events]


async def test_the_maximum_time_limit_is_a_setting(tmp_path: Path) -> None:
    async with api_alone(api_alone_settings(tmp_path, max_job_timeout_s=600)) as app, asgi_client(app) as api:
        response = await api.post("/jobs", json={"workflowId": "solid_color", "timeoutSeconds": 601})
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] == "VALIDATION_ERROR"
        assert [field["field"] for field in error["details"]["fields"]] == ["timeoutSeconds"]
        assert "600" in error["details"]["fields"][0]["message"]


def test_the_default_time_limit_must_be_within_the_maximum() -> None:
    with pytest.raises(ValidationError, match="MAX_JOB_TIMEOUT_S"):
        Settings(_env_file=None, comfyui_timeout_ms=7_200_000, max_job_timeout_s=3600)


@pytest.mark.settings(max_job_timeout_s=48 * 3600)
async def test_ten_thousand_progress_ticks_leave_the_history_as_ten_do(
    gateway: Gateway, temporal_client: Client
) -> None:
    """Two jobs of the same graph, one reporting 10 progress ticks, one 10,000; both with a time limit beyond
    the former 24 h maximum. Their histories have the same events: progress is not in history."""
    few = await gateway.run({"workflowJson": ticking_prompt(gateway, 0.5, 10), "timeoutSeconds": 36 * 3600})
    assert few["status"] == "succeeded", few

    many_id = await gateway.submit({"workflowJson": ticking_prompt(gateway, 2, 10_000), "timeoutSeconds": 36 * 3600})

    async def midway() -> dict[str, Any]:
        job = (await gateway.api.get(f"/jobs/{many_id}")).json()
        assert job["status"] == "running" and 0 < job["progress"] < 100, job
        return job

    await assert_eventually(midway, timeout=15, interval=0.1, what="the job's progress read while it runs")
    many = await wait_for_job(gateway.api, many_id, until=DONE)
    assert many["status"] == "succeeded", many

    few_events = await history_events(temporal_client, few["jobId"])
    many_events = await history_events(temporal_client, many_id)
    # How a signal falls among workflow tasks depends on timing (one arriving during a task makes another
    # task); every other event is the job's own doing, the same for both.
    assert without_workflow_tasks(many_events) == without_workflow_tasks(few_events), (many_events, few_events)
    assert len(many_events) <= HISTORY_EVENTS_BOUND, len(many_events)
