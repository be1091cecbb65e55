"""Many listeners of the feed of all jobs (`GET /events`, `WS /ws`) on one API process while jobs run: how late
each event reaches them, and what the listeners cost.

Starts the simulator and `comfyui-gateway dev` (open mode: every listener is an admin, and so hears every job),
then runs two rounds with the same jobs: first with --baseline listeners, then with --listeners, each a mix of
SSE streams and WebSocket subscriptions (--ws-share of them WebSockets). In each round JOBS jobs run at once,
each a TestSleepProgress node of STEPS steps --spacing seconds apart, and every listener reads every event until
it has had each job's end. An event's delay is from the job's own change (the feed row's `at`, written in the
transaction that changed the job's row) to the moment this process reads it. Prints, per round, the delay's
p50/p99/max, the API's RSS, the CPU each part of the stack spent, and the feed reader's queries (from
`GET /metrics`): the database's load from the feed, which must not grow with the listeners. Target: p99 <= 1 s.

    python3 -m bench.feed_listeners [--listeners 1000] [--baseline 10] [--ws-share 0.5] [--jobs 8] [--steps 5]
                                    [--client-processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embedded import Stack, percentile, simulated_stack, submit_prompts, timed_prompt  # noqa: E402

FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Heard:
    """What one listener read: each event's delay, and the jobs whose end it had."""

    delays: list[float] = field(default_factory=list)
    ended: set[str] = field(default_factory=set)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: set[str] = field(default_factory=set)

    def hear(self, name: str, data: dict) -> None:
        self.delays.append(time.time() - _epoch(data["at"]))
        if name in FINAL:
            self.ended.add(data["jobId"])
            if self.expected and self.expected <= self.ended:
                self.done.set()


def _epoch(instant: str) -> float:
    return datetime.fromisoformat(instant).timestamp()


async def sse_listener(api_url: str, heard: Heard) -> None:
    """The stream's events, read off the socket itself: its chunks (chunked transfer coding) and its events split
    from the raw bytes. Through httpx, the client's own work per chunk was a third of the round's CPU on the
    cores the API shares, and so part of what the delays measured."""
    url = httpx.URL(api_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"GET /events HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nAccept: text/event-stream\r\n\r\n"
                     .encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"GET /events answered {head!r}")
        heard.connected.set()
        body, pending = b"", b""
        while data := await reader.read(1 << 16):
            body += data
            chunks = []
            while (end := body.find(b"\r\n")) >= 0:
                size = int(body[:end].split(b";", 1)[0], 16)
                if len(body) < end + 2 + size + 2:
                    break
                chunks.append(body[end + 2:end + 2 + size])
                body = body[end + 2 + size + 2:]
            if not chunks:
                continue
            *events, pending = (pending + b"".join(chunks)).replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                fields = dict(line.split(b": ", 1) for line in event.split(b"\n") if not line.startswith(b":"))
                if b"data" in fields:
                    heard.hear(fields.get(b"event", b"").decode(), json.loads(fields[b"data"]))
    finally:
        writer.close()


async def ws_listener(url: str, heard: Heard) -> None:
    async with websockets.connect(url, open_timeout=60, max_queue=None) as connection:
        await connection.send(json.dumps({"type": "subscribe"}))
        async for raw in connection:
            message = json.loads(raw)
            if message["type"] == "subscribed":
                heard.connected.set()
            elif message["type"] == "event":
                heard.hear(message["event"], message["data"])


def api_process(stack: Stack) -> int:
    """The pid of the API process under the gateway (`app.cli api`)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = [word.decode() for word in cmdline.read_bytes().split(b"\0") if word]
        except OSError:
            continue
        if "app.cli" in words and words[words.index("app.cli") + 1:][:1] == ["api"]:
            pid = int(cmdline.parent.name)
            if _descends_from(pid, stack.gateway_pid):
                return pid
    raise SystemExit("no API process found under the gateway")


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def rss_mb(pid: int) -> float:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def metric(http: httpx.AsyncClient, name: str) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@dataclass
class Round:
    listeners: int
    delays_ms: list[float]
    rss_before_mb: float
    rss_mb: float
    cpu: dict[str, float]
    feed_reads: float
    seconds: float
    events: int
    client_cpu: float  # the bench's client processes', reading every listener: on the same cores as the stack


async def listen(api_url: str, listeners: int, ws_share: float, pipe: Connection) -> None:
    """One client process's listeners: connected, then told the jobs to expect, then read until each has had
    every job's end; sends back their delays (ms) and the CPU it spent reading."""
    ws_count = round(listeners * ws_share)
    heard = [Heard() for _ in range(listeners)]
    ws_url = api_url.replace("http", "ws") + "/ws"
    tasks = [asyncio.create_task(ws_listener(ws_url, one) if n < ws_count else sse_listener(api_url, one))
             for n, one in enumerate(heard)]
    for one in heard:
        await asyncio.wait_for(one.connected.wait(), 120)
    pipe.send("connected")
    job_ids = await asyncio.to_thread(pipe.recv)
    cpu = time.process_time()
    for one in heard:
        one.expected = set(job_ids)
        if one.expected <= one.ended:
            one.done.set()
    await asyncio.wait_for(asyncio.gather(*(one.done.wait() for one in heard)), 300)
    cpu = time.process_time() - cpu
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send(([delay * 1000 for one in heard for delay in one.delays], cpu))


