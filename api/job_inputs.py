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
from app.templates import check_limits, check_links, render_prompt, whole_placeholder


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
        max_bytes=settings.input_image_max_bytes, allow_private_urls=settings.input_image_allow_private_urls,
    )
    render_prompt(template.workflow_json, values)  # every placeholder has its value
    return JobInputs(values=values, workflow_json=None)


async def graph_job_inputs(
    graph: dict[str, Any], given: dict[str, Any], *, settings: Settings, storage: OutputStorage, http: httpx.AsyncClient
) -> JobInputs:
    """Raises PromptError listing every offending place of the graph. The checks run on the rendered prompt,
    so a placeholder cannot smuggle in what the graph itself may not hold."""
    prompt = render_prompt(graph, given)
    check_links(prompt)
    check_limits(prompt, max_image_size=settings.max_image_size, max_batch_size=settings.max_batch_size)
    sources = find_load_image_sources(prompt)
    # An image given through a placeholder is stored under that input; one written into the graph, in place.
    fed_by = {key: name for key in sources if (name := whole_placeholder(_load_image_value(graph, key)))}
    stored = await store_inline_images(
        sources,
        field_of=lambda key: f"inputs.{fed_by[key]}" if key in fed_by else f"workflowJson.{_node_of(key)}.inputs.image",
        storage=storage, http=http, max_bytes=settings.input_image_max_bytes,
        allow_private_urls=settings.input_image_allow_private_urls,
    )
    values = given | {fed_by[key]: reference for key, reference in stored.items() if key in fed_by}
    in_graph = {key: reference for key, reference in stored.items() if key not in fed_by}
    return JobInputs(values=values, workflow_json=replace_load_image_sources(graph, in_graph))


def _node_of(load_image_key: str) -> str:
    return load_image_key.removesuffix(".image")


def _load_image_value(graph: dict[str, Any], load_image_key: str) -> Any:
    return graph[_node_of(load_image_key)]["inputs"].get("image")
