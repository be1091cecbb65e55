"""Turning a workflow template (a ComfyUI API-format graph with {{placeholders}}) into a prompt.

A string that is exactly "{{name}}" becomes the typed value (number, boolean, list, object); "{{name}}"
inside a longer string is interpolated as text. Only node `inputs` are touched: node ids, class types,
`_meta` and links (["4", 0]) never are. Values are inserted as data, never re-parsed as JSON text, so an
input cannot inject nodes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import WithJsonSchema

from app.errors import FieldIssue, InvalidInput

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


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


# What check_graph_shape accepts, as JSON Schema: the API's document describes a graph as it is checked.
GRAPH_SHAPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": 'a ComfyUI graph in API format (ComfyUI\'s "Export (API)"): node id → {"class_type", "inputs"}',
    "minProperties": 1,
    "additionalProperties": {
        "type": "object",
        "required": ["class_type", "inputs"],
        "properties": {
            "class_type": {"type": "string", "pattern": r"\S", "not": {"pattern": _PLACEHOLDER.pattern}},
            "inputs": {"type": "object"},
        },
    },
}

ApiFormatGraph = Annotated[dict[str, Any], WithJsonSchema(GRAPH_SHAPE_SCHEMA)]


UI_FORMAT_HINT = ('this is a ComfyUI UI-format workflow ("nodes" and "links" arrays), not an API-format prompt: '
                  'in ComfyUI, save it with Workflow → "Export (API)" and send that file')


def is_ui_format(graph: dict[str, Any]) -> bool:
    """ComfyUI's UI save format (the editor's file: node positions, widgets, links as a list), which it cannot
    run as a prompt; its API format maps node ids to {"class_type", "inputs"}."""
    return isinstance(graph.get("nodes"), list) and isinstance(graph.get("links"), list)


def check_graph_shape(graph: Any) -> None:
    """An API-format prompt: {node_id: {"class_type": str, "inputs": {...}}}."""
    if not isinstance(graph, dict) or not graph:
        raise InvalidInput([FieldIssue("workflowJson", "must be a non-empty object of nodes in ComfyUI API format")])
    if is_ui_format(graph):  # one clear issue, rather than "node needs a string class_type" for each key
        raise InvalidInput([FieldIssue("workflowJson", UI_FORMAT_HINT)])
    issues = []
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str) or not class_type.strip():
            issues.append(FieldIssue(f"workflowJson.{node_id}", "node needs a string class_type"))
        elif _PLACEHOLDER.search(class_type):
            issues.append(FieldIssue(f"workflowJson.{node_id}.class_type", "placeholders go in inputs, not in class_type"))
        elif not isinstance(node.get("inputs"), dict):
            issues.append(FieldIssue(f"workflowJson.{node_id}.inputs", "every node needs an inputs object"))
    if issues:
        raise InvalidInput(issues)


def check_links(graph: dict[str, Any]) -> None:
    """Every link ["node id", output index] points at a node of the graph."""
    issues = []
    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if is_link(value) and (value[0] not in graph or value[1] < 0):
                issues.append(FieldIssue(f"workflowJson.{node_id}.inputs.{name}", f"links to missing node output {value}"))
    if issues:
        raise InvalidInput(issues)


def placeholders(graph: dict[str, Any]) -> set[str]:
    found: set[str] = set()

    def collect(text: str) -> str:
        found.update(_PLACEHOLDER.findall(text))
        return text

    for node in graph.values():
        _walk_strings(node.get("inputs", {}), collect)
    return found


def whole_placeholder(value: Any) -> str | None:
    """The input name when `value` is exactly "{{name}}" (which is replaced by the typed value)."""
    match = _PLACEHOLDER.fullmatch(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def render_prompt(graph: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    check_graph_shape(graph)
    missing = sorted(placeholders(graph) - values.keys())
    if missing:
        raise InvalidInput([FieldIssue(f"inputs.{name}", "required by the workflow but not given") for name in missing])

    def substitute(text: str) -> Any:
        if (name := whole_placeholder(text)) is not None:
            return values[name]
        return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)

    return {
        node_id: {**node, "inputs": _walk_strings(node.get("inputs", {}), substitute)}
        for node_id, node in graph.items()
    }
