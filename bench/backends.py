"""Throughput with one ComfyUI backend against two: with the GPU as the bottleneck, two should do twice the work.

Runs the stack twice, each on a scratch DATA_DIR: `comfyui-gateway dev` with COMFYUI_URLS naming one simulator
(`sim1=URL`), then a fresh one naming two simulator processes (`sim1=URL,sim2=URL`). Each time it sends JOBS jobs
that ComfyUI runs for COMFYUI_MS (EmptyImage -> TestSleepProgress -> SaveImage) all at once, waits until every job
has ended, and prints jobs per second (the jobs over the time from the first submission to the last job's
completedAt), how many prompts each simulator ran, and the ratio of the two throughputs. Target: about 2x.

    python3 -m bench.backends [--jobs 40] [--comfyui-ms 500] [--max-concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drain import Drain, connection_limits, gateway_batch  # noqa: E402
from bench.embedded import (  # noqa: E402
    WARM_UP_JOBS, ZERO_LENGTH_PROMPT, gateway_reads_backend_list, simulated_stack, timed_prompt,
)


async def run(api_url: str, simulator_urls: list[str], jobs: int, prompt: dict) -> tuple[Drain, list[int]]:
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=connection_limits(jobs + 10)) as api:
        warm_up = await gateway_batch(api, [[{"workflowJson": ZERO_LENGTH_PROMPT}]] * WARM_UP_JOBS)
        if len(warm_up.ended) != WARM_UP_JOBS:
            raise SystemExit(f"the warm-up jobs did not succeed: {warm_up.outcomes}")
        before = [await prompts_run(url) for url in simulator_urls]
        drain = await gateway_batch(api, [[{"workflowJson": prompt}] for _ in range(jobs)], poll_seconds=0.05)
        return drain, [await prompts_run(url) - count for url, count in zip(simulator_urls, before)]


async def prompts_run(simulator_url: str) -> int:
    async with httpx.AsyncClient(base_url=simulator_url, timeout=30) as comfyui:
        return len((await comfyui.get("/history")).raise_for_status().json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    # Long enough that the GPUs, not the gateway, are the bottleneck on a small machine: the gateway spends
    # about 120 ms of CPU per job (bench.burst), so two backends at 200 ms a job would need 1.2 of 2 cores.
    parser.add_argument("--comfyui-ms", type=float, default=500, help="how long ComfyUI runs each job")
    parser.add_argument("--max-concurrency", type=int, default=1, help="the gateway's MAX_CONCURRENCY")
    arguments = parser.parse_args()
    prompt = timed_prompt(arguments.comfyui_ms / 1000)
    results = {}
    for backends in (1, 2):
        with simulated_stack(simulators=backends, backend_list=True,
                             gateway_env={"MAX_CONCURRENCY": str(arguments.max_concurrency)}) as stack:
            results[backends] = asyncio.run(
                run(stack.api_url, [simulator.url for simulator in stack.simulators], arguments.jobs, prompt))

    print(f"{arguments.jobs} jobs of {arguments.comfyui_ms:g} ms on ComfyUI, sent at once; `comfyui-gateway dev` "
          f"with COMFYUI_URLS=sim1=URL[,sim2=URL], MAX_CONCURRENCY={arguments.max_concurrency}")
    print("| backends | succeeded | drain | jobs/s | at most (the GPUs alone) | prompts run per simulator |")
    print("|---|---|---|---|---|---|")
    throughput = {}
    for backends, (drain, per_simulator) in results.items():
        throughput[backends] = len(drain.ended) / drain.drain_seconds
        ceiling = backends * arguments.max_concurrency * 1000 / arguments.comfyui_ms
        print(f"| {backends} | {len(drain.ended)} / {arguments.jobs} | {drain.drain_seconds:.1f} s "
              f"| {throughput[backends]:.2f} | {ceiling:.1f} | {' + '.join(map(str, per_simulator))} |")
    print(f"two backends against one: {throughput[2] / throughput[1]:.2f}x (target about 2x)")
    if not gateway_reads_backend_list():
        print("this gateway has no COMFYUI_URLS: it was given COMFYUI_URL, the first simulator only")
    elif 0 in results[2][1]:
        print("one simulator ran none of the jobs")


if __name__ == "__main__":
    main()
