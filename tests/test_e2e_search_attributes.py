"""Operators find jobs in the Temporal Web UI and CLI by the job's own status and its template."""

from __future__ import annotations


from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus

from app.temporal_client import register_search_attributes
from tests.harness import DONE, Gateway, assert_eventually, recorded_workflow, wait_for_job


async def visible(client: Client, query: str, job_id: str) -> WorkflowExecutionStatus | None:
    """The job's Temporal status once the visibility query finds it (visibility lags a moment)."""

    async def found() -> WorkflowExecutionStatus | None:
        async for execution in client.list_workflows(f'WorkflowId = "{job_id}" AND {query}'):
            return execution.status
        return None

    try:
        return await assert_eventually(found, timeout=5, what=f"a visibility query for {job_id}")
    except AssertionError:
        return None


async def test_jobs_are_searchable_by_status_and_template(gateway: Gateway, temporal_client: Client) -> None:
    succeeded = await gateway.run({"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}})
    failed = await gateway.run({"workflowJson": recorded_workflow("fail.json")})
    assert (succeeded["status"], failed["status"]) == ("succeeded", "failed")

    assert await visible(temporal_client, 'JobStatus = "succeeded" AND TemplateId = "solid_color"',
                         succeeded["jobId"]) is WorkflowExecutionStatus.COMPLETED
    assert await visible(temporal_client, 'JobStatus = "failed" AND TemplateId IS NULL',
                         failed["jobId"]) is WorkflowExecutionStatus.FAILED
    assert await visible(temporal_client, 'JobStatus = "queued"', succeeded["jobId"]) is None


async def test_a_job_cancelled_by_signal_is_found_as_cancelled(gateway: Gateway, temporal_client: Client) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    await wait_for_job(gateway.api, job_id, until={"running"})
    assert await visible(temporal_client, 'JobStatus = "running"', job_id) is WorkflowExecutionStatus.RUNNING
    await gateway.api.post(f"/jobs/{job_id}/cancel")
    await wait_for_job(gateway.api, job_id, until=DONE)
    # Temporal sees a workflow that completed normally; the job's own status says what happened.
    assert await visible(temporal_client, 'JobStatus = "cancelled"', job_id) is WorkflowExecutionStatus.COMPLETED


async def test_registering_the_search_attributes_again_changes_nothing(temporal_client: Client) -> None:
    await register_search_attributes(temporal_client)
    described = await temporal_client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=temporal_client.namespace)
    )
    assert {"JobStatus", "TemplateId", "Owner"} <= set(described.custom_attributes)
