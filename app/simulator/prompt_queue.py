"""The prompt queue and history of one simulated server (ComfyUI's execution.PromptQueue).

Pending prompts live in a heap ordered by `number` (front=true gives negative numbers); GET /queue
returns the heap list as it is, like ComfyUI, which is sorted only as far as a heap is. Queue items
are (number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive); the sixth element
holds the extra_data keys that must not show in /queue or /history. Every change of the queue
calls `on_change`, which broadcasts a `status` event. Everything is in memory: a restart forgets it.

The queue also decides which prompt the interrupt flag belongs to: taking a prompt clears the
flag, and a prompt-scoped interrupt sets it only while that prompt is the running one, both under
the queue lock, so an interrupt can neither leak into the next prompt nor be lost at its start.
A server with parallel lanes (benchmarks only) has one flag per lane: the taker's is the one cleared,
and a prompt's interrupt sets the flag of the lane running it.
"""

from __future__ import annotations

import copy
import heapq
import threading
from typing import Any, Callable

from .interrupt import InterruptFlag

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

QueueItem = tuple  # (number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive)


def public_item(item: QueueItem) -> list[Any]:
    """The 5-element form /queue and /history show."""
    return list(item[:5])


class PromptQueue:
    def __init__(self, on_change: Callable[[], None], interrupt: InterruptFlag):
        self._on_change = on_change
        self._interrupt = interrupt
        self._mutex = threading.RLock()
        self._not_empty = threading.Condition(self._mutex)
        self._task_counter = 0
        self._queue: list[QueueItem] = []
        self._running: dict[int, QueueItem] = {}
        self._running_flags: dict[int, InterruptFlag] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._flags: dict[str, Any] = {}

    def put(self, item: QueueItem) -> None:
        with self._mutex:
            heapq.heappush(self._queue, item)
            self._on_change()
            self._not_empty.notify()

    def get(self, timeout: float | None, interrupt: InterruptFlag | None = None) -> tuple[QueueItem, int] | None:
        """Take the next prompt to run, waiting up to `timeout` seconds (None: until woken); None if there was
        none. `interrupt`
        is the taking lane's flag (the server's one flag by default)."""
        flag = interrupt or self._interrupt
        with self._not_empty:
            if not self._queue:
                self._not_empty.wait(timeout=timeout)
                if not self._queue:
                    return None
            item = heapq.heappop(self._queue)
            flag.clear()
            task_id = self._task_counter
            self._running[task_id] = copy.deepcopy(item)
            self._running_flags[task_id] = flag
            self._task_counter += 1
            self._on_change()
            return item, task_id

    def wake_waiters(self) -> None:
        with self._not_empty:
            self._not_empty.notify_all()

    def task_done(self, task_id: int, history_result: dict[str, Any], status: dict[str, Any]) -> None:
        """Move a finished prompt into history (without its sensitive element)."""
        with self._mutex:
            item = self._running.pop(task_id)
            self._running_flags.pop(task_id, None)
            if len(self._history) > MAXIMUM_HISTORY_SIZE:
                self._history.pop(next(iter(self._history)))
            self._history[item[1]] = {"prompt": public_item(item), "outputs": {}, "status": copy.deepcopy(status)}
            self._history[item[1]].update(history_result)
            self._on_change()

    def running_and_pending(self) -> tuple[list[list[Any]], list[list[Any]]]:
        with self._mutex:
            return [public_item(x) for x in self._running.values()], [public_item(x) for x in self._queue]

    def interrupt_if_running(self, prompt_id: str) -> bool:
        """Set the interrupt flag if `prompt_id` is the running prompt; False if it is not."""
        with self._mutex:
            for task_id, item in self._running.items():
                if item[1] == prompt_id:
                    self._running_flags[task_id].set()
                    return True
            return False

    def interrupt_all_running(self) -> None:
        """Set the flag of every running prompt (a global interrupt, on a server with parallel lanes)."""
        with self._mutex:
            for flag in self._running_flags.values():
                flag.set()

    def tasks_remaining(self) -> int:
        with self._mutex:
            return len(self._queue) + len(self._running)

    def wipe_queue(self) -> None:
        with self._mutex:
            self._queue = []
            self._on_change()

    def delete_queue_item(self, prompt_id: str) -> bool:
        with self._mutex:
            for index, item in enumerate(self._queue):
                if item[1] == prompt_id:
                    if len(self._queue) == 1:
                        # ComfyUI wipes the queue here and then reports the change again,
                        # so deleting the last pending prompt broadcasts status twice.
                        self.wipe_queue()
                    else:
                        self._queue.pop(index)
                        heapq.heapify(self._queue)
                    self._on_change()
                    return True
        return False

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        with self._mutex:
            if prompt_id is not None:
                return {prompt_id: copy.deepcopy(self._history[prompt_id])} if prompt_id in self._history else {}
            out: dict[str, Any] = {}
            if offset < 0 and max_items is not None:
                offset = len(self._history) - max_items
            for index, key in enumerate(self._history):
                if index >= offset:
                    out[key] = copy.deepcopy(self._history[key])
                    if max_items is not None and len(out) >= max_items:
                        break
            return out

    def wipe_history(self) -> None:
        with self._mutex:
            self._history = {}

    def delete_history_item(self, prompt_id: str) -> None:
        with self._mutex:
            self._history.pop(prompt_id, None)

    def set_flag(self, name: str, value: Any) -> None:
        with self._mutex:
            self._flags[name] = value
            self._not_empty.notify()

    def take_flags(self) -> dict[str, Any]:
        with self._mutex:
            flags, self._flags = self._flags, {}
            return flags
