import pytest

from app.errors import InvalidInput
from app.templates.schema import default_params_issues, parse_schema, to_json_schema, validate_inputs

SCHEMA = parse_schema({
    "type": "object",
    "fields": {
        "prompt": {"type": "string", "required": True, "maxLength": 20},
        "steps": {"type": "integer", "default": 20, "min": 1, "max": 100},
        "cfg": {"type": "number", "min": 0, "max": 30},
        "hires": {"type": "boolean", "default": False},
        "sampler": {"type": "enum", "enum": ["euler", "dpmpp_2m"], "default": "euler"},
        "init": {"type": "image"},
        "seed": {"type": "integer", "min": -1, "max": 4294967295},
        "width": {"type": "integer", "default": 512},
    },
})


def check(inputs: dict) -> dict:
    return validate_inputs(SCHEMA, {"filename_prefix": "x"}, inputs)


def fields_of(error: InvalidInput) -> dict[str, str]:
    return {issue.field: issue.message for issue in error.issues}


def test_defaults_fill_gaps_and_given_values_win() -> None:
    values = check({"prompt": "a cat", "steps": 30, "seed": 7})
    assert values == {"prompt": "a cat", "steps": 30, "hires": False, "sampler": "euler", "seed": 7,
                      "width": 512, "filename_prefix": "x"}


@pytest.mark.parametrize("given", [{}, {"seed": -1}])
def test_missing_or_minus_one_seed_is_drawn_within_the_fields_range(given: dict) -> None:
    seeds = {check({"prompt": "p", **given})["seed"] for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= seed <= 4294967295 for seed in seeds)


def test_every_offending_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidInput) as raised:
        check({"prompt": "x" * 21, "steps": 0, "cfg": "high", "hires": "yes", "sampler": "ddim",
               "init": "", "width": 4096.5, "surprise": 1})
    assert fields_of(raised.value) == {
        "inputs.surprise": "not an input of this workflow",
        "inputs.prompt": "must be at most 20 characters",
        "inputs.steps": "must be at least 1",
        "inputs.cfg": "must be a number",
        "inputs.hires": "must be true or false",
        "inputs.sampler": "must be one of ['euler', 'dpmpp_2m']",
        "inputs.init": "must be an image: an http(s) URL, a data URI or base64",
        "inputs.width": "must be a whole number",
    }


def test_bounds_are_told_exactly_never_rounded() -> None:
    schema = parse_schema({"fields": {"seed": {"type": "integer", "min": 0, "max": 16777215},
                                      "cfg": {"type": "number", "min": 0.1, "max": 12.345678}}})
    with pytest.raises(InvalidInput) as raised:
        validate_inputs(schema, {}, {"seed": 16777216, "cfg": 0.05})
    assert fields_of(raised.value) == {"inputs.seed": "must be at most 16777215", "inputs.cfg": "must be at least 0.1"}
    with pytest.raises(InvalidInput) as raised:
        validate_inputs(schema, {}, {"cfg": 12.3457})
    assert fields_of(raised.value) == {"inputs.cfg": "must be at most 12.345678"}


