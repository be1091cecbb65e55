"""Which node of a prompt runs next (ComfyUI's comfy_execution.graph.ExecutionList).

Starting from the outputs to execute, a node is added with every uncached node it depends on; a
node becomes ready once all its uncached inputs have run. Among ready nodes ComfyUI prefers an
output node, then a node feeding an output node, then one two steps away, so results show up
early; the simulator picks the same way, which fixes the order of `executing` events.
"""

from __future__ import annotations

from typing import Any, Callable

from .registry import NODE_CLASS_MAPPINGS


class ExecutionList:
    def __init__(self, prompt: dict[str, Any], is_cached: Callable[[str], bool]):
        self._prompt = prompt
        self._is_cached = is_cached
        self._pending: dict[str, bool] = {}  # insertion-ordered, as ComfyUI's pendingNodes
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, set[int]]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, int, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self._pending:
                continue
            self._pending[unique_id] = True
            self._block_count[unique_id] = 0
            self._blocking[unique_id] = {}
            for value in self._prompt[unique_id]["inputs"].values():
                if isinstance(value, list) and len(value) == 2:
                    from_id, from_socket = value
                    if not self._is_cached(from_id):
                        stack.append(from_id)
                    links.append((from_id, from_socket, unique_id))
        for from_id, from_socket, to_id in links:
            self._add_strong_link(from_id, from_socket, to_id)

    def _add_strong_link(self, from_id: str, from_socket: int, to_id: str) -> None:
        if self._is_cached(from_id):
            return
        self.add_node(from_id)
        if to_id not in self._blocking[from_id]:
            self._blocking[from_id][to_id] = set()
            self._block_count[to_id] += 1
        self._blocking[from_id][to_id].add(from_socket)

    def is_empty(self) -> bool:
        return not self._pending

    def next_node(self) -> str:
        ready = [node_id for node_id in self._pending if self._block_count[node_id] == 0]
        return self._pick_for_user_experience(ready)

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for blocked_id in self._blocking.pop(node_id):
            self._block_count[blocked_id] -= 1

    def _is_output(self, node_id: str) -> bool:
        return NODE_CLASS_MAPPINGS[self._prompt[node_id]["class_type"]].OUTPUT_NODE

    def _pick_for_user_experience(self, ready: list[str]) -> str:
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(blocked) for blocked in self._blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self._blocking[node_id]:
                if any(self._is_output(next_blocked) for next_blocked in self._blocking.get(blocked, {})):
                    return node_id
        return ready[0]
