"""What a simulated node is and what it can reach while it runs.

A node class follows ComfyUI's V1 node protocol (INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE, CATEGORY,
optional IS_CHANGED / VALIDATE_INPUTS) with one difference: the class methods take the
NodeEnvironment of their simulated server first, and `run` takes a NodeRunContext first, because
one Python process may host several simulated servers (each with its own data dir and counters).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .interrupt import InterruptFlag
from .paths import DataPaths
from .progress import ProgressBar, ProgressRegistry, make_progress_hook
from .websocket_hub import MessageHub


@dataclass
class NodeEnvironment:
    """Settings and state shared by the nodes of one simulated server process.

    time_scale multiplies TestSleepProgress's sleep; node_delay is added to every executed node
    (simulated GPU time); flaky_calls are TestFlaky's per-key call counters, which a restart of
    the process forgets, as with the real node."""

    paths: DataPaths
    time_scale: float = 1.0
    node_delay: float = 0.0
    flaky_calls: dict[str, int] = field(default_factory=dict)


@dataclass
class NodeOutput:
    """What `run` returns: the values on the node's output sockets and, for output nodes, the
    `ui` dict ComfyUI reports in `executed` events and in history outputs."""

    values: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


class NodeRunContext:
    """One execution of one node: its hidden inputs, progress bar and interrupt checkpoints."""

    def __init__(
        self,
        env: NodeEnvironment,
        node_id: str,
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
        interrupt: InterruptFlag,
        progress: ProgressRegistry,
        hub: MessageHub,
    ):
        self.env = env
        self.node_id = node_id
        self.prompt = prompt
        self.extra_pnginfo = extra_data.get("extra_pnginfo")
        self._interrupt = interrupt
        self._hook = make_progress_hook(progress, hub, interrupt, node_id)

    def progress_bar(self, total: int) -> ProgressBar:
        return ProgressBar(total, self._hook)

    def sleep(self, seconds: float) -> None:
        """Sleep, raising InterruptProcessingException within 50 ms of POST /interrupt."""
        self._interrupt.sleep(seconds)

    def check_interrupted(self) -> None:
        self._interrupt.raise_if_set()


class SimulatedNode(ABC):
    """Base of every simulated node class: ComfyUI's class attributes with their defaults."""

    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_NODE: ClassVar[bool] = False
    CATEGORY: ClassVar[str] = "sd"
    DESCRIPTION: ClassVar[str] = ""
    DISPLAY_NAME: ClassVar[str | None] = None
    PYTHON_MODULE: ClassVar[str] = "nodes"

    @classmethod
    @abstractmethod
    def INPUT_TYPES(cls, env: NodeEnvironment) -> dict[str, dict[str, tuple]]:
        """{"required": {name: (type, options)}, "optional": {...}, "hidden": {...}} as in ComfyUI."""

    @abstractmethod
    def run(self, ctx: NodeRunContext, **inputs: Any) -> NodeOutput:
        """Execute the node on its inputs (links resolved to values)."""


def full_type_name(klass: type) -> str:
    """How ComfyUI names an exception class in errors: "RuntimeError", "torch.OutOfMemoryError"."""
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"
