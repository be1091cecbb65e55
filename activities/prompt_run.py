"""Following one prompt on ComfyUI: submit it unless ComfyUI already has it, then follow its WebSocket
events (falling back to `/history` when the socket drops) until the history entry is written.

The job's time limit counts, across every try of the activity (its heartbeat carries the count), the time
from when ComfyUI starts executing the prompt, and the time spent waiting for an unreachable ComfyUI while
the gateway runs. Not counted: the wait for a slot lease, the wait in ComfyUI's queue behind other jobs'
prompts (prefetch), and time the gateway was down; on the gateway's return the prompt's result is looked for
before the limit is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import activity
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from activities.job_log import JobLog
from app.comfy.client import ComfyClient, WsEvent, parse_ws_message
from app.comfy.errors import STARTED_AT_MS_DETAIL, ComfyError, classify_execution_error, classify_interrupted
from app.comfy.tracker import PromptTracker
from app.errors import ErrorCode
from app.models import PROMPT_STARTED_SIGNAL, JobWarning, PromptProgress, PromptStarted, RunPromptInput, RunPromptResult

# The WebSocket tells what happens; ComfyUI's HTTP API (history, queue) is asked only as a fallback: after this
# long without an event while the socket is open, every second while it is down, and after this long while the
# socket carries others' news (the queue's broadcasts) but none of the prompt's own: a prompt lost from ComfyUI's
# queue gets no events of its own. Each ask is two requests and a parse of ComfyUI's queue, which lists every
# prompt on it: a thousand prompts asked every few seconds cost the worker (and ComfyUI) more than following
# their events.
_QUIET_CHECK_SECONDS = 5.0
_DISCONNECTED_CHECK_SECONDS = 1.0
_FORCED_CHECK_SECONDS = 30.0
# A prompt that finishes sooner is never reported as `running` separately: its result says when it started.
_RUNNING_SIGNAL_AFTER_SECONDS = 0.1
# A post that failed on its way back may still be queued a moment later (ComfyUI validates before it queues):
# before posting again, ComfyUI is asked twice, this far apart (by default: tests shorten it).
POST_SETTLE_SECONDS = 5.0


async def _no_lease_needed() -> None:
    pass


class PromptRun:
    def __init__(self, client: ComfyClient, request: RunPromptInput, progress: PromptProgress, log: JobLog, *,
                 backend: str | None = None, acquire: Callable[[], Awaitable[None]] = _no_lease_needed,
                 on_report: Callable[[], None] = lambda: None, post_settle_seconds: float = POST_SETTLE_SECONDS,
                 ) -> None:
        self.client = client
        self.request = request
        self.progress = progress
        self.log = log
        self.prompt_id = progress.prompt_id
        self.tracker = PromptTracker(progress.prompt_id, request.prompt)
        self.tag = f"a{request.attempt}"
        self.backend = backend
        # Takes the prompt's slot lease (waiting for one): before a post, and before following a prompt that is
        # on ComfyUI and not finished.
        self._acquire = acquire
        # Told of each change of the progress reported (it must not block): the live row is written from it.
        self._on_report = on_report
        self._post_settle_seconds = post_settle_seconds
        self._started_monotonic: float | None = None
        # The news the last heartbeat of `_report` said (see `news`): heartbeats cost the worker CPU.
        self._reported: dict[str, Any] | None = None
        self._elapsed_before = progress.elapsed_seconds
        # When the time limit's clock last started; None while it stands (the prompt has not started).
        self._counting_since: float | None = None
        if progress.queue_position == 0:  # an earlier try saw it start: it runs on, and so does its clock
            self._count()

    def _count(self) -> None:
        if self._counting_since is None:
            self._counting_since = time.monotonic()

    def _pause(self) -> None:
        if self._counting_since is not None:
            self._elapsed_before += time.monotonic() - self._counting_since
            self._counting_since = None

    @property
    def started(self) -> bool:
        return self.tracker.started or self.progress.queue_position == 0

    def tick(self) -> PromptProgress:
        """The progress with the time spent so far brought up to date: what the heartbeat carries."""
        running = time.monotonic() - self._counting_since if self._counting_since is not None else 0.0
        self.progress.elapsed_seconds = self._elapsed_before + running
        return self.progress

    def news(self) -> dict[str, Any]:
        """What a heartbeat says that is news: all but the time spent, which changes every second. An event that
        changes none of it heartbeats nothing (the keepalive keeps the time spent current within seconds)."""
        return self.progress.model_dump(exclude={"elapsed_seconds"})

    def past_time_limit(self) -> bool:
        return self.tick().elapsed_seconds > self.request.timeout_seconds

    def waiting(self, warning: JobWarning | None) -> None:
        """ComfyUI stopped answering (a warning) or answers again (None): the job's log and heartbeat say so."""
        if warning is not None:
            self._count()
        elif not self.started:
            self._pause()
        if warning is not None and self.progress.warning is None:
            self.log.add(f"{self.tag}:unreachable:{warning.since.timestamp():.0f}", "warning",
                         f"{warning.message}; waiting for it", {"code": warning.code.value})
        elif warning is None and self.progress.warning is not None:
            self.log.add(f"{self.tag}:reachable:{time.time():.0f}", "comfyui", "ComfyUI answers again")
        self.progress.warning = warning

    async def run(self) -> RunPromptResult:
        # Connect before submitting: ComfyUI drops events for a client id that has no socket.
        feed = EventFeed(self.client, self.request.job_id)
        await feed.open()
        self.waiting(None)
        try:
            await self._submit_unless_known()
            activity.heartbeat(self.progress.model_dump(by_alias=True))
            return await self._follow(feed)
        finally:
            await feed.close()

    async def stop(self) -> None:
        await stop_prompt(self.client, self.prompt_id)

    async def _submit_unless_known(self) -> None:
        # A first try cannot have posted before. Any later one asks ComfyUI first, since a post that failed
        # on the way back may have been queued, and the last heartbeat may predate the post (heartbeats are
        # throttled).
        if activity.info().attempt == 1 and not self.progress.post_attempted:
            found_in = None
        elif self.progress.submitted:
            found_in = "heartbeat"
        else:
            found_in = await locate(self.client, self.prompt_id)
            if found_in is None and self.progress.post_attempted:
                await asyncio.sleep(self._post_settle_seconds)
                found_in = await locate(self.client, self.prompt_id)
        if found_in != "history":
            await self._acquire()  # a prompt that is on ComfyUI, or is about to be, holds a slot
        if found_in is None:
            self.progress.post_attempted = True
            # From here the prompt may be on this backend: a retry polled by another must not post it there.
            self.progress.backend = self.backend
            activity.heartbeat(self.tick().model_dump(by_alias=True))
            try:
                await self.client.post_prompt(
                    self.request.prompt,
                    prompt_id=self.prompt_id,
                    client_id=self.request.job_id,
                    extra_data={"gateway_job_id": self.request.job_id, "gateway_attempt": self.request.attempt},
                )
            except ComfyError as error:
                self.progress.post_attempted = error.details.get("requestSent", True)
                raise
            self.log.add(
                f"{self.tag}:submitted", "submitted",
                f"prompt {self.prompt_id} queued on ComfyUI (attempt {self.request.attempt})",
                {"promptId": self.prompt_id, "attempt": self.request.attempt, "backend": self.request.backend},
            )
            await self.log.flush(force=True)  # a crash right after must not lose that the prompt was queued
        else:
            self.progress.backend = self.backend
            self.log.add(
                f"{self.tag}:reattached:{activity.info().attempt}", "reattached",
                f"re-attached to prompt {self.prompt_id} (found via {found_in}) after an interrupted follow",
                {"promptId": self.prompt_id, "activityAttempt": activity.info().attempt},
            )
        self.progress.submitted = True

    async def _follow(self, feed: EventFeed) -> RunPromptResult:
        last_check = time.monotonic()
        # The queue length of the last `status` event the position was refreshed for.
        queue_length: int | None = None
        while True:
            if self.past_time_limit():
                # The result may have come while nobody watched (the gateway was down): it is not too late.
                entry = await self.client.history(self.prompt_id)
                if entry is not None:
                    return self._result(entry)
                await self.stop()
                raise ComfyError(
                    ErrorCode.COMFYUI_TIMEOUT,
                    f"no result from ComfyUI within {self.request.timeout_seconds:g} s",
                    {"promptId": self.prompt_id, "timeoutSeconds": self.request.timeout_seconds},
                )
            # Woken by the time limit too: a silent prompt is not let run past it by the wait for its events.
            quiet = _QUIET_CHECK_SECONDS if feed.connected else _DISCONNECTED_CHECK_SECONDS
            left = self.request.timeout_seconds - self.tick().elapsed_seconds
            event = await feed.next(max(0.1, min(quiet, left + 0.1)) if self._counting_since is not None else quiet)
            if feed.dropped:
                self.log.add(
                    f"{self.tag}:ws-dropped:{int(time.time())}", "warning",
                    "ComfyUI WebSocket dropped; following the prompt through /history until it reconnects",
                )
            if event is not None and self.tracker.concerns(event):
                # The prompt's own news is as good as an ask: ComfyUI has it and is working on it. The forced
                # ask is for a socket that carries only others' news (the queue's broadcasts), and at a
                # thousand prompts each ask every 30 s was a fifth of the worker's event loop.
                last_check = time.monotonic()
                self._on_event(event)
                if event.type == "executing" and event.data.get("node") is None:
                    # ComfyUI sends this after writing the history entry: the result is complete.
                    entry = await self.client.history(self.prompt_id)
                    if entry is not None:
                        return self._result(entry)
            if event is not None and event.type == "status" and not self.tracker.started:
                # ComfyUI's queue changed: refresh the position only. The events already buffered tell the
                # rest, so this must not short-cut to the history (that would skip them in the job's log).
                # Not for the greeting sent to this socket alone ("sid"), which describes the queue before the
                # prompt was posted, nor for the same length again: a prompt ahead leaving shortens the queue,
                # and the move from pending to running, which keeps it, is the execution_start event's to tell.
                length = ((event.data.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
                if "sid" not in event.data and (length is None or length != queue_length):
                    queue_length = length
                    position = (await self.client.queue()).position(self.prompt_id)
                    self.progress.queue_position = position if position is not None else self.progress.queue_position
            elif event is None or time.monotonic() - last_check > _FORCED_CHECK_SECONDS:
                last_check = time.monotonic()
                entry = await self.client.history(self.prompt_id)
                if entry is not None:
                    return self._result(entry)
                self.progress.queue_position = await queue_position_or_lost(self.client, self.prompt_id)
            await self._report(quiet=event is None)

    async def _report(self, *, quiet: bool) -> None:
        progress, tracker = self.progress, self.tracker
        progress.percent = tracker.percent
        progress.node = tracker.current_node
        progress.node_type = tracker.node_type
        if self.started:
            progress.queue_position = 0
            self._count()
            self._started_monotonic = self._started_monotonic or time.monotonic()
            running_for = time.monotonic() - self._started_monotonic
            if not progress.started_signalled and (quiet or running_for >= _RUNNING_SIGNAL_AFTER_SECONDS):
                handle = activity.client().get_workflow_handle(self.request.job_id)
                await handle.signal(
                    PROMPT_STARTED_SIGNAL, PromptStarted(attempt=self.request.attempt, prompt_id=self.prompt_id,
                                                         backend=self.progress.backend)
                )
                progress.started_signalled = True
        reported = self.news()
        if reported != self._reported:
            self._reported = reported
            activity.heartbeat(self.tick().model_dump(by_alias=True))
            self._on_report()
        await self.log.flush()

    def _on_event(self, event: WsEvent) -> None:
        self.tracker.apply(event)
        if event.type == "execution_start":
            self.log.add(f"{self.tag}:execution_start", "comfyui", "ComfyUI started executing the prompt")
        elif event.type == "execution_cached" and event.data.get("nodes"):
            cached = [str(node) for node in event.data["nodes"]]
            self.log.add(f"{self.tag}:cached", "comfyui", f"{len(cached)} node(s) served from ComfyUI's cache",
                         {"nodes": cached})
        elif event.type == "executing" and event.data.get("node") is not None:
            node = str(event.data["node"])
            self.log.add(f"{self.tag}:node:{node}", "node", f"executing node {node} ({self.tracker.node_type})",
                         {"node": node, "classType": self.tracker.node_type})
        elif event.type in ("execution_error", "execution_interrupted"):
            self.log.add(f"{self.tag}:{event.type}", "comfyui", f"ComfyUI reported {event.type}",
                         {"node": event.data.get("node_id"), "classType": event.data.get("node_type")})

    def _result(self, entry: dict[str, Any]) -> RunPromptResult:
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        stamps = {name: data.get("timestamp") for name, data in messages if isinstance(data, dict)}
        if status.get("status_str") == "success":
            start, end = stamps.get("execution_start"), stamps.get("execution_success")
            return RunPromptResult(
                prompt_id=self.prompt_id,
                outputs=entry.get("outputs") or {},
                started_at_ms=start,
                execution_time_ms=int(end - start) if start is not None and end is not None else None,
            )
        for name, data in reversed(messages):
            if name in ("execution_error", "execution_interrupted"):
                error = classify_execution_error(data) if name == "execution_error" else classify_interrupted(data)
                if stamps.get("execution_start") is not None:
                    # It ran, maybe for less time than it takes to signal `running`: the job says when it started.
                    error.details[STARTED_AT_MS_DETAIL] = stamps["execution_start"]
                raise error
        raise ComfyError(
            ErrorCode.COMFYUI_PROTOCOL_ERROR, "ComfyUI finished the prompt without a result or an error", {"status": status}
        )


class EventFeed:
    """The job's ComfyUI WebSocket, reopened when it drops. `next` returns None when no event arrived in
    time, which tells the caller to ask ComfyUI's HTTP API instead."""

    def __init__(self, client: ComfyClient, client_id: str) -> None:
        self._client = client
        self._client_id = client_id
        self._socket: ClientConnection | None = None
        self.dropped = False

    @property
    def connected(self) -> bool:
        return self._socket is not None

    async def open(self) -> None:
        self._socket = await self._client.connect_events(self._client_id)

    async def next(self, timeout: float) -> WsEvent | None:
        self.dropped = False
        if self._socket is None:
            await asyncio.sleep(timeout)
            try:
                await self.open()
            except ComfyError:
                pass
            return None
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for loses a cancellation that arrives as the
            # message does, and a prompt whose workflow was terminated would then run on to its end.
            async with asyncio.timeout(timeout):
                raw = await self._socket.recv()
            message = parse_ws_message(raw)
        except (TimeoutError, ComfyError):  # nothing, or nothing the gateway reads: ask the HTTP API instead
            return None
        except ConnectionClosed:
            self._socket, self.dropped = None, True
            return None
        return message if isinstance(message, WsEvent) else None

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()


async def locate(client: ComfyClient, prompt_id: str) -> str | None:
    """Where ComfyUI has the prompt: "history", "queue", or None. History is read on both sides of the
    queue read because a prompt moves from the running queue into history between two requests."""
    if await client.history(prompt_id) is not None:
        return "history"
    if (await client.queue()).position(prompt_id) is not None:
        return "queue"
    if await client.history(prompt_id) is not None:
        return "history"
    return None


async def queue_position_or_lost(client: ComfyClient, prompt_id: str) -> int:
    position = (await client.queue()).position(prompt_id)
    if position is not None:
        return position
    if await client.history(prompt_id) is not None:
        return 0  # finished between the two reads; the next check returns the result
    raise ComfyError(
        ErrorCode.PROMPT_LOST,
        "ComfyUI has the prompt in neither its queue nor its history (it restarted or was cleared)",
        {"promptId": prompt_id},
    )


async def stop_prompt(client: ComfyClient, prompt_id: str) -> None:
    """Delete the prompt from ComfyUI's queue, then interrupt it if it is the one running. In this order a
    prompt that starts between the two calls is still caught; both calls are no-ops for other prompts."""
    await client.delete_from_queue([prompt_id])
    await client.interrupt(prompt_id)
