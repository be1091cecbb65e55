"""Operators find jobs in the Temporal Web UI and CLI by the job's own status, its template, owner, backend,
priority and batch; each job answer links to its workflow there."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus

from app.temporal_client import SearchAttributesMissing, register_search_attributes
from app.temporal_endings import started_input
from tests.harness import DONE, Gateway, assert_eventually, recorded_workflow, wait_for_job
from workflows_temporal.generation import GenerationWorkflow

UI = "https://temporal-ui.example.com"


async def found_now(client: Client, query: str, job_id: str) -> WorkflowExecutionStatus | None:
    async for execution in client.list_workflows(f'WorkflowId = "{job_id}" AND ({query})'):
        return execution.status
    return None


async def visible(client: Client, query: str, job_id: str) -> WorkflowExecutionStatus | None:
    """The job's Temporal status once the visibility query finds it (visibility lags a moment)."""
    try:
        return await assert_eventually(lambda: found_now(client, query, job_id), timeout=5,
                                       what=f"a visibility query for {job_id}")
    except AssertionError:
        return None


async def run_as_batch_item(gateway: Gateway, client: Client, job_id: str, batch_id: str) -> str:
    """The job's input again, as a batch starts its items: an urgent item of `batch_id`, under an id of its own."""
    started = await started_input(client, client.get_workflow_handle(job_id))
    item = started.model_copy(update={"job_id": str(uuid.uuid4()), "priority": 1, "batch_id": batch_id})
    await client.start_workflow(GenerationWorkflow.run, item, id=item.job_id,
                                task_queue=gateway.settings.temporal_task_queue)
    return item.job_id


@pytest.mark.settings(temporal_ui_url=f"{UI}/")
async def test_jobs_are_searchable_by_each_attribute(gateway: Gateway, temporal_client: Client) -> None:
    accepted = await gateway.api.post("/jobs", json={"workflowId": "solid_color", "inputs": {"width": 8, "height": 8}})
    assert accepted.json()["temporalUiUrl"] == f"{UI}/namespaces/default/workflows/{accepted.json()['jobId']}"
    succeeded, failed = await asyncio.gather(
        wait_for_job(gateway.api, accepted.json()["jobId"], until=DONE),
        gateway.run({"workflowJson": recorded_workflow("fail.json")}),
    )
    batch_id = str(uuid.uuid4())
    item = await wait_for_job(
        gateway.api, await run_as_batch_item(gateway, temporal_client, succeeded["jobId"], batch_id), until=DONE)
    assert (succeeded["status"], failed["status"], item["status"]) == ("succeeded", "failed", "succeeded")
    assert succeeded["temporalUiUrl"] == f"{UI}/namespaces/default/workflows/{succeeded['jobId']}"
    listed = (await gateway.api.get("/jobs", params={"status": "failed"})).json()["jobs"]
    assert [job["temporalUiUrl"] for job in listed] == [f"{UI}/namespaces/default/workflows/{failed['jobId']}"]

    one, other = succeeded["jobId"], item["jobId"]
    found = {
        (query, job_id): await visible(temporal_client, query, job_id)
        for query, job_id in [
            ('JobStatus = "succeeded" AND TemplateId = "solid_color"', one),
            ('JobStatus = "failed" AND TemplateId IS NULL', failed["jobId"]),
            ('Owner = "anonymous" AND Backend = "comfyui-1"', one),
            ("Priority = 3", one),
            (f'Priority <= 2 AND BatchId = "{batch_id}" AND Backend = "comfyui-1"', other),
        ]
    }
    assert found == {
        ('JobStatus = "succeeded" AND TemplateId = "solid_color"', one): WorkflowExecutionStatus.COMPLETED,
        ('JobStatus = "failed" AND TemplateId IS NULL', failed["jobId"]): WorkflowExecutionStatus.FAILED,
        ('Owner = "anonymous" AND Backend = "comfyui-1"', one): WorkflowExecutionStatus.COMPLETED,
        ("Priority = 3", one): WorkflowExecutionStatus.COMPLETED,
        (f'Priority <= 2 AND BatchId = "{batch_id}" AND Backend = "comfyui-1"', other): WorkflowExecutionStatus.COMPLETED,
    }
    # What a job is not, it is not found as (visibility has caught up with its end: found above).
    assert await found_now(temporal_client, 'JobStatus = "queued"', one) is None
    assert await found_now(temporal_client, "Priority <= 2 OR BatchId IS NOT NULL", one) is None


async def test_a_running_job_is_found_on_its_backend_and_a_cancelled_one_as_canceled(
    gateway: Gateway, temporal_client: Client
) -> None:
    job_id = await gateway.submit({"workflowJson": gateway.comfyui.slow_prompt(10)})
    assert (await gateway.api.get(f"/jobs/{job_id}")).json()["temporalUiUrl"] is None  # no TEMPORAL_UI_URL
    await wait_for_job(gateway.api, job_id, until={"running"})
    assert await visible(temporal_client, 'JobStatus = "running" AND Backend = "comfyui-1"',
                         job_id) is WorkflowExecutionStatus.RUNNING
    await gateway.api.post(f"/jobs/{job_id}/cancel")
    await wait_for_job(gateway.api, job_id, until=DONE)
    assert await visible(temporal_client, 'JobStatus = "cancelled"', job_id) is WorkflowExecutionStatus.CANCELED
    assert await visible(temporal_client, 'ExecutionStatus = "Canceled"', job_id) is WorkflowExecutionStatus.CANCELED


async def test_registering_the_search_attributes_again_changes_nothing(temporal_client: Client) -> None:
    await register_search_attributes(temporal_client)
    described = await temporal_client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=temporal_client.namespace)
    )
    assert {"JobStatus", "TemplateId", "Owner", "Backend", "Priority", "BatchId"} <= set(described.custom_attributes)


async def test_a_namespace_that_refuses_them_gets_the_commands_to_create_them(temporal_client: Client) -> None:
    elsewhere = await Client.connect(temporal_client.service_client.config.target_host, namespace="no-such-namespace")
    with pytest.raises(SearchAttributesMissing) as refused:
        await register_search_attributes(elsewhere)
    message = str(refused.value)
    assert "temporal operator search-attribute create --namespace no-such-namespace --name Priority --type Int" in message
    assert "--name Backend --type Keyword" in message and "--name BatchId --type Keyword" in message
