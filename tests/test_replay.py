"""Committed histories of real jobs (and of a retention run) must replay on today's GenerationWorkflow and
RetentionWorkflow: a change that would break the workflows already running (non-determinism) fails here. Capture new ones with `python -m tests.histories.capture`."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from app.models import CancelPromptInput, CollectOutputsInput, DeleteJobsInput, FindExpiredJobsInput, GenerationInput
from app.models import RetentionInput, RunPromptInput, StageImagesInput
from tests.harness import HISTORIES, committed_history
from workflows_temporal.generation import GenerationWorkflow
from workflows_temporal.retention import RetentionWorkflow


def test_histories_are_committed() -> None:
    assert {path.stem for path in HISTORIES} >= {
        "generation_succeeded", "generation_failed", "generation_cancelled", "generation_with_image_input",
        "indexed_template_job_succeeded", "indexed_generation_cancelled", "retention_deleted_jobs", "webhook_job_succeeded",
        "cache_hit_succeeded", "owned_template_job_succeeded", "api_rendered_image_job_succeeded",
        "fleet_job_with_image_input", "fleet_generation_cancelled", "fleet_reset_job_succeeded",
        "prioritized_job_succeeded",
        "console_batch_item_succeeded", "console_generation_cancelled", "console_signalled_job_cancelled",
        "collected_in_prompt_job_succeeded",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_history_replays(path: Path) -> None:
    replayer = Replayer(workflows=[GenerationWorkflow, RetentionWorkflow], data_converter=pydantic_data_converter)
    history = committed_history(path)
    result = await replayer.replay_workflow(history)
    assert result.replay_failure is None


async def test_a_job_that_carries_the_apis_prompt_but_rendered_on_a_worker_from_before_replays() -> None:
    """In a rolling upgrade a new API's job (its prompt rendered) may run its first task on an old worker,
    which renders the prompt itself; the new worker must replay that history as it was made."""
    path = HISTORIES[0].parent / "generation_with_image_input.json"
    history = json.loads(path.read_text())
    [payload] = history["events"][0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"]
    job = json.loads(base64.b64decode(payload["data"]))
    assert "rendered" not in job
    job["rendered"] = {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}}
    payload["data"] = base64.b64encode(json.dumps(job).encode()).decode()
    replayer = Replayer(workflows=[GenerationWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(WorkflowHistory.from_json(path.stem, json.dumps(history)))
    assert result.replay_failure is None


# Each activity the workflow schedules, by the name in history, with the input model today's code reads.
ACTIVITY_INPUTS = {
    "stage_images": StageImagesInput, "run_prompt": RunPromptInput, "collect_outputs": CollectOutputsInput,
    "cancel_prompt": CancelPromptInput, "find_expired_jobs": FindExpiredJobsInput, "delete_jobs": DeleteJobsInput,
}
WORKFLOW_INPUTS = {"GenerationWorkflow": GenerationInput, "RetentionWorkflow": RetentionInput}


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_activities_scheduled_by_older_releases_read_their_inputs_today(path: Path) -> None:
    """A job in flight when the gateway is upgraded has activities scheduled with the old input shapes: the
    new worker must read them as they are."""
    history = committed_history(path)
    scheduled = [event.activity_task_scheduled_event_attributes for event in history.events
                 if event.HasField("activity_task_scheduled_event_attributes")]
    assert scheduled or path.stem.startswith("cache_hit")  # a cache hit only records (local activities)
    for attributes in scheduled:
        model = ACTIVITY_INPUTS[attributes.activity_type.name]
        [decoded] = await pydantic_data_converter.decode(attributes.input.payloads, [model])
        assert isinstance(decoded, model)
    [started] = [event.workflow_execution_started_event_attributes for event in history.events[:1]]
    model = WORKFLOW_INPUTS[started.workflow_type.name]
    [workflow_input] = await pydantic_data_converter.decode(started.input.payloads, [model])
    assert isinstance(workflow_input, model)
