"""Many jobs at once, and when the last of them was done: through the gateway (`POST /jobs`, then `GET /jobs/{id}`)
or straight to ComfyUI (`POST /prompt`, then `GET /history/{id}`), timed by each side's own record of when a job
ended (the job's completedAt; ComfyUI's execution_success timestamp) rather than by when a poll happened to see it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


def connection_limits(connections: int) -> httpx.Limits:
    """CONNECTIONS at once, none reused after 4 s idle: uvicorn closes a kept-alive connection idle 5 s, and a
    request sent on one at that instant fails with ReadError (seen between a burst's rounds)."""
    return httpx.Limits(max_connections=connections, keepalive_expiry=4.0)


@dataclass
class Drain:
    """One batch: wall-clock start (time.time()), accept times, and per job its end as recorded by whoever ran it."""
    started: float
    accept_ms: list[float] = field(default_factory=list)
    ended: dict[str, float] = field(default_factory=dict)  # id -> wall-clock end, for the jobs that succeeded
    execution_ms: list[float] = field(default_factory=list)  # ComfyUI's own run time of each
    outcomes: dict[str, str] = field(default_factory=dict)  # id -> final status, "missing" or the last one seen
    refused: dict[str, int] = field(default_factory=dict)  # submissions that got no id: count by HTTP status or error
    submitted: float = 0.0  # when the last submission was answered (time.time())

    @property
    def drain_seconds(self) -> float:
        """From the first submission to the end of the last job that succeeded."""
        return max(self.ended.values()) - self.started if self.ended else float("nan")

    @property
    def failures(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            if outcome != "succeeded":
                counts[outcome] = counts.get(outcome, 0) + 1
        return counts


async def timed_post(client: httpx.AsyncClient, path: str, body: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    response = await client.post(path, json=body)
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return response.json(), elapsed


async def _wait_in_order(
    ids: list[str], finished: Callable[[str], Awaitable[bool]], poll_seconds: float, deadline: float,
) -> None:
    """Asks about the first unfinished id until it is done, then the next: the work runs roughly in submission
    order, so this costs about one request per poll, however many ids there are."""
    for item in ids:
        while not await finished(item):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(poll_seconds)


async def gateway_batch(
    api: httpx.AsyncClient, bodies: list[list[dict]], poll_seconds: float = 0.02, timeout: float = 600,
    pause_seconds: float = 0.0,
) -> Drain:
    """Each inner list of BODIES is one client posting its jobs one after the other (PAUSE_SECONDS apart); the
    clients post at once. Then waits until every job has ended (or TIMEOUT passed) and returns the figures."""
    drain = Drain(started=time.time())
    job_ids: list[str] = []

    async def submit(body: dict) -> None:
        try:
            answer, elapsed = await timed_post(api, "/jobs", body)
        except httpx.HTTPStatusError as error:
            reason = f"{error.response.status_code} {error.response.text[:200]}"
        except httpx.TransportError as error:
            reason = type(error).__name__
        else:
            drain.accept_ms.append(elapsed)
            job_ids.append(answer["jobId"])
            return
        drain.refused[reason] = drain.refused.get(reason, 0) + 1

    async def client(share: list[dict]) -> None:
        for index, body in enumerate(share):
            if index and pause_seconds:
                await asyncio.sleep(pause_seconds)
            await submit(body)

    await asyncio.gather(*(client(share) for share in bodies))
    drain.submitted = time.time()

    async def finished(job_id: str) -> bool:
        response = await api.get(f"/jobs/{job_id}")
        if response.status_code == 404:
            drain.outcomes[job_id] = "missing"
            return False
        response.raise_for_status()
        job = response.json()
        drain.outcomes[job_id] = job["status"]
        if job["status"] not in TERMINAL:
            return False
        if job["status"] == "succeeded":
            timing = job["timing"]
            drain.ended[job_id] = datetime.fromisoformat(timing["completedAt"]).timestamp()
            drain.execution_ms.append(timing["executionTimeMs"] or 0)
        return True

    await _wait_in_order(job_ids, finished, poll_seconds, time.monotonic() + timeout)
    for job_id in job_ids:  # after a timeout, where the ones not waited for yet stand
        if drain.outcomes.get(job_id) not in TERMINAL:
            await finished(job_id)
    return drain


async def comfyui_batch(
    comfyui: httpx.AsyncClient, prompts: list[dict], poll_seconds: float = 0.02, timeout: float = 600,
) -> Drain:
    """PROMPTS posted to ComfyUI's /prompt at once; then waits until each is in /history."""
    drain = Drain(started=time.time())
    answers = await asyncio.gather(
        *(timed_post(comfyui, "/prompt", {"prompt": prompt, "client_id": "bench"}) for prompt in prompts))
    drain.submitted = time.time()
    prompt_ids = []
    for answer, elapsed in answers:
        drain.accept_ms.append(elapsed)
        prompt_ids.append(answer["prompt_id"])

    async def finished(prompt_id: str) -> bool:
        entry = (await comfyui.get(f"/history/{prompt_id}")).raise_for_status().json().get(prompt_id)
        if entry is None or not entry["status"]["completed"] and entry["status"]["status_str"] != "error":
            drain.outcomes[prompt_id] = "missing" if entry is None else "running"
            return False
        messages = {name: data for name, data in entry["status"]["messages"]}
        if entry["status"]["status_str"] == "success":
            drain.outcomes[prompt_id] = "succeeded"
            drain.ended[prompt_id] = messages["execution_success"]["timestamp"] / 1000
            drain.execution_ms.append(
                messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"])
        else:
            drain.outcomes[prompt_id] = "failed"
        return True

    await _wait_in_order(prompt_ids, finished, poll_seconds, time.monotonic() + timeout)
    return drain
