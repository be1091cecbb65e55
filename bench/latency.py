"""How much time the gateway adds to a ComfyUI job, on the embedded stack.

Starts the ComfyUI simulator and `comfyui-gateway dev` (Temporal dev server + worker + API) as their own
processes, exactly as a user runs them, then acts as an outside client: submits N jobs that keep ComfyUI
busy 20 ms (EmptyImage 64² → TestSleepProgress → SaveImage; `--comfyui-ms 0` drops the sleep) one at a time
and prints, at p50 and p95, the time from `POST /jobs` until the outputs are stored (the job's completedAt)
minus ComfyUI's own execution time (executionTimeMs), and what a client polling `GET /jobs/{id}` sees. Twice: with the jobs 300 ms apart (the gateway's own cost per job), and
back to back (each job submitted the moment the previous one finished).

Then, for each scenario, where that time goes, from each job's Temporal workflow history (event timestamps,
on the same machine's clock as the client's):

    accept        POST /jobs sent → the workflow started (WorkflowExecutionStarted)
    to prompt     the workflow started → run_prompt scheduled (the queued record, rendering, workflow tasks)
    prompt wait   run_prompt scheduled → a worker started it (ActivityTaskStarted)
    prompt        run_prompt started → completed; ComfyUI's own run (executionTimeMs) is within it
    to collect    run_prompt completed → collect_outputs scheduled (the workflow task between the two)
    collect       collect_outputs scheduled → completed
    finish        the last activity completed → the workflow completed (the final record)
                  (a job whose run_prompt stored its outputs itself has no collect_outputs: no to collect,
                  no collect; such phases show "-" when no job had them)
    seen          the workflow completed → the client's GET /jobs/{id} read `succeeded` (the row is written
                  before the workflow task completes, so this may be below zero)

With `--against CHECKOUT` (another version of the gateway, e.g. `git worktree add /tmp/before HEAD~1`) both
versions run side by side, their jobs taking turns, and each gets its own figures: on a machine whose load
changes from one minute to the next, that compares the two under the same load.

    python bench/latency.py [--jobs 50] [--poll-ms 20] [--comfyui-ms 20] [--against CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.embedded import WARM_UP_JOBS, ZERO_LENGTH_PROMPT, cpu_per_job, percentile, simulated_stack  # noqa: E402
from tests.harness import free_port  # noqa: E402


def prompt_running_for(milliseconds: float) -> dict:
    """The zero-length job with a node between its two that keeps ComfyUI busy for `milliseconds`."""
    if not milliseconds:
        return ZERO_LENGTH_PROMPT
    return {
        **ZERO_LENGTH_PROMPT,
        "2": {**ZERO_LENGTH_PROMPT["2"], "inputs": {**ZERO_LENGTH_PROMPT["2"]["inputs"], "images": ["3", 0]}},
        "3": {"class_type": "TestSleepProgress",
              "inputs": {"image": ["1", 0], "seconds": milliseconds / 1000, "steps": 1}},
    }


PHASES = [
    "accept", "to prompt", "prompt wait", "prompt", "comfyui", "to collect", "collect", "finish", "seen", "total",
]


@dataclass
class JobTimes:
    """One job as the client saw it: wall-clock seconds when it was posted and when it read as succeeded."""

    job_id: str
    posted: float
    seen: float
    execution_ms: float


@dataclass
class Scenario:
    added: list[float] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)
    jobs: list[JobTimes] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=lambda: {phase: [] for phase in PHASES})
    workflow_tasks: list[int] = field(default_factory=list)
    history_events: list[int] = field(default_factory=list)


def run_one(client: httpx.Client, prompt: dict, poll_seconds: float, scenario: Scenario | None) -> None:
    """Submit one job, poll it until it ends, and note it in `scenario` (None: a warm-up)."""
    posted_at = time.time()
    started = time.perf_counter()
    response = client.post("/jobs", json={"workflowJson": prompt})
    response.raise_for_status()
    job_id = response.json()["jobId"]
    while (job := client.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        time.sleep(poll_seconds)
    finished = time.perf_counter()
    seen_at = time.time()
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
    if scenario is None:
        return
    timing = job["timing"]
    total = datetime.fromisoformat(timing["completedAt"]) - datetime.fromisoformat(timing["createdAt"])
    scenario.added.append(total.total_seconds() * 1000 - (timing["executionTimeMs"] or 0))
    scenario.observed.append((finished - started) * 1000)
    scenario.jobs.append(JobTimes(job_id, posted_at, seen_at, timing["executionTimeMs"] or 0))


def measure(
    base_urls: list[str], prompt: dict, jobs: int, poll_seconds: float, gap_seconds: float
) -> list[Scenario]:
    """`jobs` jobs on each gateway, one at a time, taking turns: each gateway's job, then the next's, so that
    what else the machine does falls on all of them alike."""
    scenarios = [Scenario() for _ in base_urls]
    clients = [httpx.Client(base_url=base_url, timeout=30) for base_url in base_urls]
    try:
        for index in range(jobs + WARM_UP_JOBS):
            for client, scenario in zip(clients, scenarios):
                time.sleep(gap_seconds)
                run_one(client, prompt, poll_seconds, scenario if index >= WARM_UP_JOBS else None)
    finally:
        for client in clients:
            client.close()
    return scenarios


def _seconds(event) -> float:  # type: ignore[no-untyped-def]
    return event.event_time.ToDatetime(tzinfo=timezone.utc).timestamp()


async def read_phases(temporal_address: str, scenario: Scenario) -> None:
    """Each job's phases from its workflow history, in milliseconds."""
    client = await Client.connect(temporal_address)
    for job in scenario.jobs:
        history = await client.get_workflow_handle(job.job_id).fetch_history()
        at: dict[str, float] = {}
        activity_names: dict[int, str] = {}
        workflow_tasks = 0
        for event in history.events:
            kind = event.event_type
            if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                at["started"] = _seconds(event)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                workflow_tasks += 1
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                name = event.activity_task_scheduled_event_attributes.activity_type.name
                activity_names[event.event_id] = name
                at.setdefault(f"{name} scheduled", _seconds(event))
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                name = activity_names[event.activity_task_started_event_attributes.scheduled_event_id]
                at[f"{name} started"] = _seconds(event)
            elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                name = activity_names[event.activity_task_completed_event_attributes.scheduled_event_id]
                at[f"{name} completed"] = _seconds(event)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
                at["completed"] = _seconds(event)
        spans = {
            "accept": at["started"] - job.posted,
            "to prompt": at["run_prompt scheduled"] - at["started"],
            "prompt wait": at["run_prompt started"] - at["run_prompt scheduled"],
            "prompt": at["run_prompt completed"] - at["run_prompt started"],
            "comfyui": job.execution_ms / 1000,
            "seen": job.seen - at["completed"],
            "total": job.seen - job.posted,
        }
        if "collect_outputs completed" in at:
            spans["to collect"] = at["collect_outputs scheduled"] - at["run_prompt completed"]
            spans["collect"] = at["collect_outputs completed"] - at["collect_outputs scheduled"]
            spans["finish"] = at["completed"] - at["collect_outputs completed"]
        else:
            spans["finish"] = at["completed"] - at["run_prompt completed"]
        for phase, seconds in spans.items():
            scenario.phases[phase].append(seconds * 1000)
        scenario.workflow_tasks.append(workflow_tasks)
        scenario.history_events.append(len(history.events))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--poll-ms", type=float, default=20, help="how often the client asks GET /jobs/{id}")
    parser.add_argument("--comfyui-ms", type=float, default=20, help="how long ComfyUI runs each job (0: zero-length)")
    parser.add_argument("--against", type=Path, action="append", default=[], metavar="CHECKOUT",
                        help="also run the gateway of this checkout (another version), jobs taking turns")
    arguments = parser.parse_args()
    prompt = prompt_running_for(arguments.comfyui_ms)
    versions = {"this checkout": REPO_ROOT, **{str(path): path.resolve() for path in arguments.against}}
    addresses = {label: f"127.0.0.1:{free_port()}" for label in versions}
    with ExitStack() as stack:
        stacks = [stack.enter_context(simulated_stack(temporal_address=addresses[label], repo_root=root))
                  for label, root in versions.items()]
        base_urls = [each.api_url for each in stacks]
        gaps = {"jobs 300 ms apart": 0.3, "back to back": 0.0}
        cpu_before = [each.cpu_seconds() for each in stacks]
        results = {scenario: dict(zip(versions, measure(base_urls, prompt, arguments.jobs, arguments.poll_ms / 1000, gap)))
                   for scenario, gap in gaps.items()}
        # Each stack's processes, over every job of both scenarios (warm-ups included, and the client's polls).
        cpu_spent = {label: {part: seconds - before.get(part, 0.0) for part, seconds in each.cpu_seconds().items()}
                     for label, each, before in zip(versions, stacks, cpu_before)}
        for by_version in results.values():
            for label, scenario in by_version.items():
                asyncio.run(read_phases(addresses[label], scenario))
    print(f"{arguments.jobs} ComfyUI jobs of {arguments.comfyui_ms:g} ms, one at a time, on `comfyui-gateway dev` +"
          f" the simulator; clients poll every {arguments.poll_ms:g} ms")
    for label in versions:
        if len(versions) > 1:
            print(f"\n## {label}")
        for name, by_version in results.items():
            scenario = by_version[label]
            print(f"{name:<17}: gateway-added (POST /jobs -> outputs stored, minus ComfyUI execution)"
                  f" p50 {percentile(scenario.added, 0.5):.1f} ms, p95 {percentile(scenario.added, 0.95):.1f} ms,"
                  f" mean {statistics.fmean(scenario.added):.1f} ms; client sees succeeded after"
                  f" p50 {percentile(scenario.observed, 0.5):.1f} ms, p95 {percentile(scenario.observed, 0.95):.1f} ms")
        print("\nphases from the workflow histories, ms (p50 / p95 / mean):")
        print(f"| {'phase':<12} | " + " | ".join(f"{name:<24}" for name in results) + " |")
        print(f"|{'-' * 14}|" + "|".join("-" * 26 for _ in results) + "|")
        for phase in PHASES:
            cells = []
            for by_version in results.values():
                values = by_version[label].phases[phase]
                cells.append(f"{percentile(values, 0.5):6.1f} / {percentile(values, 0.95):6.1f} /"
                             f" {statistics.fmean(values):6.1f}" if values else "-")
            print(f"| {phase:<12} | " + " | ".join(f"{cell:<24}" for cell in cells) + " |")
        print("workflow tasks per job: " + ", ".join(
            f"{name} {statistics.fmean(by_version[label].workflow_tasks):.1f}" for name, by_version in results.items()))
        print("CPU per job, ms: " + cpu_per_job(cpu_spent[label], len(gaps) * (arguments.jobs + WARM_UP_JOBS)))
        print("history events per job: " + ", ".join(
            f"{name} {statistics.fmean(by_version[label].history_events):.1f}" for name, by_version in results.items()))


if __name__ == "__main__":
    main()
