"""ComfyUI's classic output cache (HierarchicalCache keyed by CacheKeySetInputSignature).

A node's key is its input signature: class type, IS_CHANGED result and constant inputs of the
node and of all its ancestors. When a prompt starts, keys are computed for every node of it and
entries under any other key are dropped, so only the most recent prompt's nodes stay cached. A
node whose IS_CHANGED is NaN gets a key equal to nothing else, so it and everything downstream of
it always run. Each entry holds the node's output values and the `ui` it reported, which is why a
cached output node re-sends `executed` with the files of the run that produced it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from .node_types import NodeEnvironment
from .registry import NODE_CLASS_MAPPINGS

logger = logging.getLogger(__name__)


@dataclass
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None  # {"meta": ..., "output": ...} for nodes that reported a ui


class OutputCache:
    def __init__(self) -> None:
        self._entries: dict[Any, CacheEntry] = {}
        self._keys: dict[str, Any] = {}

    def set_prompt(self, prompt: dict[str, Any], is_changed: Callable[[str], Any]) -> None:
        """Key every node of `prompt` and drop entries no node of it uses."""
        self._keys = {node_id: _node_signature(prompt, node_id, is_changed) for node_id in prompt}
        used = set(self._keys.values())
        self._entries = {key: entry for key, entry in self._entries.items() if key in used}

    def get(self, node_id: str) -> CacheEntry | None:
        key = self._keys.get(node_id)
        return None if key is None else self._entries.get(key)

    def set(self, node_id: str, entry: CacheEntry) -> None:
        self._entries[self._keys[node_id]] = entry

    def all_node_ids(self) -> list[str]:
        return list(self._keys)


class NodeObjectCache:
    """Node instances by (node id, class type), reused across prompts while the node stays in the
    current prompt: it is what keeps PreviewImage's random filename suffix between runs."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], Any] = {}

    def set_prompt(self, prompt: dict[str, Any]) -> None:
        used = {(node_id, node["class_type"]) for node_id, node in prompt.items()}
        self._objects = {key: obj for key, obj in self._objects.items() if key in used}

    def get_or_create(self, node_id: str, class_type: str) -> Any:
        key = (node_id, class_type)
        if key not in self._objects:
            self._objects[key] = NODE_CLASS_MAPPINGS[class_type]()
        return self._objects[key]


class IsChangedCache:
    """IS_CHANGED of each node of one prompt, computed once from its constant inputs.

    A NaN result (or an IS_CHANGED that raises) becomes a fresh object, equal only to itself: the
    node's key then matches no earlier entry, as NaN != NaN does in ComfyUI."""

    def __init__(self, prompt: dict[str, Any], env: NodeEnvironment):
        self._prompt = prompt
        self._env = env
        self._values: dict[str, Any] = {}

    def __call__(self, node_id: str) -> Any:
        if node_id not in self._values:
            self._values[node_id] = self._compute(node_id)
        return self._values[node_id]

    def _compute(self, node_id: str) -> Any:
        node = self._prompt[node_id]
        node_class = NODE_CLASS_MAPPINGS[node["class_type"]]
        is_changed = getattr(node_class, "IS_CHANGED", None)
        if is_changed is None:
            return False
        declared = node_class.INPUT_TYPES(self._env)
        known = {**declared.get("required", {}), **declared.get("optional", {})}
        # Links have no value before execution; ComfyUI passes them as None.
        constants = {
            name: None if isinstance(value, list) else value for name, value in node["inputs"].items() if name in known
        }
        try:
            value = is_changed(self._env, **constants)
        except Exception as exc:
            logger.warning("WARNING: %s", exc)
            return object()
        if isinstance(value, float) and math.isnan(value):
            return object()
        return _hashable(value)


def _node_signature(prompt: dict[str, Any], node_id: str, is_changed: Callable[[str], Any]) -> Any:
    ancestors: list[str] = []
    order: dict[str, int] = {}
    _collect_ancestors(prompt, node_id, ancestors, order)
    return tuple(_immediate_signature(prompt, n, order, is_changed) for n in [node_id, *ancestors])


def _collect_ancestors(prompt: dict[str, Any], node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
    inputs = prompt[node_id]["inputs"]
    for name in sorted(inputs):
        if _is_link(inputs[name]):
            ancestor_id = inputs[name][0]
            if ancestor_id not in order and ancestor_id in prompt:
                ancestors.append(ancestor_id)
                order[ancestor_id] = len(ancestors) - 1
                _collect_ancestors(prompt, ancestor_id, ancestors, order)


def _immediate_signature(prompt: dict[str, Any], node_id: str, order: dict[str, int], is_changed: Callable[[str], Any]) -> Any:
    node = prompt[node_id]
    signature: list[Any] = [node["class_type"], is_changed(node_id)]
    for name in sorted(node["inputs"]):
        value = node["inputs"][name]
        if _is_link(value):
            signature.append((name, ("ANCESTOR", order[value[0]], value[1])))
        else:
            signature.append((name, _hashable(value)))
    return tuple(signature)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _hashable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, Mapping):
        return frozenset((_hashable(k), _hashable(v)) for k, v in sorted(value.items()))
    if isinstance(value, Sequence):
        return frozenset(zip(itertools.count(), (_hashable(item) for item in value)))
    return object()
