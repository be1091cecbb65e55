"""Registering workflow templates: what makes a template valid, and what is worth a warning."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.comfy.errors import ComfyError
from app.errors import FieldIssue, InvalidInput
from app.comfy.backends import valid_tag
from app.templates.limits import parse_template_limits
from app.templates.rendering import check_graph_shape, check_links, is_link, placeholders
from app.templates.schema import InputSchema, default_params_issues, parse_schema

TEMPLATE_ID_MAX_LENGTH = 128
# fullmatch: "$" would let a trailing newline in
TEMPLATE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{TEMPLATE_ID_MAX_LENGTH - 1}}}")


@dataclass
class TemplateSpec:
    template_id: str
    name: str
    workflow_json: dict[str, Any]
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)
    default_params: dict[str, Any] = field(default_factory=dict)
    # {"maxImageSize": N, "maxBatchSize": M}: this template's own limits in place of the operator's.
    limits: dict[str, Any] = field(default_factory=dict)
    # Its jobs run only on a backend with this tag (COMFYUI_URLS), unless a job names its own.
    backend_tag: str | None = None


def check_template(spec: TemplateSpec) -> InputSchema:
    """Refuse what cannot work: a bad id, a graph that is not an API-format prompt, a link to a missing node,
    a placeholder that neither the schema nor the defaults declare, an invalid schema, a default its field
    would refuse, or limits that are not positive whole numbers."""
    issues: list[FieldIssue] = []
    if not TEMPLATE_ID.fullmatch(spec.template_id):
        issues.append(FieldIssue("id", "letters, digits, '_', '-' and '.', starting with a letter or digit, at most 128"))
    schema: InputSchema | None = None
    for check in (lambda: check_graph_shape(spec.workflow_json), lambda: check_links(spec.workflow_json)):
        try:
            check()
        except InvalidInput as error:
            issues += error.issues
            break
    else:
        declared = _field_names(spec.input_schema) | spec.default_params.keys()
        issues += [
            FieldIssue(f"workflowJson: {{{{{name}}}}}", "placeholder is neither in inputSchema.fields nor in defaultParams")
            for name in sorted(placeholders(spec.workflow_json) - declared)
        ]
    try:
        schema = parse_schema(spec.input_schema)
        issues += default_params_issues(schema, spec.default_params)
    except InvalidInput as error:
        issues += error.issues
    try:
        parse_template_limits(spec.limits)
    except InvalidInput as error:
        issues += error.issues
    if spec.backend_tag is not None:
        try:
            valid_tag(spec.backend_tag)
        except ValueError as error:
            issues.append(FieldIssue("backendTag", str(error)))
    if issues:
        raise InvalidInput(issues)
    assert schema is not None
    return schema


def _field_names(raw_schema: dict[str, Any]) -> set[str]:
    """The names the schema declares, read before it is parsed so that the graph is checked even when the
    schema has problems of its own (reported by parse_schema); a `fields` that is not an object declares none."""
    fields = raw_schema.get("fields")
    return set(fields) if isinstance(fields, dict) else set()


@dataclass
class NodeTypeReport:
    warnings: list[str]
    issues: list[FieldIssue]


async def check_node_types(graph: dict[str, Any], object_info: Callable[[], Awaitable[dict[str, Any]]]) -> NodeTypeReport:
    """Against the ComfyUI's own node types (`object_info()`, ComfyUI's /object_info): an unknown type is a
    warning (its node pack may be installed later); a link to an output a known node does not have is an
    error. When ComfyUI is down, a warning says that nothing was checked."""
    try:
        known = await object_info()
    except ComfyError as error:
        return NodeTypeReport([f"node types not checked: {error.message}"], [])
    unknown: dict[str, list[str]] = {}
    issues = []
    for node_id, node in graph.items():
        if node["class_type"] not in known:
            unknown.setdefault(node["class_type"], []).append(node_id)
        for name, value in node.get("inputs", {}).items():
            source = graph.get(value[0]) if is_link(value) else None
            outputs = known.get(source["class_type"], {}).get("output") if source else None
            if outputs is not None and value[1] >= len(outputs):
                issues.append(FieldIssue(
                    f"workflowJson.{node_id}.inputs.{name}",
                    f"links to output {value[1]} of node {value[0]} ({source['class_type']}), which has {len(outputs)}",
                ))
    warnings = [f"ComfyUI has no node type {class_type} (nodes {', '.join(ids)})" for class_type, ids in sorted(unknown.items())]
    return NodeTypeReport(warnings, issues)
