"""Committed histories of real jobs must replay on today's GenerationWorkflow: a change that would break
the jobs already running (non-determinism) fails here. Capture new ones with `python -m tests.histories.capture`."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows_temporal.generation import GenerationWorkflow

HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def test_histories_are_committed() -> None:
    assert {path.stem for path in HISTORIES} >= {
        "generation_succeeded", "generation_failed", "generation_cancelled", "generation_with_image_input",
        "indexed_template_job_succeeded", "indexed_generation_cancelled",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_history_replays(path: Path) -> None:
    replayer = Replayer(workflows=[GenerationWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(WorkflowHistory.from_json(path.stem, path.read_text()))
    assert result.replay_failure is None
