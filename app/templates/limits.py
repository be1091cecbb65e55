"""Limits on what a job may ask of ComfyUI: image sizes and batch sizes, checked on the rendered graph of every
job, template or raw, before the job exists. Checking the rendered graph, not input names, means no name a
template gives its fields (`size`, `n`) and no placeholder can carry a value past a limit.

The operator's MAX_IMAGE_SIZE and MAX_BATCH_SIZE hold for every job; a template may carry limits of its own,
set by whoever registers it (a video template whose frames are one batch needs a larger batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from app.errors import FieldIssue, InvalidInput

_IMAGE_SIZE_INPUTS = ("width", "height")
_BATCH_INPUTS = ("batch_size",)


class TemplateLimits(BaseModel):
    """A template's `limits`, as registered: {"maxImageSize": N, "maxBatchSize": M}, each optional."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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
        inputs = node.get("inputs", {})
        for name, limit in checked:
            value = _as_number(inputs.get(name))
            if value is None:
                continue
            if value > limit.value:
                issues.append(FieldIssue(field_of(node_id, name), f"{inputs[name]} exceeds {limit.name} {limit.value}"))
            elif value < 0:
                issues.append(FieldIssue(field_of(node_id, name), f"{inputs[name]} is negative"))
    if issues:
        raise InvalidInput(issues)


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
