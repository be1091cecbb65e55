"""The simulator's parallel lanes (`--parallel`, benchmarks only): several prompts of one server run at once,
each reporting to its own client, and an interrupt stops only the prompt it names (a global one, all)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .support import RunningSimulator, WsRecorder, start_simulator, workflow


def ending(messages: list[dict[str, Any]]) -> str:
    """How a prompt ended, from its client's messages (other lanes' `status` broadcasts come in between)."""
    [end] = [m["type"] for m in messages if m.get("type") in ("execution_success", "execution_error",
                                                              "execution_interrupted")]
    return end


def sleeping(seconds: float, steps: int, prefix: str) -> dict[str, Any]:
    prompt = workflow("slow.json")
    prompt["2"]["inputs"].update(seconds=seconds, steps=steps)
    prompt["3"]["inputs"]["filename_prefix"] = prefix
    return prompt


@pytest.fixture
async def lanes(tmp_path: Path) -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(tmp_path / "comfyui", time_scale=1.0, parallel=3)
    yield running
    await running.stop()


async def test_prompts_run_at_once_and_an_interrupt_stops_only_its_own(lanes: RunningSimulator) -> None:
    clients = [await WsRecorder(lanes, name).connect() for name in ("a", "b", "c")]
    prompt_ids = []
    for client in clients:
        status, body = await lanes.post_prompt(sleeping(60, 60, f"gw_{client.client_id}"), client_id=client.client_id)
        assert status == 200, body
        prompt_ids.append(body["prompt_id"])
    for client, prompt_id in zip(clients, prompt_ids):
        await client.wait_for(lambda m, p=prompt_id: m.get("type") == "executing" and m["data"].get("node") == "2"
                              and m["data"].get("prompt_id") == p)
    queue = await lanes.get_json("/queue")
    assert sorted(item[1] for item in queue["queue_running"]) == sorted(prompt_ids) and queue["queue_pending"] == []

    assert await lanes.post("/interrupt", {"prompt_id": prompt_ids[1]}) == (200, "")
    assert ending(await clients[1].wait_finished(prompt_ids[1])) == "execution_interrupted"
    # Each client hears only its own prompt's progress, and the other two run on.
    for client, prompt_id in zip(clients, prompt_ids):
        assert {m["data"]["prompt_id"] for m in client.messages if m.get("type") == "progress"} <= {prompt_id}
    assert sorted(item[1] for item in (await lanes.get_json("/queue"))["queue_running"]) == sorted(
        [prompt_ids[0], prompt_ids[2]])

    assert await lanes.post("/interrupt", {}) == (200, "")  # global: every lane's prompt
    for client, prompt_id in zip((clients[0], clients[2]), (prompt_ids[0], prompt_ids[2])):
        assert ending(await client.wait_finished(prompt_id)) == "execution_interrupted"
    for client in clients:
        await client.close()
