"""How many long jobs one worker holds at once: JOBS prompts running together, each reporting progress, on
--backends simulated ComfyUI servers (one process, `python -m app.simulator --instances B --parallel S`) that
each run S = JOBS/B prompts at once (a real ComfyUI runs one: the simulator's parallel lanes stand for a large
fleet's GPUs without a Temporal worker and connection per GPU), behind `comfyui-gateway dev` with one backend
per server of S slots (COMFYUI_URLS `;slots=S`, no prefetch).

Once every job reads `running`, for --window seconds: the worker's RSS (its largest), each part's CPU, `GET
/jobs/{id}` of jobs picked at random by 20 clients in a process of their own (p50/p95/p99, and the API's own
time for them from its request-duration histogram), and every job's prompt activity's last heartbeat, whose
age must stay under COMFYUI_HEARTBEAT_TIMEOUT_S (a late one is a job Temporal would hand to another worker); a
prompt activity on its second try is counted too. Then every job is cancelled (for 30 s at most), and the
gateway's log is kept (long_jobs-gateway.log in the temporary directory). Targets: 1,000 jobs, worker RSS
<= 1 GiB, no late heartbeat, GET p99 <= 50 ms.

    python3 -m bench.long_jobs [--jobs 1000] [--backends 16] [--seconds 600] [--ticks 600] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from temporalio.api.enums.v1 import TimeoutType
from temporalio.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drain import connection_limits  # noqa: E402
from bench.embedded import _start_gateway, cpu_seconds, percentile  # noqa: E402
from tests.harness import REPO_ROOT, free_port  # noqa: E402

HEARTBEAT_TIMEOUT_S = 20.0
SWEEP_EVERY_SECONDS = 10.0


def ticking_prompt(seconds: float, ticks: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestSleepProgress", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": ticks}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "long"}},
    }


def parts(part: str, root_pid: int) -> list[Path]:
    """The /proc directories of the `comfyui-gateway PART` processes under ROOT_PID (Linux)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            argv = (status.parent / "cmdline").read_bytes().split(b"\0")
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv if word]
        if "app.cli" in words and part in words and int(fields["PPid"]) == root_pid:
            found.append(status.parent)
    return found


def rss_bytes(part: str, root_pid: int) -> int:
    """The summed RSS of the `comfyui-gateway PART` processes under ROOT_PID."""
    total = 0
    for process in parts(part, root_pid):
        with suppress(OSError):
            fields = dict(line.split(":", 1) for line in (process / "status").read_text().splitlines() if ":" in line)
            total += int(fields["VmRSS"].split()[0]) * 1024
    return total


