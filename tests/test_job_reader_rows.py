"""A running job is read from its row when the row is current, without asking its workflow: the row and the
search attributes describe returns are written by the workflow in one workflow task, and they agree. Once
describe has found it current, the row alone is the job for a while, as long as it says the same."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.client import Client, WorkflowHandle

from api.database import Database
from api.job_reader import CurrentRows, JobReader, LiveViews, _row_is_current, live_views
from api.temporal_connection import TemporalConnection
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


class _Counted:
    """The client, counting the workflows the reader asks Temporal about (a describe each, first)."""

    def __init__(self, client: Client, asked: list[str]) -> None:
        self._client, self._asked = client, asked

    def get_workflow_handle(self, workflow_id: str) -> WorkflowHandle:
        self._asked.append(workflow_id)
        return self._client.get_workflow_handle(workflow_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_a_row_found_current_is_the_job_without_describe_until_it_says_otherwise(
    gateway: Gateway, temporal_client: Client
) -> None:
    describes: list[str] = []
    asked = _Counted(temporal_client, describes)
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(20)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    engine = make_engine(gateway.settings.resolved_database_url)
    try:
        current_rows = CurrentRows()
        # No live view reused: each read reads the row.
        reader = JobReader(Database(engine), TemporalConnection(asked), LiveViews(reuse_seconds=0), current_rows)
        described = await reader.read(job_id)
        # Its first read is its row, at once, while a describe in the background vouches for it.
        assert described.state.status is JobStatus.running and describes == []
        await assert_eventually(lambda: current_rows.vouch(described.state), timeout=5, what="the describe's vouch")
        assert describes == [job_id]
        for _ in range(3):
            from_row = await reader.read(job_id)
            assert from_row.state == described.state and describes == [job_id]
        with session_scope(engine) as session:
            recorded = get_job_snapshot(session, job_id)
        assert recorded is not None and from_row.live == recorded.live  # the row's live columns
        assert current_rows.vouch(recorded.state)
        # A row that says another status, backend or attempt than describe found is not vouched for.
        attempt = recorded.state.attempts
        for changed in ({"status": JobStatus.queued}, {"backend": "elsewhere"}, {"attempts": attempt + 1}):
            assert not current_rows.vouch(recorded.state.model_copy(update=changed))
        # A read that must see the workflow as it is now describes it.
        await reader.read(job_id, reuse_live=False)
        assert describes == [job_id, job_id]
        # Once the time it vouches for runs out, describe is asked again.
        expiring = JobReader(Database(engine), TemporalConnection(asked), LiveViews(reuse_seconds=0),
                             CurrentRows(vouch_seconds=0))
        await expiring.read(job_id)
        await assert_eventually(lambda: not expiring.current_rows.may_answer(described.state), timeout=5,
                                what="the first read's describe, whose vouch ran out at once")
        await expiring.read(job_id)
        assert describes == [job_id] * 4
        # Past half its time, a read is the row still, and one describe in the background vouches for it anew.
        renewing = JobReader(Database(engine), TemporalConnection(asked), live_views(), CurrentRows(vouch_seconds=2))
        await renewing.read(job_id)
        await assert_eventually(lambda: renewing.current_rows.vouch(described.state), timeout=5)
        await asyncio.sleep(1.2)
        await renewing.read(job_id)
        assert describes == [job_id] * 5
        await assert_eventually(lambda: describes == [job_id] * 6, timeout=5, what="the renewal's describe")
        await asyncio.sleep(1.0)  # past the first vouch's time: the renewed one holds
        assert renewing.current_rows.vouch(recorded.state)

        # Terminated in Temporal: the vouched-for row reads as running until the reconciler closes it, within
        # seconds, far sooner than the row would stop being vouched for.
        await temporal_client.get_workflow_handle(job_id).terminate(reason="stuck, says the operator")

        async def ended() -> JobStatus | None:
            status = (await reader.read(job_id)).state.status
            assert status in (JobStatus.running, JobStatus.cancelled), status
            return status if status.is_terminal else None

        assert await assert_eventually(ended, timeout=10, interval=0.2) is JobStatus.cancelled
        assert describes == [job_id] * 6
    finally:
        engine.dispose()
