"""A running job is read from its row when the row is current, without asking its workflow: the row and the
search attributes describe returns are written by the workflow in one workflow task, and they agree."""

from __future__ import annotations

from typing import Any

from temporalio.client import Client

from api.job_reader import _row_is_current
from app.db import make_engine, session_scope
from app.jobstore import get_job_snapshot
from app.models import JobStatus
from tests.harness import DONE, Gateway, assert_eventually, wait_for_job


async def test_a_running_job_row_agrees_with_what_describe_says(gateway: Gateway, temporal_client: Client) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(20)})

    async def running() -> dict[str, Any]:
        job = (await gateway.api.get(f"/jobs/{job_id}")).json()
        assert job["status"] == "running" and job["progress"] > 0, job
        return job

    await assert_eventually(running, timeout=15, interval=0.1, what="the job read as running, with progress")
    engine = make_engine(gateway.settings.resolved_database_url)
    try:
        with session_scope(engine) as session:
            recorded = get_job_snapshot(session, job_id)
    finally:
        engine.dispose()
    assert recorded is not None and recorded.state.status is JobStatus.running
    assert recorded.state.backend is not None and recorded.state.started_at is not None
    description = await temporal_client.get_workflow_handle(job_id).describe()
    assert _row_is_current(recorded.state, description)  # the read needs no query
    # A row behind its workflow (its record under way), or on another backend, is not taken for it: a query answers.
    assert not _row_is_current(recorded.state.model_copy(update={"status": JobStatus.queued}), description)
    assert not _row_is_current(recorded.state.model_copy(update={"backend": None}), description)

    response = await gateway.api.post(f"/jobs/{job_id}/cancel", json={"reason": "test over"})
    assert response.status_code in (200, 202), response.text
    assert (await wait_for_job(gateway.api, job_id, until=DONE))["status"] == "cancelled"
