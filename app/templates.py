"""Turning a workflow template (a ComfyUI API-format graph with {{placeholders}}) into a prompt.

A string that is exactly "{{name}}" becomes the typed value (number, boolean, list, object); "{{name}}"
inside a longer string is interpolated as text. Only node `inputs` are touched: node ids, class types,
`_meta` and links (["4", 0]) never are. Values are inserted as data, never re-parsed as JSON text, so an
input cannot inject nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_WHOLE_PLACEHOLDER = re.compile(r"^\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")
_IMAGE_SIZE_INPUTS = ("width", "height")


@dataclass(frozen=True)
class FieldIssue:
    field: str
    message: str


class PromptError(ValueError):
    def __init__(self, issues: list[FieldIssue]) -> None:
        super().__init__("; ".join(f"{issue.field}: {issue.message}" for issue in issues))
        self.issues = issues


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _walk_strings(value: Any, visit) -> Any:  # type: ignore[no-untyped-def]
    if isinstance(value, str):
        return visit(value)
    if is_link(value):
        return value
    if isinstance(value, list):
        return [_walk_strings(item, visit) for item in value]
    if isinstance(value, dict):
        return {key: _walk_strings(item, visit) for key, item in value.items()}
    return value


def check_graph_shape(graph: Any) -> None:
    """An API-format prompt: {node_id: {"class_type": str, "inputs": {...}}}."""
    if not isinstance(graph, dict) or not graph:
        raise PromptError([FieldIssue("workflowJson", "must be a non-empty object of nodes in ComfyUI API format")])
    issues = []
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            issues.append(FieldIssue(f"workflowJson.{node_id}", "node needs a string class_type"))
        elif not isinstance(node.get("inputs", {}), dict):
            issues.append(FieldIssue(f"workflowJson.{node_id}.inputs", "must be an object"))
    if issues:
        raise PromptError(issues)


def check_links(graph: dict[str, Any]) -> None:
    """Every link ["node id", output index] points at a node of the graph."""
    issues = []
    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if is_link(value) and (value[0] not in graph or value[1] < 0):
                issues.append(FieldIssue(f"workflowJson.{node_id}.inputs.{name}", f"links to missing node output {value}"))
    if issues:
        raise PromptError(issues)


def placeholders(graph: dict[str, Any]) -> set[str]:
    found: set[str] = set()

    def collect(text: str) -> str:
        found.update(_PLACEHOLDER.findall(text))
        return text

    for node in graph.values():
        _walk_strings(node.get("inputs", {}), collect)
    return found


def render_prompt(graph: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    check_graph_shape(graph)
    missing = sorted(placeholders(graph) - values.keys())
    if missing:
        raise PromptError([FieldIssue(f"inputs.{name}", "required by the workflow but not given") for name in missing])

    def substitute(text: str) -> Any:
        whole = _WHOLE_PLACEHOLDER.match(text)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)

    return {
        node_id: {**node, "inputs": _walk_strings(node.get("inputs", {}), substitute)}
        for node_id, node in graph.items()
    }


def check_limits(prompt: dict[str, Any], *, max_image_size: int, max_batch_size: int) -> None:
    """Refuse sizes and batches beyond the operator's limits before any GPU time is spent."""
    issues = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        for name in _IMAGE_SIZE_INPUTS:
            value = inputs.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > max_image_size:
                issues.append(FieldIssue(f"{name} (node {node_id})", f"{value} exceeds MAX_IMAGE_SIZE {max_image_size}"))
        batch = inputs.get("batch_size")
        if isinstance(batch, (int, float)) and not isinstance(batch, bool) and batch > max_batch_size:
            issues.append(FieldIssue(f"batch_size (node {node_id})", f"{batch} exceeds MAX_BATCH_SIZE {max_batch_size}"))
    if issues:
        raise PromptError(issues)
