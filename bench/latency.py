"""How much time the gateway adds to a ComfyUI job, on the embedded stack.

Starts the ComfyUI simulator and `comfyui-gateway dev` (Temporal dev server + worker + API) as their own
processes, exactly as a user runs them, then acts as an outside client: submits N zero-length jobs
(EmptyImage 64² → SaveImage) one at a time and prints, at p50 and p95, the time from `POST /jobs` until the
outputs are stored (the job's completedAt) minus ComfyUI's own execution time (executionTimeMs), and what a
client polling `GET /jobs/{id}` sees. Twice: with the jobs 300 ms apart (the gateway's own cost per job), and
back to back (each job submitted the moment the previous one finished).

    python bench/latency.py [--jobs 50] [--poll-ms 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.embedded import WARM_UP_JOBS, ZERO_LENGTH_PROMPT, percentile, simulated_gateway  # noqa: E402


def measure(base_url: str, jobs: int, poll_seconds: float, gap_seconds: float) -> tuple[list[float], list[float]]:
    added: list[float] = []
    observed: list[float] = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for index in range(jobs + WARM_UP_JOBS):
            time.sleep(gap_seconds)
            started = time.perf_counter()
            response = client.post("/jobs", json={"workflowJson": ZERO_LENGTH_PROMPT})
            response.raise_for_status()
            job_id = response.json()["jobId"]
            while (job := client.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
                time.sleep(poll_seconds)
            finished = time.perf_counter()
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
            if index < WARM_UP_JOBS:
                continue
            timing = job["timing"]
            total = datetime.fromisoformat(timing["completedAt"]) - datetime.fromisoformat(timing["createdAt"])
            added.append(total.total_seconds() * 1000 - (timing["executionTimeMs"] or 0))
            observed.append((finished - started) * 1000)
    return added, observed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--poll-ms", type=float, default=20, help="how often the client asks GET /jobs/{id}")
    arguments = parser.parse_args()
    with simulated_gateway() as base_url:
        results = {gap: measure(base_url, arguments.jobs, arguments.poll_ms / 1000, gap) for gap in (0.3, 0.0)}
    print(f"{arguments.jobs} zero-length ComfyUI jobs, one at a time, on `comfyui-gateway dev` + the simulator;"
          f" clients poll every {arguments.poll_ms:g} ms")
    for gap, (added, observed) in results.items():
        label = "jobs 300 ms apart" if gap else "back to back     "
        print(f"{label}: gateway-added (POST /jobs -> outputs stored, minus ComfyUI execution)"
              f" p50 {percentile(added, 0.5):.1f} ms, p95 {percentile(added, 0.95):.1f} ms,"
              f" mean {statistics.fmean(added):.1f} ms; client sees succeeded after"
              f" p50 {percentile(observed, 0.5):.1f} ms, p95 {percentile(observed, 0.95):.1f} ms")

if __name__ == "__main__":
    main()
