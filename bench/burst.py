"""A burst of short jobs through the gateway against the same jobs posted straight to ComfyUI, in one run.

Starts one ComfyUI simulator and `comfyui-gateway dev` in front of it, as a user runs them. Each round sends
JOBS jobs that ComfyUI runs for about COMFYUI_MS each (EmptyImage -> TestSleepProgress -> SaveImage; 20 ms by
default) all at once, twice against the same simulator process: straight to ComfyUI (every `POST /prompt` at once, then
`GET /history/{id}` until all are done) and through the gateway (every `POST /jobs` at once, then
`GET /jobs/{id}` until all have ended). The rounds alternate which goes first. A batch's drain time runs from
its first submission to the end of its last job as recorded by whoever ran it: ComfyUI's execution_success
timestamp straight, the job's completedAt (outputs stored) through the gateway. Target: the gateway drains
within 1.2x of ComfyUI alone. Also prints the CPU time each process spent per job (from /proc), since on a
small machine the gateway's own work competes with ComfyUI's for the same cores.

    python3 -m bench.burst [--jobs 50] [--rounds 3] [--max-concurrency 1] [--prefetch N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drain import Drain, comfyui_batch, connection_limits, gateway_batch  # noqa: E402
from bench.embedded import WARM_UP_JOBS, Stack, cpu_per_job, percentile, simulated_stack, timed_prompt  # noqa: E402



def checked(drain: Drain, jobs: int, where: str) -> Drain:
    if len(drain.ended) != jobs:
        raise SystemExit(f"{where}: {jobs - len(drain.ended)} of {jobs} jobs did not succeed: ended "
                         f"{drain.failures}, submissions refused {drain.refused}")
    return drain


@dataclass
class Batch:
    drain: Drain
    cpu: dict[str, float]  # CPU seconds each part of the stack spent on the batch; `client`: this process


async def timed_batch(stack: Stack, batch: Awaitable[Drain]) -> Batch:
    before, client_before = stack.cpu_seconds(), time.process_time()
    drain = await batch
    after = stack.cpu_seconds()
    cpu = {part: seconds - before.get(part, 0.0) for part, seconds in after.items()}
    cpu["client"] = time.process_time() - client_before
    return Batch(drain, cpu)


async def one_round(stack: Stack, api: httpx.AsyncClient, comfyui: httpx.AsyncClient, jobs: int,
                    gateway_first: bool, poll_seconds: float, comfyui_seconds: float) -> tuple[Batch, Batch]:
    prompt = timed_prompt(comfyui_seconds)

    async def direct() -> Drain:
        return checked(await comfyui_batch(comfyui, [prompt] * jobs, poll_seconds), jobs, "straight to ComfyUI")

    async def gateway() -> Drain:
        # One client per job: every POST /jobs in flight at once, as the direct batch's POST /prompt are.
        bodies = [[{"workflowJson": prompt}] for _ in range(jobs)]
        return checked(await gateway_batch(api, bodies, poll_seconds), jobs, "through the gateway")

    if gateway_first:
        through = await timed_batch(stack, gateway())
        return await timed_batch(stack, direct()), through
    straight = await timed_batch(stack, direct())
    return straight, await timed_batch(stack, gateway())


async def run(stack: Stack, jobs: int, rounds: int, poll_seconds: float,
              comfyui_seconds: float) -> list[tuple[Batch, Batch]]:
    limits = connection_limits(jobs + 10)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, limits=limits) as api, \
            httpx.AsyncClient(base_url=stack.simulators[0].url, timeout=60, limits=limits) as comfyui:
        await one_round(stack, api, comfyui, WARM_UP_JOBS, False, poll_seconds, comfyui_seconds)
        return [await one_round(stack, api, comfyui, jobs, index % 2 == 1, poll_seconds, comfyui_seconds)
                for index in range(rounds)]


def mean_cpu(batches: list[Batch]) -> dict[str, float]:
    parts = {part for batch in batches for part in batch.cpu}
    return {part: statistics.fmean(batch.cpu.get(part, 0.0) for batch in batches) for part in parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="each round runs both batches; they alternate order")
    parser.add_argument("--max-concurrency", type=int, default=1, help="the gateway's MAX_CONCURRENCY")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="the gateway's COMFYUI_PREFETCH (prompts waiting in ComfyUI's queue per slot); "
                             "default: the gateway's own")
    parser.add_argument("--comfyui-ms", type=float, default=20,
                        help="how long ComfyUI runs each job: at 20 ms the gateway's CPU is the bound on two cores, "
                             "at a few hundred the GPU is, and prefetch decides whether it waits between jobs")
    parser.add_argument("--poll-ms", type=float, default=20,
                        help="how often the client asks whether the next job is done")
    arguments = parser.parse_args()
    gateway_env = {"MAX_CONCURRENCY": str(arguments.max_concurrency)}
    if arguments.prefetch is not None:
        gateway_env["COMFYUI_PREFETCH"] = str(arguments.prefetch)
    with simulated_stack(gateway_env=gateway_env) as stack:
        results = asyncio.run(run(stack, arguments.jobs, arguments.rounds, arguments.poll_ms / 1000,
                                  arguments.comfyui_ms / 1000))

    settings = f"MAX_CONCURRENCY={arguments.max_concurrency}" + (
        f", COMFYUI_PREFETCH={arguments.prefetch}" if arguments.prefetch is not None else "")
    print(f"{arguments.jobs} jobs of ~{arguments.comfyui_ms:g} ms on ComfyUI, sent at once; one simulator; "
          f"`comfyui-gateway dev` with {settings}")
    print("| round | first | straight to ComfyUI | through the gateway | ratio | gateway accept p50 / p99 |")
    print("|---|---|---|---|---|---|")
    for index, (straight_batch, through_batch) in enumerate(results, 1):
        straight, through = straight_batch.drain, through_batch.drain
        print(f"| {index} | {'gateway' if index % 2 == 0 else 'ComfyUI'} | {straight.drain_seconds:.2f} s "
              f"| {through.drain_seconds:.2f} s | {through.drain_seconds / straight.drain_seconds:.2f} "
              f"| {percentile(through.accept_ms, 0.5):.0f} / {percentile(through.accept_ms, 0.99):.0f} ms |")
    straight_drain = statistics.median(straight.drain.drain_seconds for straight, _ in results)
    through_drain = statistics.median(through.drain.drain_seconds for _, through in results)
    print(f"median drain: straight {straight_drain:.2f} s, through the gateway {through_drain:.2f} s, "
          f"ratio {through_drain / straight_drain:.2f} (target <= 1.2)")
    jobs = arguments.jobs
    straight_run = statistics.fmean(ms for straight, _ in results for ms in straight.drain.execution_ms)
    through_run = statistics.fmean(ms for _, through in results for ms in through.drain.execution_ms)
    print(f"per job: straight {straight_drain / jobs * 1000:.1f} ms (ComfyUI's run time {straight_run:.1f} ms), "
          f"through the gateway {through_drain / jobs * 1000:.1f} ms (executionTimeMs {through_run:.1f} ms), "
          f"gateway's extra {(through_drain - straight_drain) / jobs * 1000:.1f} ms")
    print(f"CPU per job, ms, straight: {cpu_per_job(mean_cpu([straight for straight, _ in results]), jobs)}")
    print(f"CPU per job, ms, through the gateway: {cpu_per_job(mean_cpu([through for _, through in results]), jobs)}")


if __name__ == "__main__":
    main()
