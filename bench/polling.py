"""Whether polling slows submission: `POST /jobs` accept times while clients poll their jobs hard.

Starts the ComfyUI simulator and `comfyui-gateway dev` as a user runs them. A submitter posts zero-length jobs
one every GAP ms and times each `POST /jobs` until its 202; meanwhile CLIENTS pollers each ask
`GET /jobs/{id}` every POLL ms for the newest job they know of (so most reads are of live jobs). Prints
accept p50/p95/p99 with the pollers and, first, without them, and what the reads cost. Target: p99 ≤ 100 ms
with 20 clients polling every 20 ms.

    python bench/polling.py [--jobs 200] [--clients 20] [--poll-ms 20] [--gap-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embedded import WARM_UP_JOBS, ZERO_LENGTH_PROMPT, percentile, start_gateway  # noqa: E402
from tests.harness import SimulatorProcess  # noqa: E402


async def submit(api: httpx.AsyncClient, jobs: int, gap: float, newest: list[str]) -> list[float]:
    accepted = []
    for index in range(jobs + WARM_UP_JOBS):
        await asyncio.sleep(gap)
        started = time.perf_counter()
        response = await api.post("/jobs", json={"workflowJson": ZERO_LENGTH_PROMPT})
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        newest.append(response.json()["jobId"])
        if index >= WARM_UP_JOBS:
            accepted.append(elapsed)
    return accepted


async def poll(api: httpx.AsyncClient, every: float, newest: list[str], stop: asyncio.Event, reads: list[float]) -> None:
    while not stop.is_set():
        if newest:
            started = time.perf_counter()
            response = await api.get(f"/jobs/{newest[-1]}")
            response.raise_for_status()
            reads.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(every)


async def measure(base_url: str, jobs: int, clients: int, every: float, gap: float) -> tuple[list[float], list[float]]:
    newest: list[str] = []
    reads: list[float] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 5)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as api:
        pollers = [asyncio.create_task(poll(api, every, newest, stop, reads)) for _ in range(clients)]
        try:
            accepted = await submit(api, jobs, gap, newest)
        finally:
            stop.set()
            await asyncio.gather(*pollers)
    return accepted, reads


def summary(values: list[float]) -> str:
    return (f"p50 {percentile(values, 0.5):.1f} ms, p95 {percentile(values, 0.95):.1f} ms, "
            f"p99 {percentile(values, 0.99):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--poll-ms", type=float, default=20)
    parser.add_argument("--gap-ms", type=float, default=50, help="time between two submissions")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "comfyui").mkdir()
        simulator = SimulatorProcess(root / "comfyui")
        simulator.start()
        gateway, base_url = start_gateway(root, simulator.url)
        try:
            quiet, _ = asyncio.run(measure(base_url, arguments.jobs, 0, 0, arguments.gap_ms / 1000))
            busy, reads = asyncio.run(
                measure(base_url, arguments.jobs, arguments.clients, arguments.poll_ms / 1000, arguments.gap_ms / 1000)
            )
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
            simulator.kill()
    print(f"{arguments.jobs} zero-length jobs, one every {arguments.gap_ms:g} ms, on `comfyui-gateway dev` + the simulator")
    print(f"POST /jobs accepted, nobody polling          : {summary(quiet)}")
    print(f"POST /jobs accepted, {arguments.clients} clients polling every {arguments.poll_ms:g} ms: {summary(busy)}")
    print(f"GET /jobs/{{id}} while polling ({len(reads)} reads)  : {summary(reads)}")


if __name__ == "__main__":
    main()
