"""A template's input schema, in the format clients already use:

    {"type": "object", "fields": {name: {type, required, default, min, max, maxLength, enum, description}}}

with `type` one of string | number | integer | boolean | image | enum. Job inputs are checked against it
before a job exists, every offending field reported at once; the schema is also offered as standard JSON
Schema so generic tools can build forms.
"""

from __future__ import annotations

import math
import secrets
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, ValidationInfo
from pydantic import field_validator, model_validator

from app.errors import FieldIssue, InvalidInput
from app.images.sources import classify_image_source
from app.templates.rendering import is_link

SEED_FIELD = "seed"
# Seeds ComfyUI samplers accept; kept within JSON's exact integers.
_SEED_RANGE = 2**48


class FieldType(str, Enum):
    string = "string"
    number = "number"
    integer = "integer"
    boolean = "boolean"
    image = "image"
    enum = "enum"


_NUMERIC_TYPES = (FieldType.number, FieldType.integer)
_TEXT_TYPES = (FieldType.string, FieldType.image)
# Schema values are taken as written: "1" is not a number, "yes" is not true.
_StrictNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _refuse_unless_type(info: ValidationInfo, types: tuple[FieldType, ...], constraint: str) -> None:
    """A constraint the field's type never checks would be silently ignored: refuse it. An invalid type is
    reported on its own, so it is not reported again here."""
    kind = info.data.get("type")
    if kind is not None and kind not in types:
        raise ValueError(f"{constraint}, not to {kind.value} fields")


