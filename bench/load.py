"""Many clients submitting at once: how fast `POST /jobs` answers, and whether every job gets done.

Starts one ComfyUI simulator and `comfyui-gateway dev` as a user runs them. CLIENTS clients share JOBS jobs;
each posts its share one after the other (the next `POST /jobs` once the previous one got its 202), all
clients at once. Then every job is waited for (`GET /jobs/{id}`, in submission order) until it has ended or
--timeout passed. Prints the accept times (`POST /jobs` until its 202) at p50/p95/p99, how many jobs
succeeded, failed, or never ended (none may be lost), the drain time (first submission to the last job's
completedAt) and jobs per second. The jobs are zero-length by default (ComfyUI answers them from its cache),
so the gateway is what is measured. Target: accept p99 <= 100 ms, every job succeeded.

    python3 -m bench.load [--jobs 1000] [--clients 50] [--think-ms 0] [--comfyui-ms 0] [--max-concurrency 1]
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
    WARM_UP_JOBS, ZERO_LENGTH_PROMPT, Stack, cpu_per_job, percentile, simulated_stack, timed_prompt,
)


async def run(stack: Stack, jobs: int, clients: int, prompt: dict, timeout: float, pause: float
              ) -> tuple[Drain, dict[str, float]]:
    """The batch, and the CPU seconds each part of the stack spent on it."""
    body = {"workflowJson": prompt}
    limits = connection_limits(clients + 10)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, limits=limits) as api:
        warm_up = await gateway_batch(api, [[body]] * WARM_UP_JOBS)
        if len(warm_up.ended) != WARM_UP_JOBS:
            raise SystemExit(f"the warm-up jobs did not succeed: {warm_up.outcomes}")
        shares = [[body] * (jobs // clients + (index < jobs % clients)) for index in range(clients)]
        before = stack.cpu_seconds()
        drain = await gateway_batch(api, shares, poll_seconds=0.05, timeout=timeout, pause_seconds=pause)
        after = stack.cpu_seconds()
        return drain, {part: seconds - before.get(part, 0.0) for part, seconds in after.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--comfyui-ms", type=float, default=0,
                        help="how long ComfyUI runs each job (0: a zero-length job from its cache)")
    parser.add_argument("--max-concurrency", type=int, default=1, help="the gateway's MAX_CONCURRENCY")
    parser.add_argument("--think-ms", type=float, default=0,
                        help="how long each client waits after a 202 before its next POST /jobs (0: at once)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the jobs to end")
    arguments = parser.parse_args()
    prompt = timed_prompt(arguments.comfyui_ms / 1000) if arguments.comfyui_ms else ZERO_LENGTH_PROMPT
    with simulated_stack(gateway_env={"MAX_CONCURRENCY": str(arguments.max_concurrency)}) as stack:
        drain, cpu = asyncio.run(run(stack, arguments.jobs, arguments.clients, prompt, arguments.timeout,
                                     arguments.think_ms / 1000))

    accepted = drain.accept_ms
    succeeded = len(drain.ended)
    failures = drain.failures
    refused = sum(drain.refused.values())
    submitting = drain.submitted - drain.started
    job_kind = f"{arguments.comfyui_ms:g} ms on ComfyUI" if arguments.comfyui_ms else "zero-length"
    apart = f" {arguments.think_ms:g} ms apart" if arguments.think_ms else ""
    print(f"{arguments.jobs} {job_kind} jobs from {arguments.clients} clients, each posting its share one after the "
          f"other{apart}; one simulator; `comfyui-gateway dev` with MAX_CONCURRENCY={arguments.max_concurrency}")
    print("| accept p50 | p95 | p99 | max | all submitted after | succeeded | not succeeded | drain | jobs/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {percentile(accepted, 0.5):.0f} ms | {percentile(accepted, 0.95):.0f} ms "
          f"| {percentile(accepted, 0.99):.0f} ms | {max(accepted):.0f} ms "
          f"| {submitting:.1f} s ({len(accepted) / submitting:.0f}/s) | {succeeded} / {arguments.jobs} "
          f"| {', '.join(f'{count} {outcome}' for outcome, count in failures.items()) or 'none'}"
          f"{''.join(f', {count} refused ({reason})' for reason, count in drain.refused.items())} "
          f"| {drain.drain_seconds:.1f} s | {succeeded / drain.drain_seconds:.1f} |")
    print(f"CPU per job, ms: {cpu_per_job(cpu, arguments.jobs)}")
    if refused:
        print(f"{refused} submissions got no jobId; their accept times are not in the percentiles")
    print(f"target: accept p99 <= 100 ms ({'met' if percentile(accepted, 0.99) <= 100 else 'missed'}); "
          f"none lost ({'met' if succeeded == arguments.jobs else 'missed'})")


if __name__ == "__main__":
    main()
