"""How late a progress change reaches a job's event stream (`GET /jobs/{id}/events`) after ComfyUI reports it.

The simulator runs in this process, so that the moment it sends each `progress` WebSocket message (to the job's
client id, which is its job id) and the moment each `running` event arrives on a stream are read from one
clock. JOBS jobs run at once, each a TestSleepProgress node of STEPS steps, one every --spacing seconds, each
followed by STREAMS streams; an event with a new `progress` is matched to the last progress message of its job
sent before it (the spacing is far above the delays measured, so the match is unambiguous). Prints the delay's
p50/p95/p99/max over every stream's events. Target: a progress change reaches the stream within 1 s.

    python3 -m bench.sse_delay [--jobs 5] [--steps 10] [--spacing 1.5] [--streams 3] [--against CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.simulator.server import SIMULATOR_KEY, build_app  # noqa: E402
from bench.embedded import _start_gateway, percentile, submit_prompts, timed_prompt  # noqa: E402
from tests.harness import REPO_ROOT, free_port  # noqa: E402


async def follow(api: httpx.AsyncClient, job_id: str, arrivals: list[float]) -> None:
    """The stream's `running` events that bring a new progress below 100, as they arrive."""
    progress = -1
    async with api.stream("GET", f"/jobs/{job_id}/events") as response:
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if line == "" and "data" in fields:
                data = json.loads(fields["data"])
                if fields.get("event") == "running" and progress < data["progress"] < 100:
                    arrivals.append(time.monotonic())
                progress = data["progress"]
            fields = {}


async def measure(args: argparse.Namespace, repo_root: Path) -> None:
    sent: dict[str, list[float]] = defaultdict(list)  # job id → when each progress message went out
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        app = build_app(root / "comfyui")
        hub = app[SIMULATOR_KEY].hub
        send = hub.send

        async def timed_send(event: Any, data: Any, sid: str | None = None) -> None:
            if event == "progress" and sid is not None:
                sent[sid].append(time.monotonic())
            await send(event, data, sid)

        hub.send = timed_send  # type: ignore[method-assign]
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        gateway = None
        try:
            gateway, api_url = await asyncio.to_thread(
                _start_gateway, root, {"COMFYUI_URL": f"http://127.0.0.1:{port}",
                                       "COMFYUI_PREFETCH": "0", "MAX_CONCURRENCY": str(args.jobs)},
                f"127.0.0.1:{free_port()}", repo_root)
            async with httpx.AsyncClient(base_url=api_url, timeout=60) as api:
                job_ids = await submit_prompts(api, timed_prompt(args.steps * args.spacing, args.steps), args.jobs)
                arrivals = {(job_id, n): [] for job_id in job_ids for n in range(args.streams)}
                await asyncio.gather(*(follow(api, job_id, times) for (job_id, _), times in arrivals.items()))
        finally:
            if gateway is not None:
                gateway.terminate()
                await asyncio.to_thread(gateway.wait, 30)
            await runner.cleanup()

    delays = []
    for (job_id, _), times in arrivals.items():
        messages = sent[job_id]
        for arrived in times:
            before = bisect.bisect_right(messages, arrived) - 1
            if before >= 0:
                delays.append(arrived - messages[before])
    if not delays:
        raise SystemExit("no progress event was read")
    ms = [delay * 1000 for delay in delays]
    print(f"{args.jobs} jobs x {args.streams} streams, {args.steps} steps {args.spacing:g} s apart "
          f"({repo_root}): {len(ms)} progress events")
    print(f"delay from ComfyUI's progress message to the SSE event: p50 {percentile(ms, 0.5):.0f} ms, "
          f"p95 {percentile(ms, 0.95):.0f} ms, p99 {percentile(ms, 0.99):.0f} ms, max {max(ms):.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--spacing", type=float, default=1.5, help="seconds between two progress messages")
    parser.add_argument("--streams", type=int, default=3, help="streams following each job")
    parser.add_argument("--against", type=Path, default=None, help="measure this checkout's gateway instead")
    args = parser.parse_args()
    asyncio.run(measure(args, (args.against or REPO_ROOT).resolve()))


if __name__ == "__main__":
    main()
