"""Template registrations the API tests send: a schema over the recorded image template, and variations."""

from __future__ import annotations

from typing import Any

from tests.harness import recorded_workflow

TEMPLATE = recorded_workflow("image.template.json")
SCHEMA = {"type": "object", "fields": {
    "width": {"type": "integer", "min": 8, "max": 4096, "default": 64},
    "height": {"type": "integer", "min": 8, "max": 4096, "default": 64},
    "color": {"type": "integer", "min": 0, "max": 16777215, "required": True},
    "seed": {"type": "integer", "min": -1, "max": 1000000},
}}


def with_field(name: str, **settings: Any) -> dict[str, Any]:
    """SCHEMA with one field's settings changed (or a field added)."""
    fields = {**SCHEMA["fields"], name: {**SCHEMA["fields"].get(name, {"type": "integer"}), **settings}}
    return {**SCHEMA, "fields": fields}


def registration(template_id: str, **changes: Any) -> dict[str, Any]:
    body = {"id": template_id, "name": "Solid", "description": "test template", "workflowJson": TEMPLATE,
            "inputSchema": SCHEMA, "defaultParams": {"filename_prefix": f"{template_id}_v1"}}
    return {**body, **changes}
