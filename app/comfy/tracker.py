"""Follows one prompt's WebSocket events and turns them into a percentage and a current node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.comfy.client import WsEvent


@dataclass
class PromptTracker:
    prompt_id: str
    prompt: dict[str, Any]
    started: bool = False
    current_node: str | None = None
    _done_nodes: set[str] = field(default_factory=set)
    _partial: dict[str, float] = field(default_factory=dict)

    def concerns(self, event: WsEvent) -> bool:
        return event.data.get("prompt_id") == self.prompt_id

    def apply(self, event: WsEvent) -> None:
        data = event.data
        if event.type == "execution_start":
            self.started = True
        elif event.type == "execution_cached":
            self._done_nodes.update(str(node) for node in data.get("nodes", []))
        elif event.type == "executing" and data.get("node") is not None:
            self.started = True
            self.current_node = str(data["node"])
        elif event.type == "progress_state":
            for node_id, state in (data.get("nodes") or {}).items():
                if state.get("state") == "finished":
                    self._done_nodes.add(str(node_id))
                    self._partial.pop(str(node_id), None)
                elif state.get("max"):
                    self._partial[str(node_id)] = float(state.get("value", 0)) / float(state["max"])
        elif event.type == "progress" and data.get("max"):
            self._partial[str(data.get("node"))] = float(data.get("value", 0)) / float(data["max"])
        elif event.type == "executed" and data.get("node") is not None:
            self._done_nodes.add(str(data["node"]))

    @property
    def node_type(self) -> str | None:
        node = self.prompt.get(self.current_node or "")
        return node.get("class_type") if isinstance(node, dict) else None

    @property
    def percent(self) -> int:
        """Share of the graph's nodes done (cached nodes count as done); 100 only once the result is in."""
        total = max(len(self.prompt), 1)
        done = len(self._done_nodes & self.prompt.keys())
        partial = sum(value for node, value in self._partial.items() if node not in self._done_nodes)
        return min(99, int(100 * (done + partial) / total))
