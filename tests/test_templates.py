import json
from pathlib import Path

import pytest

from app.errors import InvalidInput
from app.templates.limits import Limits, check_limits
from app.templates.rendering import placeholders, render_prompt
from app.templates.store import BUNDLED_TEMPLATES_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "workflows"
TEMPLATE = json.loads((BUNDLED_TEMPLATES_DIR / "solid_color.json").read_text())["workflowJson"]


def test_whole_placeholder_takes_the_typed_value_and_links_stay() -> None:
    prompt = render_prompt(TEMPLATE, {"width": 64, "height": 32, "color": 255, "filename_prefix": "x"})
    assert prompt["1"]["inputs"] == {"width": 64, "height": 32, "batch_size": 1, "color": 255}
    assert prompt["2"]["inputs"]["images"] == ["1", 0]
    assert prompt["1"]["_meta"] == TEMPLATE["1"]["_meta"]


def test_embedded_placeholder_is_interpolated_as_text_and_never_reparsed() -> None:
    graph = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "run_{{name}}_v{{n}}"}}}
    injected = '"}, "9": {"class_type": "Evil"'
    prompt = render_prompt(graph, {"name": injected, "n": 2})
    assert prompt["1"]["inputs"]["filename_prefix"] == f"run_{injected}_v2"
    assert set(prompt) == {"1"}


def test_values_that_look_like_placeholders_are_not_expanded_again() -> None:
    graph = {"1": {"class_type": "X", "inputs": {"a": "{{a}}", "b": "{{b}}"}}}
    assert render_prompt(graph, {"a": "{{b}}", "b": 1})["1"]["inputs"] == {"a": "{{b}}", "b": 1}


def test_missing_values_are_all_named() -> None:
    with pytest.raises(InvalidInput) as raised:
        render_prompt(TEMPLATE, {"width": 1})
    assert [issue.field for issue in raised.value.issues] == ["inputs.color", "inputs.filename_prefix", "inputs.height"]


def test_graph_shape_is_checked() -> None:
    with pytest.raises(InvalidInput) as raised:
        render_prompt({"1": {"inputs": {}}}, {})
    assert raised.value.issues[0].field == "workflowJson.1"


def node_field(node_id: str, name: str) -> str:
    return f"workflowJson.{node_id}.inputs.{name}"


def test_limits_refuse_large_images_and_batches() -> None:
    prompt = json.loads((SHARED / "batch.json").read_text())
    check_limits(prompt, Limits.of_settings(512, 4), field_of=node_field)
    with pytest.raises(InvalidInput) as raised:
        check_limits(prompt, Limits.of_settings(256, 2), field_of=node_field)
    fields = [issue.field for issue in raised.value.issues]
    assert fields == ["workflowJson.1.inputs.width", "workflowJson.1.inputs.height", "workflowJson.1.inputs.batch_size"]


def test_limits_see_numbers_as_comfyui_does() -> None:
    # ComfyUI coerces "99999" to a number, so a string must not slip past the limit; negatives never fit.
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": "99999", "height": -5, "batch_size": "2"}}}
    with pytest.raises(InvalidInput) as raised:
        check_limits(prompt, Limits.of_settings(2048, 4), field_of=node_field)
    assert [(issue.field, issue.message) for issue in raised.value.issues] == [
        ("workflowJson.1.inputs.width", "99999 exceeds MAX_IMAGE_SIZE 2048"),
        ("workflowJson.1.inputs.height", "-5 is negative"),
    ]


def test_limits_follow_links_to_primitive_number_nodes() -> None:
    prompt = {
        "9": {"class_type": "PrimitiveInt", "inputs": {"value": 16384}},
        "8": {"class_type": "PrimitiveInt", "inputs": {"value": ["9", 0]}},
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": ["8", 0], "height": 64, "batch_size": ["7", 0]}},
        "7": {"class_type": "SomeCustomNode", "inputs": {"amount": 64}},  # what it computes only ComfyUI knows
    }
    with pytest.raises(InvalidInput) as raised:
        check_limits(prompt, Limits.of_settings(2048, 4), field_of=node_field)
    assert [(issue.field, issue.message) for issue in raised.value.issues] == [
        ("workflowJson.9.inputs.value", "16384 exceeds MAX_IMAGE_SIZE 2048"),
    ]


def test_a_templates_own_limits_replace_the_operators() -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 16}}}
    template_limits = Limits.of_settings(2048, 4).for_template({"maxBatchSize": 16})
    check_limits(prompt, template_limits, field_of=node_field)
    with pytest.raises(InvalidInput) as raised:
        check_limits(prompt, Limits.of_settings(2048, 4).for_template({"maxImageSize": 32}), field_of=node_field)
    assert [(issue.field, issue.message) for issue in raised.value.issues] == [
        ("workflowJson.1.inputs.width", "64 exceeds the template's maxImageSize 32"),
        ("workflowJson.1.inputs.height", "64 exceeds the template's maxImageSize 32"),
        ("workflowJson.1.inputs.batch_size", "16 exceeds MAX_BATCH_SIZE 4"),
    ]


@pytest.mark.parametrize(
    "limits", [{"maxBatchSize": 0}, {"maxImageSize": "64"}, {"maxFrames": 3}, {"maxBatchSize": 1.5}, {"max_batch_size": 8}]
)
def test_template_limits_must_be_positive_whole_numbers(limits: dict) -> None:
    with pytest.raises(InvalidInput) as raised:
        Limits.of_settings(2048, 4).for_template(limits)
    assert all(issue.field.startswith("limits.") for issue in raised.value.issues)


@pytest.mark.parametrize(
    ("node", "field"),
    [
        ({"class_type": "", "inputs": {}}, "workflowJson.1"),
        ({"class_type": "{{node}}", "inputs": {}}, "workflowJson.1.class_type"),
        ({"class_type": "EmptyImage"}, "workflowJson.1.inputs"),
    ],
)
def test_every_node_needs_a_real_class_type_and_inputs(node: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        render_prompt({"1": node}, {"node": "SaveImage"})
    assert [issue.field for issue in raised.value.issues] == [field]


def test_recorded_template_placeholders() -> None:
    graph = json.loads((SHARED / "image.template.json").read_text())
    assert placeholders(graph) == {"width", "height", "color", "filename_prefix"}
