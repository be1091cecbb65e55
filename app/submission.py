"""What is checked before a job exists, as one pipeline the route calls:

    validate inputs → render → check limits → find image sources → store inline images

A bad input raises `InvalidInput` listing every offending field, named as the client wrote it (`inputs.x`
for a value it gave, `workflowJson.<node>.inputs.<name>` for a place in a graph), and nothing is spent on it:
no workflow, no GPU time, no stored image. Every check runs on the rendered graph, so a placeholder cannot
smuggle in what the graph itself may not hold.

Inline images (data URIs, base64) are checked and put in storage, named by content, and the job carries a
reference instead of the bytes: bytes never travel through Temporal, whose payloads are limited to 2 MB.
Jobs that send the same image share its stored object; each one's use of it is noted (`ImageIntake.note_use`)
before it is stored, so that retention deletes it only when no job uses it any more.
URLs are checked as far as can be told without fetching them; the job itself fetches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from app.errors import FieldIssue, InvalidInput
from app.images.decoding import ImageInputError, LoadedImage
from app.images.fetching import check_image_url
from app.images.load_image import find_load_image_sources, load_image_key, node_of, replace_load_image_sources
from app.images.loading import load_image_source
from app.images.sources import classify_image_source, stored_reference
from app.storage import OutputStorage
from app.tables import TemplateRow
from app.templates.limits import Limits, check_limits
from app.templates.rendering import check_links, render_prompt, whole_placeholder
from app.templates.schema import draws_seed, image_fields, parse_schema, validate_inputs

_NOT_AN_IMAGE = "must be an image: an http(s) URL, a data URI or base64"


@dataclass(frozen=True)
class ImageIntake:
    """Where inline images go, and the limits they are checked against."""

    storage: OutputStorage
    # Called with the storage keys of the job's inline images before they are stored (app.retention).
    note_use: Callable[[list[str]], Awaitable[None]]
    http: httpx.AsyncClient
    max_bytes: int
    max_pixels: int
    allow_private_urls: bool


@dataclass(frozen=True)
class PreparedJob:
    # The values the job runs with: defaults filled in, a seed drawn, inline images replaced by references.
    inputs: dict[str, Any]
    # A raw graph with its own inline images replaced by references; None for a template job.
    workflow_json: dict[str, Any] | None
    # The prompt the job runs: the graph rendered with `inputs`, as the worker's render_prompt would render it.
    prompt: dict[str, Any]
    # The gateway drew the seed (the client gave none, or -1): the request does not determine the result.
    seed_drawn: bool = False
    # An image input is a URL, fetched when the job runs: what it serves may change.
    fetches_urls: bool = False

    @property
    def reproducible(self) -> bool:
        """Whether the same request always makes the same job: what the result cache may answer."""
        return not self.seed_drawn and not self.fetches_urls


@dataclass(frozen=True)
class _Place:
    """Where a value of the rendered prompt came from: a client's input, or a node of the graph."""

    input_name: str | None
    node_id: str | None = None
    node_input: str | None = None

    @property
    def field(self) -> str:
        if self.input_name is not None:
            return f"inputs.{self.input_name}"
        return f"workflowJson.{self.node_id}.inputs.{self.node_input}"


def _place(graph: dict[str, Any], node_id: str, node_input: str) -> _Place:
    fed_by = whole_placeholder(graph[node_id]["inputs"].get(node_input))
    return _Place(fed_by) if fed_by is not None else _Place(None, node_id, node_input)


async def prepare_job(
    *,
    template: TemplateRow | None,
    workflow_json: dict[str, Any] | None,
    given: dict[str, Any],
    limits: Limits,
    images: ImageIntake,
) -> PreparedJob:
    """Raises InvalidInput listing every offending field."""
    if template is not None:
        graph = template.workflow_json
        schema = parse_schema(template.input_schema)
        values = validate_inputs(schema, template.default_params, given)
        seed_drawn = draws_seed(schema, template.default_params, given)
        limits = limits.for_template(template.limits)
    else:  # the gateway draws no seed for a raw graph: what it runs is the graph as given
        graph, schema, values, seed_drawn = workflow_json or {}, None, dict(given), False
    prompt = render_prompt(graph, values)
    if template is None:
        check_links(prompt)  # a registered template's links were checked when it was registered
    check_limits(prompt, limits, field_of=lambda node_id, name: _place(graph, node_id, name).field)

    sources = {_place(graph, node_of(key), "image"): source for key, source in find_load_image_sources(prompt).items()}
    # The template's own images included: a URL in it may serve something else tomorrow.
    fetches_urls = any(classify_image_source(source) == "url" for source in sources.values())
    if schema is not None:
        # A template's own images are its registrar's, staged from the template when the job runs.
        sources = {place: source for place, source in sources.items() if place.input_name is not None}
        sources |= {_Place(name): values[name] for name in image_fields(schema) if values.get(name) is not None}
    fetches_urls = fetches_urls or any(classify_image_source(source) == "url" for source in sources.values())
    stored = await _store_inline_images(sources, images)

    values |= {place.input_name: reference for place, reference in stored.items() if place.input_name is not None}
    if template is None:
        in_graph = {load_image_key(place.node_id): reference for place, reference in stored.items() if place.node_id}
        graph = replace_load_image_sources(graph, in_graph)
    if stored:  # the references in place of the inline images
        prompt = render_prompt(graph, values)
    return PreparedJob(inputs=values, workflow_json=None if template is not None else graph, prompt=prompt,
                       seed_drawn=seed_drawn, fetches_urls=fetches_urls)


async def _store_inline_images(sources: dict[_Place, str], intake: ImageIntake) -> dict[_Place, str]:
    """place → stored reference, for each source that is an inline image (URLs are left to the job). Every
    bad source is reported at once, and then nothing is stored."""
    images: dict[_Place, LoadedImage] = {}
    issues: list[FieldIssue] = []
    for place, source in sources.items():
        kind = classify_image_source(source)
        try:
            if kind == "url":
                check_image_url(source, field=place.field, allow_private=intake.allow_private_urls)
                continue
            if kind not in ("data_uri", "base64"):  # stored references are the gateway's own, never a client's
                issues.append(FieldIssue(place.field, _NOT_AN_IMAGE))
                continue
            images[place] = await load_image_source(
                source, http=intake.http, max_bytes=intake.max_bytes, max_pixels=intake.max_pixels,
                allow_private_urls=False, field=place.field
            )
        except ImageInputError as error:
            issues.append(FieldIssue(error.field, error.message))
    if issues:
        raise InvalidInput(issues)
    if images:
        await intake.note_use([image.storage_key for image in images.values()])
    for image in images.values():
        await asyncio.to_thread(intake.storage.put_bytes, image.storage_key, image.data, image.content_type)
    return {place: stored_reference(image.storage_key) for place, image in images.items()}