def farm(count: int, parallel: int, root: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """COUNT simulated servers in one process, on consecutive ports, each running PARALLEL prompts at once; their
    URLs. A range of ports of which one is taken makes the process exit: another range is tried."""
    for _ in range(5):
        base = free_port()
        if base + count >= 65000:
            continue
        with open(root / "simulator.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "app.simulator", "--instances", str(count), "--parallel", str(parallel),
                 "--port", str(base),
                 "--data-dir", str(root / "comfyui")], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log)
        urls = [f"http://127.0.0.1:{base + number}" for number in range(count)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{urls[-1]}/system_stats", timeout=1).status_code == 200:
                    return process, urls
            except httpx.TransportError:
                time.sleep(0.2)
        process.kill()
        process.wait()
    raise SystemExit(f"the simulators did not start (see {root / 'simulator.log'})")


async def submit_all(api: httpx.AsyncClient, jobs: int, prompt: dict, clients: int = 50) -> list[str]:
    """Each job sent with an Idempotency-Key of its own, and sent again (the same key) after a 503 or a timeout,
    as the README says a client should: a job the API started before it failed to answer is answered, not
    made twice."""
    ids: list[str] = []
    run = uuid.uuid4().hex

    async def submitted(key: str) -> httpx.Response:
        while True:
            try:
                response = await api.post("/jobs", json={"workflowJson": prompt, "timeoutSeconds": 7200},
                                          headers={"Idempotency-Key": key})
            except httpx.TimeoutException:
                print("  no answer in time; again", flush=True)
                continue
            if response.status_code != 503:
                return response
            print(f"  503 {response.json()['error']['code']}; again in 1 s", flush=True)
            await asyncio.sleep(1)  # the API not connected to Temporal yet, or overloaded

    async def client(number: int, share: int) -> None:
        for job in range(share):
            response = await submitted(f"long-jobs-{run}-{number}-{job}")
            if response.status_code != 202:
                raise SystemExit(f"POST /jobs answered {response.status_code}: {response.text}")
            ids.append(response.json()["jobId"])

    await asyncio.gather(*(client(index, jobs // clients + (index < jobs % clients)) for index in range(clients)))
    return ids


async def count_running(api: httpx.AsyncClient) -> int:
    return (await api.get("/jobs", params={"status": "running", "limit": 1})).json()["count"]


async def heartbeats(temporal: Client, job_ids: list[str], causes: set[str]) -> tuple[float, int, int]:
    """The oldest last heartbeat of the jobs' prompt activities (seconds), how many are on a second try (the
    failures of their first added to CAUSES), and how many jobs have no prompt activity pending."""
    now = datetime.now(timezone.utc)
    oldest, retried, missing = 0.0, 0, 0
    semaphore = asyncio.Semaphore(20)

    async def one(job_id: str) -> None:
        nonlocal oldest, retried, missing
        async with semaphore:
            description = await temporal.get_workflow_handle(job_id).describe()
        pending = [activity for activity in description.raw_description.pending_activities
                   if activity.activity_type.name == "run_prompt"]
        if not pending:
            missing += 1
            return
        beat = pending[0].last_heartbeat_time.ToDatetime(tzinfo=timezone.utc)
        oldest = max(oldest, (now - beat).total_seconds())
        if pending[0].attempt > 1:
            retried += 1
            failure = pending[0].last_failure
            causes.add(f"{failure.message} ({TimeoutType.Name(failure.timeout_failure_info.timeout_type)})"
                       if failure.HasField("timeout_failure_info") else failure.message)

    await asyncio.gather(*(one(job_id) for job_id in job_ids))
    return oldest, retried, missing


def read_at_random(api_url: str, job_ids: list[str], window: float, clients: int = 20
                   ) -> tuple[list[float], dict[str, int]]:
    """`GET /jobs/{id}` of random jobs from CLIENTS clients, each reading again 50 ms after its answer, for WINDOW
    seconds: the milliseconds each read took, and how many answers were not a running job (by status code, or
    the status read). Run in a process of its own: in the bench's, its heartbeat sweeps (a thousand describes
    decoded) held the readers' event loop, and their times with it."""

    async def read() -> tuple[list[float], dict[str, int]]:
        reads: list[float] = []
        unexpected: dict[str, int] = {}
        deadline = time.monotonic() + window
        async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=connection_limits(clients)) as api:
            async def client() -> None:
                while time.monotonic() < deadline:
                    job_id = random.choice(job_ids)
                    begun = time.perf_counter()
                    response = await api.get(f"/jobs/{job_id}")
                    reads.append((time.perf_counter() - begun) * 1000)
                    seen = response.json()["status"] if response.status_code == 200 else str(response.status_code)
                    if seen != "running":
                        unexpected[seen] = unexpected.get(seen, 0) + 1
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(client() for _ in range(clients)))
        return reads, unexpected

    return asyncio.run(read())


async def served_in(api: httpx.AsyncClient) -> dict[str, float]:
    """The API's count of `GET /jobs/{id}` answered so far within each bound (`le`) of its request-duration
    histogram."""
    return {sample.labels["le"]: sample.value
            for family in text_string_to_metric_families((await api.get("/metrics")).text)
            for sample in family.samples
            if sample.name == "gateway_http_request_duration_seconds_bucket"
            and sample.labels.get("method") == "GET" and sample.labels.get("route") == "/jobs/{job_id}"}


async def measure(api_url: str, temporal_address: str, gateway_pid: int, simulators_pid: int, jobs: int,
                  prompt: dict, window: float) -> None:
    temporal = await Client.connect(temporal_address)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=connection_limits(60)) as api:
        started = time.monotonic()
        job_ids = await submit_all(api, jobs, prompt)
        print(f"submitted {len(job_ids)} jobs in {time.monotonic() - started:.1f} s")
        while (running := await count_running(api)) < jobs:
            print(f"  {running} running after {time.monotonic() - started:.0f} s", flush=True)
            if time.monotonic() - started > 1800:
                raise SystemExit("not every job started within 30 minutes")
            await asyncio.sleep(5)
        print(f"all {jobs} running after {time.monotonic() - started:.1f} s")

        causes: set[str] = set()
        rss, oldest_beat, retried, missing = 0, 0.0, 0, 0

        async def watcher() -> None:
            nonlocal rss, oldest_beat, retried, missing
            while time.monotonic() < deadline:
                rss = max(rss, rss_bytes("worker", gateway_pid))
                beat, tries, none = await heartbeats(temporal, job_ids, causes)
                oldest_beat, retried, missing = max(oldest_beat, beat), max(retried, tries), max(missing, none)
                # A sweep is JOBS describes, which at 1,000 jobs every 2 s kept Temporal busy for most of a core
                # beside the reads measured. No late heartbeat is missed between sweeps: it times the prompt's
                # activity out, and its second try is counted.
                await asyncio.sleep(SWEEP_EVERY_SECONDS)

        stack = [gateway_pid, simulators_pid, os.getpid()]
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as readers:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(readers, int)  # the readers' process started (and its imports done) first
            cpu_before, load_before, window_began = cpu_seconds(stack), os.getloadavg()[0], time.monotonic()
            served_before = await served_in(api)
            deadline = time.monotonic() + window  # the watcher's, from when the readers' begins
            reading = loop.run_in_executor(readers, read_at_random, api_url, job_ids, window)
            _, (reads, unexpected) = await asyncio.gather(watcher(), reading)
            spent, lasted = cpu_seconds(stack), time.monotonic() - window_began  # the readers' process included
        served = {bound: count - served_before.get(bound, 0.0) for bound, count in (await served_in(api)).items()}
        cores = {part: (seconds - cpu_before.get(part, 0.0)) / lasted for part, seconds in spent.items()}
        shown = ", ".join(f"{part} {share:.2f}" for part, share in sorted(cores.items(), key=lambda item: -item[1])
                          if share >= 0.005)
        print(f"CPU over the window, in cores: {shown} (the bench's own readers and sweeps are `python3`); load "
              f"average {load_before:.1f} at its start, {os.getloadavg()[0]:.1f} at its end")
        print(f"worker RSS (largest): {rss / 2**20:.0f} MiB (target <= 1024)")
        print(f"oldest last heartbeat seen: {oldest_beat:.1f} s (late past {HEARTBEAT_TIMEOUT_S:g} s); "
              f"prompt activities on a second try: {retried}; jobs with no prompt activity: {missing}")
        for cause in sorted(causes):
            print(f"  a first try ended: {cause}")
        print(f"GET /jobs/{{id}} while they run: {len(reads)} reads, p50 {percentile(reads, 0.5):.1f} ms, "
              f"p95 {percentile(reads, 0.95):.1f} ms, p99 {percentile(reads, 0.99):.1f} ms (target p99 <= 50)")
        if unexpected:
            print(f"  answers that were not a running job: {unexpected}")
        print("  the API's own time for them (its request-duration histogram, from the read's turn to its first "
              "byte): "
              + ", ".join(f"{served[bound] / served['+Inf']:.1%} within {float(bound) * 1000:g} ms"
                          for bound in ("0.005", "0.01", "0.025", "0.05", "0.1") if served.get("+Inf")))
        # The gateway and the simulators are stopped next: the cancels stop the prompts sooner, if they can.
        with suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(api.post(f"/jobs/{job_id}/cancel", json={"reason": "bench over"})
                                       for job_id in job_ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--backends", type=int, default=16,
                        help="simulated servers (backends), sharing the jobs' slots evenly (at most 64 each)")
    parser.add_argument("--seconds", type=float, default=600, help="how long each prompt runs")
    parser.add_argument("--ticks", type=int, default=600, help="progress messages each prompt sends")
    parser.add_argument("--window", type=float, default=60, help="seconds measured once all jobs run")
    arguments = parser.parse_args()
    backends = min(arguments.backends, arguments.jobs)
    slots = -(-arguments.jobs // backends)
    if slots > 64:
        parser.error(f"{arguments.jobs} jobs need more than 64 slots on each of {backends} backends: add backends")
    print(f"{arguments.jobs} jobs on {backends} backends of {slots} slots")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        simulators, urls = farm(backends, slots, root)
        gateway = None
        try:
            temporal_address = f"127.0.0.1:{free_port()}"
            gateway, api_url = _start_gateway(root, {
                "COMFYUI_URLS": ",".join(f"sim{number}={url};slots={slots}" for number, url in enumerate(urls, 1)),
                "COMFYUI_PREFETCH": "0", "COMFYUI_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
                "API_MAX_CONCURRENT_REQUESTS": "2000",
            }, temporal_address, REPO_ROOT)
            asyncio.run(measure(api_url, temporal_address, gateway.pid, simulators.pid, arguments.jobs,
                                ticking_prompt(arguments.seconds, arguments.ticks), arguments.window))
        finally:
            try:
                if gateway is not None:
                    gateway.terminate()  # `dev` stops its processes: the worker lets its prompts go first
                    gateway.wait(timeout=120)
                    kept = Path(tempfile.gettempdir()) / "long_jobs-gateway.log"
                    shutil.copyfile(root / "gateway.log", kept)
                    with open(kept, errors="replace") as lines:
                        outages = sum("is unreachable" in line for line in lines)
                    print(f"the gateway's log: {kept} ({outages} backends seen as unreachable)")
            finally:
                simulators.kill()
                simulators.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
