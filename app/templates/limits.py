"""Limits on what a job may ask of ComfyUI: image sizes and batch sizes, checked on the rendered graph of every
job, template or raw, before the job exists. Checking the rendered graph, not input names, means no name a
template gives its fields (`size`, `n`) and no placeholder can carry a value past a limit.

What is checked: every node's `width`, `height` and `batch_size`, given as a number, a numeric string, or a
link to one of ComfyUI's primitive number nodes. A value a node computes (a scale factor, a custom node's
arithmetic) only ComfyUI knows. The operator's MAX_IMAGE_SIZE and MAX_BATCH_SIZE hold for every job of a raw
graph and of a template without limits of its own; a template's own limits, set by whoever registers it (a
video template whose frames are one batch needs a larger batch), replace them for its jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from app.errors import FieldIssue, InvalidInput
from app.templates.rendering import is_link

_IMAGE_SIZE_INPUTS = ("width", "height")
_BATCH_INPUTS = ("batch_size",)
# ComfyUI's own nodes that hand a constant `value` on (comfy_extras/nodes_primitive.py).
_PRIMITIVE_NUMBER_NODES = frozenset({"PrimitiveInt", "PrimitiveFloat"})
_MAX_PRIMITIVE_HOPS = 8


class TemplateLimits(BaseModel):
    """A template's `limits`, as registered: {"maxImageSize": N, "maxBatchSize": M}, each optional."""

    model_config = ConfigDict(extra="forbid")  # camelCase only, as every request field

    max_image_size: StrictInt | None = Field(None, alias="maxImageSize", ge=1, le=65536)
    max_batch_size: StrictInt | None = Field(None, alias="maxBatchSize", ge=1, le=100_000)


def parse_template_limits(raw: dict[str, Any] | None) -> TemplateLimits:
    try:
        return TemplateLimits.model_validate(raw or {})
    except ValidationError as error:
        raise InvalidInput.of(error, "limits") from error


@dataclass(frozen=True)
class Limit:
    value: int
    name: str  # how the limit is named in a refusal: "MAX_IMAGE_SIZE", "the template's maxImageSize"


@dataclass(frozen=True)
class Limits:
    image_size: Limit
    batch_size: Limit

    @classmethod
    def of_settings(cls, max_image_size: int, max_batch_size: int) -> "Limits":
        return cls(Limit(max_image_size, "MAX_IMAGE_SIZE"), Limit(max_batch_size, "MAX_BATCH_SIZE"))

    def for_template(self, raw_limits: dict[str, Any] | None) -> "Limits":
        own = parse_template_limits(raw_limits)
        return Limits(
            Limit(own.max_image_size, "the template's maxImageSize") if own.max_image_size else self.image_size,
            Limit(own.max_batch_size, "the template's maxBatchSize") if own.max_batch_size else self.batch_size,
        )


def check_limits(prompt: dict[str, Any], limits: Limits, *, field_of: Callable[[str, str], str]) -> None:
    """Refuse sizes and batches beyond the limits before any GPU time is spent. `field_of(node_id, input)`
    names the place a client can fix: the input that fed it, or the node of a raw graph."""
    checked = [(name, limits.image_size) for name in _IMAGE_SIZE_INPUTS] + [
        (name, limits.batch_size) for name in _BATCH_INPUTS
    ]
    issues = []
    for node_id, node in prompt.items():
        for name, limit in checked:
            if name not in node.get("inputs", {}):
                continue
            source, written = _constant(prompt, node_id, name)
            value = _as_number(written)
            if value is None:
                continue
            if value > limit.value:
                issues.append(FieldIssue(field_of(*source), f"{written} exceeds {limit.name} {limit.value}"))
            elif value < 0:
                issues.append(FieldIssue(field_of(*source), f"{written} is negative"))
    if issues:
        raise InvalidInput(issues)


def _constant(prompt: dict[str, Any], node_id: str, name: str) -> tuple[tuple[str, str], Any]:
    """(node id, input) where the value of `node_id.name` is written, and that value: the input itself, or
    the `value` of the primitive number node it links to."""
    source, value = (node_id, name), prompt[node_id]["inputs"][name]
    for _ in range(_MAX_PRIMITIVE_HOPS):
        linked = prompt.get(value[0]) if is_link(value) else None
        if not isinstance(linked, dict) or linked.get("class_type") not in _PRIMITIVE_NUMBER_NODES:
            break
        source, value = (value[0], "value"), (linked.get("inputs") or {}).get("value")
    return source, value


def _as_number(value: Any) -> float | None:
    """The number ComfyUI will see: it accepts numeric strings ("320") for number inputs."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