def client_process(api_url: str, listeners: int, ws_share: float, pipe: Connection) -> None:
    asyncio.run(listen(api_url, listeners, ws_share, pipe))


async def run_round(stack: Stack, api_pid: int, listeners: int, args: argparse.Namespace) -> Round:
    """A round's listeners, spread over --client-processes processes so that no one event loop of the bench's
    own is what the delays measure."""
    context = multiprocessing.get_context("spawn")
    processes = min(args.client_processes, listeners)
    pipes, children = [], []
    rss_before = rss_mb(api_pid)
    for n in range(processes):
        ours, theirs = context.Pipe()
        share = listeners // processes + (1 if n < listeners % processes else 0)
        child = context.Process(target=client_process, args=(stack.api_url, share, args.ws_share, theirs))
        child.start()
        pipes.append(ours)
        children.append(child)
    try:
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "connected"
        await asyncio.sleep(1)  # settled: the connections' own cost in
        rss_connected = rss_mb(api_pid)
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as api:
            cpu_before, reads_before = stack.cpu_seconds(), await metric(api, "gateway_feed_reads_total")
            started = time.monotonic()
            job_ids = await submit_prompts(api, timed_prompt(args.steps * args.spacing, args.steps), args.jobs)
            for pipe in pipes:
                pipe.send(job_ids)
            answers = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
            seconds = time.monotonic() - started
            cpu_after, reads_after = stack.cpu_seconds(), await metric(api, "gateway_feed_reads_total")
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    cpu = {part: cpu_after.get(part, 0.0) - cpu_before.get(part, 0.0) for part in cpu_after}
    delays = [delay for one_process, _ in answers for delay in one_process]
    return Round(listeners, delays, rss_before, rss_connected, cpu, reads_after - reads_before, seconds, len(delays),
                 sum(client_cpu for _, client_cpu in answers))


async def measure(args: argparse.Namespace) -> None:
    env = {"API_MAX_CONCURRENT_STREAMS": str(max(args.listeners, args.baseline) + 10),
           "MAX_CONCURRENCY": str(args.jobs), "COMFYUI_PREFETCH": "0"}
    with simulated_stack(gateway_env=env) as stack:
        api_pid = api_process(stack)
        idle_rss = rss_mb(api_pid)
        rounds = [await run_round(stack, api_pid, n, args) for n in (args.baseline, args.listeners)]
    print(f"{args.jobs} jobs at once, {args.steps} steps {args.spacing:g} s apart; listeners "
          f"{args.ws_share:.0%} WebSocket, the rest SSE; API RSS idle {idle_rss:.0f} MB")
    print(f"{'listeners':>9} {'events':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'API RSS MB':>10} "
          f"{'api cpu s':>9} {'worker cpu s':>12} {'temporal cpu s':>14} {'feed reads/s':>12} {'client cpu s':>12}")
    for one in rounds:
        ms = one.delays_ms
        print(f"{one.listeners:>9} {one.events:>8} {percentile(ms, 0.5):>7.0f} {percentile(ms, 0.99):>7.0f} "
              f"{max(ms):>7.0f} {one.rss_mb:>10.0f} {one.cpu.get('api', 0):>9.2f} {one.cpu.get('worker', 0):>12.2f} "
              f"{one.cpu.get('temporal', 0):>14.2f} {one.feed_reads / one.seconds:>12.1f} {one.client_cpu:>12.2f}")
    small, large = rounds
    extra = large.listeners - small.listeners
    print(f"cost per listener: {(large.rss_mb - small.rss_mb) * 1024 / extra:.0f} KB of the API's RSS, "
          f"{(large.cpu.get('api', 0) - small.cpu.get('api', 0)) * 1e6 / (large.events - small.events):.0f} us of "
          f"API CPU per event delivered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=10, help="listeners of the first round")
    parser.add_argument("--ws-share", type=float, default=0.5, help="the share of listeners on WS /ws")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between two progress steps")
    parser.add_argument("--client-processes", type=int, default=4, help="processes the listeners are spread over")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
