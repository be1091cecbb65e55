"""A job's inputs, checked and completed before the job exists: a template's schema and defaults, a raw
graph's placeholders, the operator's limits, and image inputs turned into references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from api.inline_images import store_inline_images
from app.image_inputs import find_load_image_sources, replace_load_image_sources
from app.settings import Settings
from app.storage import OutputStorage
from app.tables import TemplateRow
from app.template_schema import image_fields, parse_schema, validate_inputs
from app.templates import check_limits, render_prompt


@dataclass(frozen=True)
class JobInputs:
    values: dict[str, Any]
    workflow_json: dict[str, Any] | None


async def template_job_inputs(
    template: TemplateRow, given: dict[str, Any], *, settings: Settings, storage: OutputStorage, http: httpx.AsyncClient
) -> JobInputs:
    """Raises PromptError listing every offending input."""
    schema = parse_schema(template.input_schema)
    values = validate_inputs(
        schema, template.default_params, given,
        max_image_size=settings.max_image_size, max_batch_size=settings.max_batch_size,
    )
    images = {name: values[name] for name in image_fields(schema) if values.get(name) is not None}
    values |= await store_inline_images(
        images, field_of=lambda name: f"inputs.{name}", storage=storage, http=http,
        max_bytes=settings.input_image_max_bytes,
    )
    render_prompt(template.workflow_json, values)  # every placeholder has its value
    return JobInputs(values=values, workflow_json=None)


async def graph_job_inputs(
    graph: dict[str, Any], given: dict[str, Any], *, settings: Settings, storage: OutputStorage, http: httpx.AsyncClient
) -> JobInputs:
    """Raises PromptError listing every offending place of the graph."""
    prompt = render_prompt(graph, given)
    check_limits(prompt, max_image_size=settings.max_image_size, max_batch_size=settings.max_batch_size)
    stored = await store_inline_images(
        find_load_image_sources(graph),
        field_of=lambda key: f"workflowJson.{key.removesuffix('.image')}.inputs.image",
        storage=storage, http=http, max_bytes=settings.input_image_max_bytes,
    )
    return JobInputs(values=given, workflow_json=replace_load_image_sources(graph, stored))
