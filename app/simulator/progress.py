"""Per-node progress of the running prompt: the `progress_state` and `progress` WS events.

Mirrors ComfyUI's comfy_execution/progress.py (ProgressRegistry + WebUIProgressHandler) and the
ProgressBar hook main.py installs. Every change of a node's state sends a `progress_state` event
carrying the full map of non-pending nodes; a ProgressBar update additionally sends `progress`
and, when it carries a preview image, a binary preview frame.
"""

from __future__ import annotations

from typing import Any, Callable

from .interrupt import InterruptFlag
from .websocket_hub import BinaryEventTypes, MessageHub, PreviewImage

PENDING, RUNNING, FINISHED = "pending", "running", "finished"


class ProgressRegistry:
    """Progress of every node of one prompt, reported to the prompt's client."""

    def __init__(self, prompt_id: str, hub: MessageHub):
        self.prompt_id = prompt_id
        self.hub = hub
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        # A node first seen through finish_progress (served from cache) reports ints 1/1, a node
        # that starts running reports floats 0.0/1.0: the recordings show both, as ComfyUI does.
        return self.nodes.setdefault(node_id, {"state": PENDING, "value": 0, "max": 1})

    def start_progress(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state=RUNNING, value=0.0, max=1.0)
        self._send_state()

    def update_progress(self, node_id: str, value: float, max_value: float, preview: PreviewImage | None) -> None:
        entry = self._entry(node_id)
        entry.update(state=RUNNING, value=value, max=max_value)
        self._send_state()
        client_id = self.hub.client_id
        if preview is not None and self.hub.supports_feature(client_id, "supports_preview_metadata"):
            metadata = {
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            self.hub.send_sync(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, (preview, metadata), client_id)

    def finish_progress(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state=FINISHED, value=entry["max"])
        self._send_state()

    def _send_state(self) -> None:
        nodes = {
            node_id: {
                "value": state["value"],
                "max": state["max"],
                "state": state["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, state in self.nodes.items()
            if state["state"] != PENDING
        }
        self.hub.send_sync("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.hub.client_id)


class ProgressBar:
    """comfy.utils.ProgressBar as a node sees it: `update(n)` / `update_absolute(value, total, preview)`."""

    def __init__(self, total: int, hook: Callable[[int, int, PreviewImage | None], None]):
        self.total = total
        self.current = 0
        self._hook = hook

    def update_absolute(self, value: int, total: int | None = None, preview: PreviewImage | None = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        self._hook(self.current, self.total, preview)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def make_progress_hook(
    registry: ProgressRegistry, hub: MessageHub, interrupt: InterruptFlag, node_id: str
) -> Callable[[int, int, PreviewImage | None], None]:
    """The hook ComfyUI's main.py installs for ProgressBar: it is also an interrupt checkpoint."""

    def hook(value: int, total: int, preview: PreviewImage | None) -> None:
        interrupt.raise_if_set()
        registry.update_progress(node_id, value, total, preview)
        hub.send_sync(
            "progress",
            {"value": value, "max": total, "prompt_id": registry.prompt_id, "node": node_id},
            hub.client_id,
        )
        if preview is not None and not hub.supports_feature(hub.client_id, "supports_preview_metadata"):
            hub.send_sync(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, preview, hub.client_id)

    return hook