def test_required_and_whole_numbers() -> None:
    with pytest.raises(InvalidInput) as raised:
        check({"steps": 2.5})
    assert fields_of(raised.value) == {"inputs.prompt": "is required", "inputs.steps": "must be a whole number"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"type": "array"}, "inputSchema"),
        ({"fields": {"a": {"type": "colour"}}}, "inputSchema.fields.a.type"),
        ({"fields": {"a": {"type": "enum"}}}, "inputSchema.fields.a"),
        ({"fields": {"a": {"type": "integer", "min": 5, "max": 1}}}, "inputSchema.fields.a"),
        ({"fields": {"a": {"type": "integer", "default": "five"}}}, "inputSchema.fields.a"),
        ({"fields": {"a": {"type": "string", "colour": "red"}}}, "inputSchema.fields.a.colour"),
        ({"fields": 5}, "inputSchema.fields"),
        ({"fields": None}, "inputSchema.fields"),
        ({"fields": [{"type": "string"}]}, "inputSchema.fields"),
        ({"fields": {"a": {"type": "string", "required": True, "default": "x"}}}, "inputSchema.fields.a.default"),
        ({"fields": {"a": {"type": "integer", "maxLength": 3}}}, "inputSchema.fields.a.maxLength"),
        ({"fields": {"a": {"type": "string", "min": 1}}}, "inputSchema.fields.a.min"),
        ({"fields": {"a": {"type": "boolean", "max": 1}}}, "inputSchema.fields.a.max"),
        ({"fields": {"a": {"type": "integer", "enum": [1, 2]}}}, "inputSchema.fields.a.enum"),
        ({"fields": {"a": {"type": "enum", "enum": [["2", 0]]}}}, "inputSchema.fields.a.enum"),
        ({"fields": {"a": {"type": "integer", "min": "1"}}}, "inputSchema.fields.a.min"),
        ({"fields": {"a": {"type": "integer", "min": True}}}, "inputSchema.fields.a.min"),
        ({"fields": {"a": {"type": "number", "max": float("inf")}}}, "inputSchema.fields.a.max"),
        ({"fields": {"a": {"type": "string", "maxLength": "5"}}}, "inputSchema.fields.a.maxLength"),
        ({"fields": {"a": {"type": "string", "required": "yes"}}}, "inputSchema.fields.a.required"),
    ],
)
def test_invalid_schemas_are_refused_naming_the_place(raw: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_schema(raw)
    assert field in fields_of(raised.value)


def test_valid_constraints_for_each_type_still_parse() -> None:
    parse_schema({"fields": {
        "n": {"type": "number", "min": 0, "max": 1.5, "default": 1},
        "s": {"type": "string", "maxLength": 8, "enum": ["a", "b"], "required": True},
        "i": {"type": "image", "maxLength": 4096},
        "e": {"type": "enum", "enum": [1, 2.5, "x", True], "default": 2.5},
    }})


@pytest.mark.parametrize(
    ("default_params", "field", "message"),
    [
        ({"steps": 999999}, "defaultParams.steps", "must be at most 100"),
        ({"steps": "abc"}, "defaultParams.steps", "must be a number"),
        ({"sampler": "ddim"}, "defaultParams.sampler", "must be one of ['euler', 'dpmpp_2m']"),
        ({"prompt": "a cat"}, "defaultParams.prompt", "inputSchema.fields.prompt is required, so it takes no default"),
        ({"filename_prefix": None}, "defaultParams.filename_prefix", "null is not a value; leave it out"),
    ],
)
def test_default_params_must_fit_their_fields(default_params: dict, field: str, message: str) -> None:
    assert {issue.field: issue.message for issue in default_params_issues(SCHEMA, default_params)} == {field: message}


def test_default_params_that_fit_or_that_the_schema_does_not_declare_pass() -> None:
    assert default_params_issues(SCHEMA, {"steps": 30, "cfg": 7.5, "filename_prefix": "x", "extra": ["a", 1]}) == []


@pytest.mark.parametrize("name", ["prompt", "steps", "seed", "filename_prefix"])
def test_null_is_not_an_input_value(name: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        check({"prompt": "a cat", name: None})
    assert fields_of(raised.value) == {f"inputs.{name}": "null is not a value; leave the field out to use its default"}


@pytest.mark.parametrize(("choices", "value"), [([1, 2], True), ([0, 1], False), ([True, False], 1), ([True, False], 0.0)])
def test_booleans_and_numbers_never_match_each_others_choices(choices: list, value: object) -> None:
    schema = parse_schema({"fields": {"a": {"type": "enum", "enum": choices}}})
    with pytest.raises(InvalidInput) as raised:
        validate_inputs(schema, {}, {"a": value})
    assert fields_of(raised.value) == {"inputs.a": f"must be one of {choices}"}


@pytest.mark.parametrize(("choices", "value"), [([True, False], False), ([1, 2], 1), ([1, 2], 2.0), (["a", 1], "a")])
def test_enum_values_among_the_choices_are_taken(choices: list, value: object) -> None:
    schema = parse_schema({"fields": {"a": {"type": "enum", "enum": choices}}})
    assert validate_inputs(schema, {}, {"a": value}) == {"a": value}


@pytest.mark.parametrize(
    ("default", "value", "message"),
    [
        ("x", ["2", 0], "must be a string"),
        ("x", {"a": 1}, "must be a string"),
        ("x", 5, "must be a string"),
        (8, True, "must be a number"),
        (8, 2.5, "must be a whole number"),
        (8, "8", "must be a number"),
        (0.5, False, "must be a number"),
        (True, 1, "must be true or false"),
        (["a"], "a", "must be a list, like its default"),
        (["a"], {"a": 1}, "must be a list, like its default"),
        (["a"], ["2", 0], "must not be a link to a node output, [node id, output]"),
        ({"a": 1}, ["a"], "must be an object, like its default"),
        (None, ["2", 0], "must not be a list or an object"),
    ],
)
def test_inputs_only_in_default_params_take_the_type_of_their_default(default: object, value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        validate_inputs(parse_schema({}), {"extra": default}, {"extra": value})
    assert fields_of(raised.value) == {"inputs.extra": message}


@pytest.mark.parametrize(("default", "value"), [("x", "y"), (8, 9), (0.5, 2), (True, False), (["a"], ["b", "c"]), ({}, {"k": 1})])
def test_inputs_of_their_defaults_type_are_taken(default: object, value: object) -> None:
    values = validate_inputs(parse_schema({}), {"extra": default}, {"extra": value})
    assert values == {"extra": value}


def test_numbers_must_be_finite() -> None:
    with pytest.raises(InvalidInput) as raised:
        check({"prompt": "p", "cfg": float("nan"), "steps": float("inf")})
    assert fields_of(raised.value) == {"inputs.cfg": "must be a finite number", "inputs.steps": "must be a finite number"}


def test_json_schema_export() -> None:
    exported = to_json_schema(SCHEMA, {"filename_prefix": "x"})
    assert exported["type"] == "object" and exported["required"] == ["prompt"]
    assert exported["additionalProperties"] is False
    props = exported["properties"]
    assert props["steps"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
    assert props["prompt"] == {"type": "string", "maxLength": 20}
    assert props["sampler"] == {"enum": ["euler", "dpmpp_2m"], "default": "euler"}
    assert props["init"]["type"] == "string" and props["init"]["contentMediaType"] == "image/*"
    assert props["filename_prefix"] == {"default": "x"}
