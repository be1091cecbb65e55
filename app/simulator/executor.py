"""Runs queued prompts one at a time on a worker thread, like ComfyUI's prompt_worker + PromptExecutor.

Event order for one prompt (all sent to the prompt's client_id, dropped if it has no socket):
execution_start, execution_cached, then per node progress_state(running) / executing / [progress
...] / [executed] / progress_state(finished), then exactly one of execution_success,
execution_error or execution_interrupted. The history entry is written next (which broadcasts
`status`), and only then `executing {node: null}` is sent, so /history is complete once a client
sees it. Nodes run synchronously on the worker thread, so slow encoders never block HTTP/WS.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

from .cache import CacheEntry, IsChangedCache, NodeObjectCache, OutputCache
from .graph import ExecutionList
from .interrupt import InterruptFlag, InterruptProcessingException
from .node_types import NodeEnvironment, NodeOutput, NodeRunContext, full_type_name
from .progress import ProgressRegistry
from .prompt_queue import PromptQueue
from .registry import NODE_CLASS_MAPPINGS
from .test_nodes import OutOfMemoryError
from .websocket_hub import LaneHub, MessageHub

logger = logging.getLogger(__name__)

OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)

# The frames of ComfyUI 0.3.64's execution.py every node exception passes through, as recorded;
# the node's own frames follow them.
_EXECUTION_FRAMES = [
    '  File "ComfyUI/execution.py", line 496, in execute\n'
    "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, "
    "input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n"
    + " " * 62 + "^" * 163 + "\n",
    '  File "ComfyUI/execution.py", line 315, in get_output_data\n'
    "    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, "
    "allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n"
    + " " * 20 + "^" * 209 + "\n",
    '  File "ComfyUI/execution.py", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n',
    '  File "ComfyUI/execution.py", line 277, in process_inputs\n    result = f(**inputs)\n             ^^^^^^^^^^^\n',
]


class _NodeFailure(Exception):
    """Carries a failed node's error details from _execute_node to the prompt loop."""

    def __init__(self, details: dict[str, Any], cause: BaseException):
        super().__init__(details)
        self.details = details
        self.cause = cause


