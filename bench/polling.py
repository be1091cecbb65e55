"""Whether polling slows submission: `POST /jobs` accept times while clients poll their jobs hard.

Starts the ComfyUI simulator and `comfyui-gateway dev` as a user runs them. A submitter posts zero-length jobs
one every GAP ms and times each `POST /jobs` until its 202; meanwhile CLIENTS pollers, in a process of their
own so that they cannot delay the submitter's clock, each ask `GET /jobs/{id}` every POLL ms for the newest
job submitted (so most reads are of live jobs). The pollers speak plain HTTP/1.1 over kept-alive connections:
an HTTP client library would cost the machine's two cores more than the gateway's reads do. Prints accept
p50/p95/p99 with the pollers and, first, without them, and what the reads cost. Target: p99 ≤ 100 ms with 20
clients polling every 20 ms.

    python bench/polling.py [--jobs 100] [--clients 20] [--poll-ms 20] [--gap-ms 250]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embedded import WARM_UP_JOBS, ZERO_LENGTH_PROMPT, percentile, simulated_gateway  # noqa: E402


async def submit(api: httpx.AsyncClient, jobs: int, gap: float, newest: Synchronized) -> list[float]:
    accepted = []
    for index in range(jobs + WARM_UP_JOBS):
        await asyncio.sleep(gap)
        started = time.perf_counter()
        response = await api.post("/jobs", json={"workflowJson": ZERO_LENGTH_PROMPT})
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        newest.value = response.json()["jobId"].encode()
        if index >= WARM_UP_JOBS:
            accepted.append(elapsed)
    return accepted


async def poll(host: str, port: int, every: float, newest: Synchronized, stop: Event, reads: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while not stop.is_set():
            job_id = newest.value.decode()
            if job_id:
                started = time.perf_counter()
                writer.write(f"GET /jobs/{job_id} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                # A read that failed counts as what it is, not as a time.
                reads.append((time.perf_counter() - started) * 1000 if head.startswith(b"HTTP/1.1 200") else -1.0)
            await asyncio.sleep(every)
    finally:
        writer.close()


def run_pollers(base_url: str, clients: int, every: float, newest: Synchronized, stop: Event, reads: Queue) -> None:
    """The pollers' process: CLIENTS connections, each reading the newest job every EVERY seconds."""
    url = httpx.URL(base_url)
    times: list[float] = []

    async def all_of_them() -> None:
        await asyncio.gather(*(poll(url.host, url.port, every, newest, stop, times) for _ in range(clients)))

    asyncio.run(all_of_them())
    reads.put(times)


async def measure(base_url: str, jobs: int, clients: int, every: float, gap: float) -> tuple[list[float], list[float]]:
    newest = multiprocessing.Array("c", 64)
    stop, reads = multiprocessing.Event(), multiprocessing.Queue()
    pollers = multiprocessing.Process(target=run_pollers, args=(base_url, clients, every, newest, stop, reads))
    if clients:
        pollers.start()
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as api:
            accepted = await submit(api, jobs, gap, newest)
    finally:
        stop.set()
    if not clients:
        return accepted, []
    times = reads.get(timeout=60)
    pollers.join(timeout=30)
    return accepted, times


def summary(values: list[float]) -> str:
    return (f"p50 {percentile(values, 0.5):.1f} ms, p95 {percentile(values, 0.95):.1f} ms, "
            f"p99 {percentile(values, 0.99):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--poll-ms", type=float, default=20)
    parser.add_argument("--gap-ms", type=float, default=250,
                        help="time between two submissions (the default keeps ComfyUI's queue short)")
    arguments = parser.parse_args()
    with simulated_gateway() as base_url:
        quiet, _ = asyncio.run(measure(base_url, arguments.jobs, 0, 0, arguments.gap_ms / 1000))
        busy, reads = asyncio.run(
            measure(base_url, arguments.jobs, arguments.clients, arguments.poll_ms / 1000, arguments.gap_ms / 1000)
        )
    print(f"{arguments.jobs} zero-length jobs, one every {arguments.gap_ms:g} ms, on `comfyui-gateway dev` + the simulator")
    print(f"POST /jobs accepted, nobody polling          : {summary(quiet)}")
    print(f"POST /jobs accepted, {arguments.clients} clients polling every {arguments.poll_ms:g} ms: {summary(busy)}")
    answered = [read for read in reads if read >= 0]
    print(f"GET /jobs/{{id}} while polling ({len(answered)} reads, {len(reads) - len(answered)} not 200): "
          f"{summary(answered)}")


if __name__ == "__main__":
    main()
