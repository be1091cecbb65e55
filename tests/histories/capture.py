"""Capture GenerationWorkflow and RetentionWorkflow histories for the replay test:
`python -m tests.histories.capture`.

Runs real jobs through the whole stack (Temporal dev server, worker, API, ComfyUI simulator) and writes each
workflow's history as JSON next to this file. Re-capture only on purpose: the committed histories are what
proves that a change to the workflow still replays the jobs already running in production.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from aiohttp import web
from sqlalchemy import update
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from app.db import make_engine, session_scope
from app.devserver import temporal_cli
from app.models import CancelRequest, RetentionInput
from app.settings import Settings
from app.tables import JobRow
from app.temporal_endings import started_input
from tests.harness import (
    DONE,
    SimulatorProcess,
    api_client,
    gateway_settings,
    migrate_database,
    recorded_workflow,
    reset_job,
    serve_locally,
    wait_for_job,
)
from worker.main import running_worker
from workflows_temporal.generation import GenerationWorkflow
from workflows_temporal.retention import RetentionWorkflow

HERE = Path(__file__).resolve().parent
# A 1x1 red PNG, inline: the job stages it on ComfyUI before running.
RED_PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


async def capture() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "comfyui").mkdir()
        simulator = SimulatorProcess(root / "comfyui", time_scale=0.1)
        simulator.start()
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_cli(), data_converter=pydantic_data_converter
        )
        settings = gateway_settings(
            env.client, simulator.url, root / "gateway", "capture",
            webhook_secret="capture", webhook_allowed_domains="127.0.0.1", cache_enabled=True,
        )
        migrate_database(settings)
        receiver = web.Application()
        receiver.router.add_post("/hook", lambda _: web.Response(status=204))
        try:
            async with (
                serve_locally(receiver) as receiver_url,
                running_worker(env.client, settings),
                api_client(settings, env.client) as api,
            ):
                jobs = {
                    "generation_succeeded": {"workflowJson": recorded_workflow("batch.json")},
                    "generation_with_image_input": {"workflowId": "invert_image", "inputs": {"image": RED_PIXEL}},
                    "generation_failed": {"workflowJson": recorded_workflow("fail.json")},
                    "generation_cancelled": {"workflowJson": simulator.slow_prompt(10)},
                    # Since the job-search-attributes patch: the workflow upserts JobStatus and TemplateId.
                    "indexed_template_job_succeeded": {"workflowId": "solid_color", "inputs": {"width": 8}},
                    "indexed_generation_cancelled": {"workflowJson": simulator.slow_prompt(10)},
                    # Since the webhooks patch: the job's end starts its WebhookDeliveryWorkflow (a child).
                    "webhook_job_succeeded": {
                        "workflowId": "solid_color", "inputs": {"width": 8}, "callbackUrl": f"{receiver_url}/hook",
                        "webhookEvents": ["job.succeeded", "job.progress"],
                    },
                    # A result cache hit (the job below is run once before): no activity, the source's outputs.
                    "cache_hit_succeeded": {"workflowId": "solid_color", "inputs": {"width": 8, "color": 1}},
                    # Since the job-owner patch: the first upsert has Owner too (here the open mode's "anonymous").
                    "owned_template_job_succeeded": {"workflowId": "solid_color", "inputs": {"width": 8}},
                    # Since the api-rendered-prompt patch: the job carries the prompt the API rendered (its inline
                    # image already a stored reference), and no render_prompt runs.
                    "api_rendered_image_job_succeeded": {"workflowId": "invert_image", "inputs": {"image": RED_PIXEL}},
                    # Since the fleet patch: placed through the shared queue, its image staged inside run_prompt
                    # on the backend that polled it, collected from the backend the result names.
                    "fleet_job_with_image_input": {"workflowId": "invert_image", "inputs": {"image": RED_PIXEL}},
                    # ... and cancelled on the backend its prompt_started signal named.
                    "fleet_generation_cancelled": {"workflowJson": simulator.slow_prompt(10)},
                    # ... and reset by an operator to its first task while it ran: the new run's attempt records
                    # its reset-run-prompt marker and has a prompt id of its own.
                    "fleet_reset_job_succeeded": {"workflowJson": simulator.slow_prompt(5)},
                    # With a priority: its run_prompt (and its start) carry the priority key and its owner as the
                    # fairness key.
                    "prioritized_job_succeeded": {"workflowId": "solid_color", "inputs": {"width": 8},
                                                  "priority": "high"},
                    # Since the collect-in-prompt patch: run_prompt stores the outputs itself, and no
                    # collect_outputs is scheduled.
                    "collected_in_prompt_job_succeeded": {"workflowId": "solid_color", "inputs": {"width": 8}},
                    # Since the operator-console patch: Priority and BatchId upserted with the first status, Backend
                    # as the job is placed (here an urgent batch item, started as a batch starts its items) ...
                    "console_batch_item_succeeded": {"workflowId": "solid_color", "inputs": {"width": 8}},
                    # ... and cancelled through the API by Temporal's cancellation: the workflow ends as Canceled.
                    "console_generation_cancelled": {"workflowJson": simulator.slow_prompt(10)},
                    # ... and stopped by a cancel signal that stops it (one sent without temporal_cancel_follows),
                    # the API's cancel following at once: its cancellation lands while the job stops its prompt
                    # and records its end, which it cuts short of neither; the workflow ends as Canceled.
                    "console_signalled_job_cancelled": {"workflowJson": simulator.slow_prompt(10)},
                }
                for name, body in jobs.items():
                    if (HERE / f"{name}.json").exists():
                        continue  # committed histories stay as captured: they stand for jobs of older releases
                    if name.startswith("cache_hit"):
                        source = (await api.post("/jobs", json=body)).json()["jobId"]
                        await wait_for_job(api, source, until=DONE)
                    job_id = (await api.post("/jobs", json=body)).json()["jobId"]
                    if name.endswith("batch_item_succeeded"):
                        await wait_for_job(api, job_id, until=DONE)
                        job_id = await start_as_batch_item(env.client, job_id, settings.temporal_task_queue)
                    if name.endswith("cancelled"):
                        await wait_for_job(api, job_id, until={"running"})
                        if name == "console_signalled_job_cancelled":
                            await env.client.get_workflow_handle(job_id).signal(GenerationWorkflow.cancel, CancelRequest(
                                reason="captured for the replay test", actor="batch"))
                        cancelled = await api.post(f"/jobs/{job_id}/cancel", json={"reason": "captured for the replay test"})
                        assert cancelled.status_code == 200, cancelled.text
                    if name.endswith("reset_job_succeeded"):
                        await wait_for_job(api, job_id, until={"running"})
                        await reset_job(env.client, job_id, reason="captured for the replay test")
                    await wait_for_job(api, job_id, until=DONE)
                    history = await env.client.get_workflow_handle(job_id).fetch_history()
                    (HERE / f"{name}.json").write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
                    print(f"wrote {name}.json")
                if not (HERE / "retention_deleted_jobs.json").exists():
                    await capture_retention(env.client, settings, api)
        finally:
            await env.shutdown()
            simulator.kill()


async def start_as_batch_item(client: Client, job_id: str, task_queue: str) -> str:
    """The job's input again, as a batch starts its items: an urgent item of a batch, under an id of its own."""
    started = await started_input(client, client.get_workflow_handle(job_id))
    item = started.model_copy(update={"job_id": str(uuid.uuid4()), "priority": 1, "batch_id": str(uuid.uuid4())})
    await client.start_workflow(GenerationWorkflow.run, item, id=item.job_id, task_queue=task_queue)
    return item.job_id


async def capture_retention(client, settings: Settings, api: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    """Three jobs aged past retention, deleted in batches of two: find, delete, find, delete."""
    job_ids = [(await api.post("/jobs", json={"workflowId": "solid_color", "inputs": {"width": 8}})).json()["jobId"]
               for _ in range(3)]
    for job_id in job_ids:
        await wait_for_job(api, job_id, until=DONE)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(engine) as session:
        aged = datetime.now(timezone.utc) - timedelta(days=40)
        session.execute(update(JobRow).where(JobRow.job_id.in_(job_ids)).values(completed_at=aged))
        session.commit()
    engine.dispose()
    handle = await client.start_workflow(
        RetentionWorkflow.run, RetentionInput(retention_days=30, batch_size=2), id=f"retention-{uuid.uuid4()}",
        task_queue=settings.temporal_task_queue,
    )
    await handle.result()
    history = await handle.fetch_history()
    (HERE / "retention_deleted_jobs.json").write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    print("wrote retention_deleted_jobs.json")


if __name__ == "__main__":
    asyncio.run(capture())