class InputField(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: FieldType
    required: StrictBool = False
    default: Any = None
    min: _StrictNumber | None = None
    max: _StrictNumber | None = None
    max_length: StrictInt | None = Field(None, alias="maxLength", ge=0)
    enum: list[Any] | None = None
    description: StrictStr = ""

    @field_validator("default")
    @classmethod
    def _not_with_required(cls, default: Any, info: ValidationInfo) -> Any:
        if default is not None and info.data.get("required"):
            raise ValueError("a required field has no default: leave out one or the other")
        return default

    @field_validator("min", "max")
    @classmethod
    def _bound_of_a_number(cls, bound: float | None, info: ValidationInfo) -> float | None:
        if bound is not None:
            _refuse_unless_type(info, _NUMERIC_TYPES, f"{info.field_name} applies to number and integer fields")
        return bound

    @field_validator("max_length")
    @classmethod
    def _length_of_a_string(cls, length: int | None, info: ValidationInfo) -> int | None:
        if length is not None:
            _refuse_unless_type(info, _TEXT_TYPES, "maxLength applies to string and image fields")
        return length

    @field_validator("enum")
    @classmethod
    def _scalar_choices(cls, choices: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if choices is None:
            return None
        _refuse_unless_type(info, (FieldType.enum, *_TEXT_TYPES), "enum applies to enum, string and image fields")
        # A list or an object put in place of a "{{name}}" could become a link to another node.
        if not all(isinstance(choice, (str, int, float)) for choice in choices):
            raise ValueError("choices must be strings, numbers or booleans")
        return choices

    @model_validator(mode="after")
    def _consistent(self) -> "InputField":
        if self.type is FieldType.enum and not self.enum:
            raise ValueError("an enum field needs a non-empty `enum` list")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is larger than max")
        if self.default is not None:
            problem = _problem(self, self.default)
            if problem:
                raise ValueError(f"default {self.default!r}: {problem}")
        return self


class InputSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = "object"
    fields: dict[str, InputField] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _object(self) -> "InputSchema":
        if self.type != "object":
            raise ValueError('type must be "object"')
        return self


def parse_schema(raw: dict[str, Any]) -> InputSchema:
    """The schema as registered; problems are reported as fields of `inputSchema`."""
    try:
        return InputSchema.model_validate(raw or {})
    except ValidationError as error:
        raise InvalidInput.of(error, "inputSchema") from error


def _problem(field: InputField, value: Any) -> str | None:
    """Why `value` does not fit `field`, or None when it does."""
    kind = field.type
    if kind is FieldType.boolean:
        return None if isinstance(value, bool) else "must be true or false"
    if kind in _NUMERIC_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if kind is FieldType.integer and not (isinstance(value, int) or float(value).is_integer()):
            return "must be a whole number"
        if field.min is not None and value < field.min:
            return f"must be at least {_exactly(field.min)}"
        if field.max is not None and value > field.max:
            return f"must be at most {_exactly(field.max)}"
        return None
    if kind is FieldType.enum:
        return None if _is_choice(value, field.enum or []) else f"must be one of {field.enum}"
    if not isinstance(value, str):
        return "must be a string"
    if kind is FieldType.image and classify_image_source(value) not in ("url", "data_uri", "base64"):
        return "must be an image: an http(s) URL, a data URI or base64"
    if field.max_length is not None and len(value) > field.max_length:
        return f"must be at most {field.max_length} characters"
    if field.enum and not _is_choice(value, field.enum):
        return f"must be one of {field.enum}"
    return None


def _exactly(bound: float) -> str:
    """A bound as it is compared, never rounded: a whole one as an int (16777215, not 1.67772e+07), else its repr."""
    return str(int(bound)) if bound.is_integer() and abs(bound) < 2**53 else repr(bound)


def _is_choice(value: Any, choices: list[Any]) -> bool:
    """`value in choices`, except that true and false are not 1 and 0: a boolean matches only a boolean."""
    return any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in choices)


def validate_inputs(schema: InputSchema, default_params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The template's values for a job: defaults filled in, every field checked, a random seed drawn when
    the template has one and the client gave none (or -1), so the stored inputs reproduce the result. Sizes
    and batches are checked later, on the rendered graph (app.templates.limits)."""
    issues = _given_issues(schema, default_params, inputs)
    values = _filled_in(schema, default_params, inputs)
    if draws_seed(schema, default_params, inputs):
        values[SEED_FIELD] = _random_seed(schema.fields.get(SEED_FIELD))
    for name, spec in schema.fields.items():
        if values.get(name) is None:
            if spec.required and name not in inputs:  # one given as null is reported already
                issues.append(FieldIssue(f"inputs.{name}", "is required"))
            continue
        problem = _problem(spec, values[name])
        if problem:
            issues.append(FieldIssue(f"inputs.{name}", problem))
    if issues:
        raise InvalidInput(issues)
    return values


def _filled_in(schema: InputSchema, default_params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    known = schema.fields.keys() | default_params.keys()
    values = {**default_params, **{name: spec.default for name, spec in schema.fields.items() if spec.default is not None}}
    values.update({name: value for name, value in inputs.items() if name in known and value is not None})
    return values


def draws_seed(schema: InputSchema, default_params: dict[str, Any], inputs: dict[str, Any]) -> bool:
    """Whether validate_inputs draws the job's seed: the template has one, and neither the client nor the
    template's defaults give one (or they give -1). Such a job's request does not determine its result."""
    known = schema.fields.keys() | default_params.keys()
    return SEED_FIELD in known and _filled_in(schema, default_params, inputs).get(SEED_FIELD) in (None, -1)


def _given_issues(schema: InputSchema, default_params: dict[str, Any], inputs: dict[str, Any]) -> list[FieldIssue]:
    """What is wrong with the inputs as the client gave them. Those the schema declares are checked later,
    with the defaults filled in."""
    issues = []
    for name, value in sorted(inputs.items()):
        if name not in schema.fields and name not in default_params:
            problem: str | None = "not an input of this workflow"
        elif value is None:
            problem = "null is not a value; leave the field out to use its default"
        elif name not in schema.fields:
            problem = _problem_against_default(default_params[name], value)
        else:
            continue
        if problem:
            issues.append(FieldIssue(f"inputs.{name}", problem))
    return issues


# An input that only defaultParams declares takes the JSON type of its default.
_TYPE_OF_DEFAULT = {bool: FieldType.boolean, int: FieldType.integer, float: FieldType.number, str: FieldType.string}


def _problem_against_default(default: Any, value: Any) -> str | None:
    """Why `value` does not fit an input that only defaultParams declares. In place of a "{{name}}", a list
    or an object could become a link to another node: one is taken only where the default is one too, and a
    list never in the shape of a link."""
    if isinstance(default, (list, dict)):
        if type(value) is not type(default):
            return f"must be {'a list' if isinstance(default, list) else 'an object'}, like its default"
        return "must not be a link to a node output, [node id, output]" if is_link(value) else None
    kind = _TYPE_OF_DEFAULT.get(type(default))
    if kind is not None:
        return _problem(InputField(type=kind), value)
    # A null default, registered before defaults were checked, gives no type; still no list or object.
    return "must not be a list or an object" if isinstance(value, (list, dict)) else None


def default_params_issues(schema: InputSchema, default_params: dict[str, Any]) -> list[FieldIssue]:
    """defaultParams fill what a job leaves out, so a value its field refuses would fail every job relying on
    it. One the schema does not declare is any JSON value but null: it gives its input a type."""
    issues = []
    for name, value in default_params.items():
        spec = schema.fields.get(name)
        if value is None:
            problem: str | None = "null is not a value; leave it out"
        elif spec is None:
            continue
        elif spec.required:
            problem = f"inputSchema.fields.{name} is required, so it takes no default"
        else:
            problem = _problem(spec, value)
        if problem:
            issues.append(FieldIssue(f"defaultParams.{name}", problem))
    return issues


def _random_seed(spec: InputField | None) -> int:
    low = max(0, int(spec.min)) if spec is not None and spec.min is not None else 0
    high = int(spec.max) + 1 if spec is not None and spec.max is not None else _SEED_RANGE
    return low + secrets.randbelow(max(1, min(high, _SEED_RANGE) - low))


def image_fields(schema: InputSchema) -> list[str]:
    return [name for name, spec in schema.fields.items() if spec.type is FieldType.image]


def to_json_schema(schema: InputSchema, default_params: dict[str, Any]) -> dict[str, Any]:
    """The same inputs as standard JSON Schema (draft 2020-12)."""
    properties: dict[str, Any] = {}
    for name, spec in schema.fields.items():
        prop: dict[str, Any] = {}
        if spec.type is FieldType.image:
            prop = {"type": "string", "contentMediaType": "image/*",
                    "description": spec.description or "an http(s) URL, a data URI or base64"}
        elif spec.type is FieldType.enum:
            prop = {"enum": spec.enum}
        else:
            prop = {"type": spec.type.value}
        if spec.description and "description" not in prop:
            prop["description"] = spec.description
        if spec.min is not None:
            prop["minimum"] = spec.min
        if spec.max is not None:
            prop["maximum"] = spec.max
        if spec.max_length is not None:
            prop["maxLength"] = spec.max_length
        if spec.enum and spec.type is not FieldType.enum:
            prop["enum"] = spec.enum
        default = spec.default if spec.default is not None else default_params.get(name)
        if default is not None:
            prop["default"] = default
        properties[name] = prop
    for name, default in default_params.items():
        properties.setdefault(name, {"default": default})
    required = sorted(name for name, spec in schema.fields.items() if spec.required and spec.default is None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