class PromptExecutor:
    def __init__(self, hub: MessageHub | LaneHub, env: NodeEnvironment, interrupt: InterruptFlag):
        self.hub = hub
        self.env = env
        self.interrupt = interrupt
        self.reset()

    def reset(self) -> None:
        """Forget cached outputs and node instances (POST /free {"free_memory": true})."""
        self.outputs = OutputCache()
        self.objects = NodeObjectCache()

    def execute(
        self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], execute_outputs: list[str]
    ) -> tuple[bool, list[list[Any]], dict[str, Any]]:
        """Run one prompt. Returns (success, status messages, history result {outputs, meta}).
        The queue cleared the interrupt flag when it handed this prompt out."""
        self.hub.client_id = extra_data.get("client_id")
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            if self.hub.client_id is not None or broadcast:
                self.hub.send_sync(event, data, self.hub.client_id)

        add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        progress = ProgressRegistry(prompt_id, self.hub)
        self.outputs.set_prompt(prompt, IsChangedCache(prompt, self.env))
        self.objects.set_prompt(prompt)
        cached_nodes = [node_id for node_id in prompt if self.outputs.get(node_id) is not None]
        add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False)

        executed: list[str] = []
        current_outputs = self.outputs.all_node_ids()
        execution_list = ExecutionList(prompt, lambda node_id: self.outputs.get(node_id) is not None)
        for node_id in execute_outputs:
            execution_list.add_node(node_id)

        success = True
        while not execution_list.is_empty():
            node_id = execution_list.next_node()
            try:
                self._execute_node(prompt, prompt_id, node_id, extra_data, progress, executed)
            except _NodeFailure as failure:
                success = False
                node_type = prompt[node_id]["class_type"]
                if isinstance(failure.cause, InterruptProcessingException):
                    mes = {"prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": list(executed)}
                    add_message("execution_interrupted", mes, broadcast=True)
                else:
                    mes = {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": node_type,
                        "executed": list(executed),
                        **failure.details,
                        "current_outputs": list(current_outputs),
                    }
                    add_message("execution_error", mes, broadcast=False)
                break
            execution_list.complete(node_id)
        else:
            add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)

        # History outputs are the ui of every node of this prompt that has one in the cache.
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id in self.outputs.all_node_ids():
            entry = self.outputs.get(node_id)
            if entry is not None and entry.ui is not None:
                outputs[node_id] = entry.ui["output"]
                meta[node_id] = entry.ui["meta"]
        self.hub.last_node_id = None
        return success, messages, {"outputs": outputs, "meta": meta}

    def _execute_node(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        node_id: str,
        extra_data: dict[str, Any],
        progress: ProgressRegistry,
        executed: list[str],
    ) -> None:
        hub = self.hub
        class_type = prompt[node_id]["class_type"]
        cached = self.outputs.get(node_id)
        if cached is not None:
            if hub.client_id is not None:
                output = cached.ui["output"] if cached.ui is not None else None
                hub.send_sync("executed", {"node": node_id, "display_node": node_id, "output": output, "prompt_id": prompt_id}, hub.client_id)
            progress.finish_progress(node_id)
            return

        inputs: dict[str, Any] | None = None
        try:
            progress.start_progress(node_id)
            inputs = self._input_values(prompt, node_id)
            if hub.client_id is not None:
                hub.last_node_id = node_id
                hub.send_sync("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, hub.client_id)
            node = self.objects.get_or_create(node_id, class_type)
            # ComfyUI checks the interrupt flag right before calling the node function.
            self.interrupt.raise_if_set()
            if self.env.node_delay > 0:
                self.interrupt.sleep(self.env.node_delay)
            context = NodeRunContext(self.env, node_id, prompt, extra_data, self.interrupt, progress, hub)
            result: NodeOutput = node.run(context, **inputs)
            ui = None
            if result.ui:
                ui = {"meta": {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}, "output": result.ui}
                if hub.client_id is not None:
                    hub.send_sync("executed", {"node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": prompt_id}, hub.client_id)
            self.outputs.set(node_id, CacheEntry(outputs=result.values, ui=ui))
        except InterruptProcessingException as iex:
            logger.info("Processing interrupted")
            raise _NodeFailure({}, iex) from iex
        except Exception as ex:
            logger.error("!!! Exception during processing !!! %s", ex)
            logger.error(traceback.format_exc())
            tips = ""
            if isinstance(ex, OutOfMemoryError):
                tips = OOM_TIPS
                logger.error("Got an OOM, unloading all loaded models.")
            details = {
                "exception_message": "{}\n{}".format(ex, tips),
                "exception_type": full_type_name(type(ex)),
                "traceback": _node_traceback(ex),
                "current_inputs": {name: [_format_value(value)] for name, value in (inputs or {}).items()},
            }
            raise _NodeFailure(details, ex) from ex

        progress.finish_progress(node_id)
        executed.append(node_id)

    def _input_values(self, prompt: dict[str, Any], node_id: str) -> dict[str, Any]:
        """The node's declared inputs: links resolved to the linked node's cached output value,
        hidden inputs left to the run context."""
        node = prompt[node_id]
        declared = NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES(self.env)
        known = {**declared.get("required", {}), **declared.get("optional", {})}
        values = {}
        for name, value in node["inputs"].items():
            if name not in known:
                continue
            if isinstance(value, list):
                entry = self.outputs.get(value[0])
                values[name] = entry.outputs[value[1]] if entry is not None and value[1] < len(entry.outputs) else None
            else:
                values[name] = value
        return values


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def _node_traceback(ex: BaseException) -> list[str]:
    """ComfyUI's frames, then the node's: the real source frame for the gateway test nodes, the
    simulator's own frames for the other nodes."""
    source_frame = getattr(ex, "comfy_source_frame", None)
    if source_frame is not None:
        return [*_EXECUTION_FRAMES, source_frame]
    node_frames = traceback.format_tb(ex.__traceback__)[1:]  # drop the executor's own call frame
    return [*_EXECUTION_FRAMES, *node_frames]


class PromptWorker:
    """The worker thread that takes prompts off the queue, runs them and files history: one per server, as in
    ComfyUI, or one per lane on a server with parallel lanes (benchmarks)."""

    def __init__(self, queue: PromptQueue, executor: PromptExecutor, hub: MessageHub | LaneHub, name: str = "worker",
                 idle_wait: float | None = 0.5):
        self.queue = queue
        self.executor = executor
        self.hub = hub
        # How long an idle worker waits for a prompt before it looks again; None: until woken (a new prompt, a
        # flag, stop). Hundreds of idle lanes that woke twice a second would keep the server's event loop from
        # the GIL.
        self._idle_wait = idle_wait
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"comfyui-simulator-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.executor.interrupt.set()
        self.queue.wake_waiters()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            taken = self.queue.get(timeout=self._idle_wait, interrupt=self.executor.interrupt)
            if self._stopping.is_set():
                return  # shutting down: like a killed ComfyUI, leave what was taken unrun
            if taken is not None:
                self._run_item(*taken)
            flags = self.queue.take_flags()
            if flags.get("free_memory", False):
                self.executor.reset()

    def _run_item(self, item: tuple, task_id: int) -> None:
        number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive = item
        self.hub.last_prompt_id = prompt_id
        started = time.perf_counter()
        try:
            success, messages, history_result = self.executor.execute(
                prompt, prompt_id, {**extra_data, **sensitive}, outputs_to_execute
            )
        except Exception:
            # A simulator bug must not wedge the queue: file the prompt as failed and go on.
            logger.exception("simulator failed to execute prompt %s", prompt_id)
            success, messages, history_result = False, [], {"outputs": {}, "meta": {}}
        status = {"status_str": "success" if success else "error", "completed": success, "messages": messages}
        self.queue.task_done(task_id, history_result, status)
        if self.hub.client_id is not None:
            self.hub.send_sync("executing", {"node": None, "prompt_id": prompt_id}, self.hub.client_id)
        logger.info("Prompt executed in %.2f seconds", time.perf_counter() - started)

