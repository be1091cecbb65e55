"""Helpers for the simulator tests: an in-process simulator on a free port, a recording WebSocket
client, the recorded ground truth, and the normalisation that makes recorded and simulated
messages comparable (prompt ids, timestamps and file counters differ from run to run)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
from aiohttp import web

from app.simulator.server import build_app

SHARED = Path("/work/shared/comfyui")
WORKFLOWS = SHARED / "workflows"
RECORDINGS = json.loads((SHARED / "recordings" / "results.json").read_text())
SUMMARY = json.loads((SHARED / "recordings" / "summary.json").read_text())


def workflow(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


@dataclass
class RunningSimulator:
    url: str
    data_dir: Path
    runner: web.AppRunner
    http: aiohttp.ClientSession

    async def post_prompt(self, prompt: dict[str, Any], client_id: str | None = "x", **extra: Any) -> tuple[int, Any]:
        body = {"prompt": prompt, **extra}
        if client_id is not None:
            body["client_id"] = client_id
        async with self.http.post(f"{self.url}/prompt", json=body) as response:
            return response.status, await response.json()

    async def get_json(self, path: str, **params: Any) -> Any:
        async with self.http.get(f"{self.url}{path}", params=params) as response:
            assert response.status == 200, (path, response.status)
            return await response.json()

    async def post(self, path: str, payload: Any = None) -> tuple[int, str]:
        kwargs = {} if payload is None else {"json": payload}
        async with self.http.post(f"{self.url}{path}", **kwargs) as response:
            return response.status, await response.text()

    async def stop(self) -> None:
        await self.http.close()
        await self.runner.cleanup()


async def start_simulator(
    data_dir: Path, time_scale: float = 0.1, node_delay: float = 0.0, parallel: int = 1
) -> RunningSimulator:
    runner = web.AppRunner(build_app(data_dir, time_scale=time_scale, node_delay=node_delay, parallel=parallel))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningSimulator(f"http://127.0.0.1:{port}", data_dir, runner, aiohttp.ClientSession())


class WsRecorder:
    """A /ws client that keeps every message it receives, in order. Text messages are stored as
    {"kind": "text", "type", "data"}; binary frames as {"kind": "binary", "event", "fmt", "payload"}."""

    def __init__(self, sim: RunningSimulator, client_id: str | None = "x"):
        self.sim = sim
        self.client_id = client_id
        self.messages: list[dict[str, Any]] = []
        self._arrived = asyncio.Condition()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None

    async def connect(self, first_message: dict[str, Any] | None = None) -> "WsRecorder":
        query = f"?clientId={self.client_id}" if self.client_id is not None else ""
        self._ws = await self.sim.http.ws_connect(f"{self.sim.url}/ws{query}")
        if first_message is not None:
            await self._ws.send_json(first_message)
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda m: m.get("type") == "status")
        return self

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                entry = {"kind": "text", **json.loads(msg.data)}
            elif msg.type == aiohttp.WSMsgType.BINARY:
                event, fmt = struct.unpack(">II", msg.data[:8])
                entry = {"kind": "binary", "event": event, "fmt": fmt, "payload": msg.data[4:]}
            else:
                continue
            async with self._arrived:
                self.messages.append(entry)
                self._arrived.notify_all()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], start: int = 0, timeout: float = 15.0) -> int:
        """Index of the first message from `start` on that satisfies `predicate`."""

        def find() -> int | None:
            return next((i for i in range(start, len(self.messages)) if predicate(self.messages[i])), None)

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: find() is not None), timeout)
            index = find()
            assert index is not None
            return index

    async def wait_finished(self, prompt_id: str, start: int = 0, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Messages from `start` up to and including `executing {node: null}` for `prompt_id`."""
        end = await self.wait_for(
            lambda m: m.get("type") == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == prompt_id,
            start,
            timeout,
        )
        return self.messages[start : end + 1]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader


def message_types(messages: list[dict[str, Any]]) -> list[str]:
    return [f"binary:{m['event']}" if m["kind"] == "binary" else m["type"] for m in messages]


_COUNTER_FILE = re.compile(r"^(.*)_\d{5}_\.(\w+)$")
_TEMP_PREFIX = re.compile(r"^ComfyUI_temp_[a-z]{5}_")


def normalized(value: Any, prompt_ids: dict[str, str]) -> Any:
    """A copy with what legitimately differs between runs replaced by placeholders: prompt ids,
    timestamps, the file counter and PreviewImage's random suffix in file names, binary frame
    sizes. `current_outputs` (a set in ComfyUI) is sorted."""
    value = copy.deepcopy(value)

    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {
                prompt_ids.get(k, k): ("<timestamp>" if k == "timestamp" else walk(v, k))
                for k, v in node.items()
                if not (k in ("len", "payload", "t") and "event" in node) and k != "t"
            }
        if isinstance(node, list):
            items = [walk(item, key) for item in node]
            return sorted(items) if key == "current_outputs" else items
        if isinstance(node, str):
            if node in prompt_ids:
                return prompt_ids[node]
            if key == "filename":
                node = _TEMP_PREFIX.sub("ComfyUI_temp_<random>_", node)
                return _COUNTER_FILE.sub(r"\1_<counter>_.\2", node)
        return node

    return walk(value)


def as_json(value: Any) -> str:
    """Key order and int/float kind matter to a client parsing JSON, so compare serialised forms."""
    return json.dumps(value, indent=1)
