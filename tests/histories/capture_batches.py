"""Capture BatchWorkflow histories for the batch replay test: `python -m tests.histories.capture_batches`.

Runs real batches through the whole stack (Temporal dev server, worker, API, ComfyUI simulator) and writes each
run of each batch's workflow as JSON in `batch/`. Re-capture only on purpose: the committed histories stand for
batches already running in production.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from contextlib import suppress
from pathlib import Path

from aiohttp import web
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from app.devserver import temporal_cli
from tests.harness import SimulatorProcess, api_client, gateway_settings, migrate_database, serve_locally
from worker.main import running_worker

HERE = Path(__file__).resolve().parent / "batch"


async def capture() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "comfyui").mkdir()
        simulator = SimulatorProcess(root / "comfyui", time_scale=0.1)
        simulator.start()
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_cli(), data_converter=pydantic_data_converter)
        # Two items at once, three a run: a batch of five continues as new once.
        settings = gateway_settings(
            env.client, simulator.url, root / "gateway", "capture-batches", webhook_secret="capture",
            webhook_allowed_domains="127.0.0.1", batch_max_parallel=2, batch_items_per_run=3,
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
                # A template of slow prompts (10 s each), for the batch cancelled while its items run.
                slow = {"id": "slow_capture", "name": "Slow", "workflowJson": simulator.slow_prompt(10)}
                assert (await api.post("/workflows", json=slow)).status_code == 201
                batches = {
                    # Completed in two runs, then its batch.completed webhook.
                    "batch_completed": {"workflowId": "solid_color", "callbackUrl": f"{receiver_url}/hook",
                                        "items": [{"width": 8, "color": index} for index in range(5)]},
                    # Cancelled while its first items run (slow ones): they are signalled, the rest never start.
                    "batch_cancelled": {"workflowId": "slow_capture", "items": [{} for _ in range(4)]},
                    # ... and cancelled through Temporal (the Web UI's Cancel): the same path, then Canceled.
                    "batch_cancelled_in_temporal": {"workflowId": "slow_capture", "items": [{} for _ in range(3)]},
                }
                for name, body in batches.items():
                    if (HERE / f"{name}_run1.json").exists():
                        continue  # committed histories stay as captured
                    batch_id = (await api.post("/batches", json=body)).json()["batchId"]
                    handle = env.client.get_workflow_handle(batch_id)
                    if name.endswith("cancelled"):
                        await asyncio.sleep(2)
                        await api.post(f"/batches/{batch_id}/cancel", json={"reason": "captured for the replay test"})
                    if name.endswith("in_temporal"):
                        await asyncio.sleep(2)
                        await handle.cancel()
                    with suppress(WorkflowFailureError):  # Canceled
                        await handle.result()
                    runs = [execution.run_id
                            async for execution in env.client.list_workflows(f'WorkflowId="{batch_id}"')]
                    for number, run_id in enumerate(reversed(runs), start=1):
                        history = await env.client.get_workflow_handle(batch_id, run_id=run_id).fetch_history()
                        path = HERE / f"{name}_run{number}.json"
                        path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
                        print(f"wrote {path.name}")
        finally:
            await env.shutdown()
            simulator.kill()


if __name__ == "__main__":
    asyncio.run(capture())
