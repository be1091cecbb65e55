"""POST /prompt validation with ComfyUI 0.3.64's rules and error shapes (execution.validate_prompt).

Only nodes an output node depends on are validated. Widget values are converted to their declared
type in place (so "320" becomes 320 in the queued prompt), then checked against min/max and combo
choices unless the node's VALIDATE_INPUTS takes that input. A prompt is accepted when at least one
output validates; the failing outputs are then reported in node_errors and not executed.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from typing import Any

from .node_types import NodeEnvironment, full_type_name
from .registry import NODE_CLASS_MAPPINGS

ValidationResult = tuple[bool, list[dict[str, Any]], str]


def validate_prompt(
    prompt: dict[str, Any], partial_execution_targets: list[str] | None, env: NodeEnvironment
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """Returns (valid, error, outputs_to_execute, node_errors), like ComfyUI."""
    outputs: list[str] = []
    for node_id in prompt:
        if "class_type" not in prompt[node_id]:
            return False, _prompt_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.", f"Node ID '#{node_id}'"), [], {}
        class_type = prompt[node_id]["class_type"]
        node_class = NODE_CLASS_MAPPINGS.get(class_type)
        if node_class is None:
            return False, _prompt_error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.", f"Node ID '#{node_id}'"), [], {}
        if node_class.OUTPUT_NODE and (partial_execution_targets is None or node_id in partial_execution_targets):
            outputs.append(node_id)

    if not outputs:
        return False, _prompt_error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    good_outputs: list[str] = []
    failed_outputs: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, ValidationResult] = {}
    for output_id in outputs:
        try:
            valid, reasons, _ = _validate_inputs(prompt, output_id, validated, env, visiting=[])
        except Exception as ex:
            valid = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {"exception_type": full_type_name(type(ex)), "traceback": traceback.format_tb(sys.exc_info()[2])},
                }
            ]
            validated[output_id] = (False, reasons, output_id)

        if valid is True:
            good_outputs.append(output_id)
            continue
        failed_outputs.append((output_id, reasons))
        for node_id, (node_valid, node_reasons, _) in validated.items():
            # Nodes downstream of an invalid node are invalid without reasons of their own;
            # ComfyUI reports only the nodes that carry reasons.
            if node_valid is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]}
                node_errors[node_id]["dependent_outputs"].append(output_id)

    if not good_outputs:
        details = "\n".join(f"{error['message']}: {error['details']}" for _, reasons in failed_outputs for error in reasons)
        return False, _prompt_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], node_errors
    return True, None, good_outputs, node_errors


def _prompt_error(error_type: str, message: str, details: str) -> dict[str, Any]:
    return {"type": error_type, "message": message, "details": details, "extra_info": {}}


def _validate_inputs(
    prompt: dict[str, Any], node_id: str, validated: dict[str, ValidationResult], env: NodeEnvironment, visiting: list[str]
) -> ValidationResult:
    if node_id in validated:
        return validated[node_id]
    if node_id in visiting:
        # ComfyUI 0.3.64 has no cycle check: validating a cycle recursed until Python gave up.
        raise RecursionError("maximum recursion depth exceeded")

    inputs = prompt[node_id]["inputs"]
    node_class = NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]
    class_inputs = node_class.INPUT_TYPES(env)
    validate_function = getattr(node_class, "VALIDATE_INPUTS", None)
    validate_function_inputs = _parameter_names(validate_function) if validate_function else []

    errors: list[dict[str, Any]] = []
    valid = True
    received_types: dict[str, str] = {}
    declared = [*class_inputs.get("required", {}), *class_inputs.get("optional", {})]
    for name in declared:
        input_type, category, extra_info = _input_info(class_inputs, name)
        if name not in inputs:
            if category == "required":
                errors.append(
                    {"type": "required_input_missing", "message": "Required input is missing", "details": name, "extra_info": {"input_name": name}}
                )
            continue

        value = inputs[name]
        info = [input_type, extra_info]
        if isinstance(value, list):
            if len(value) != 2:
                errors.append(
                    {
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": name,
                        "extra_info": {"input_name": name, "input_config": info, "received_value": value},
                    }
                )
                continue
            linked_id = value[0]
            # A link to a missing node raises KeyError here, outside the try below: ComfyUI then
            # reports exception_during_validation on the output being validated.
            linked_class_type = prompt[linked_id]["class_type"]
            received_type = NODE_CLASS_MAPPINGS[linked_class_type].RETURN_TYPES[value[1]]
            received_types[name] = received_type
            if "input_types" not in validate_function_inputs and not validate_node_input(received_type, input_type):
                errors.append(
                    {
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                        "extra_info": {"input_name": name, "input_config": info, "received_type": received_type, "linked_node": value},
                    }
                )
                continue
            try:
                linked_result = _validate_inputs(prompt, linked_id, validated, env, [*visiting, node_id])
                if linked_result[0] is False:
                    valid = False
                    continue
            except Exception as ex:
                valid = False
                validated[linked_id] = (
                    False,
                    [
                        {
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": str(ex),
                            "extra_info": {
                                "input_name": name,
                                "input_config": info,
                                "exception_message": str(ex),
                                "exception_type": full_type_name(type(ex)),
                                "traceback": traceback.format_tb(sys.exc_info()[2]),
                                "linked_node": value,
                            },
                        }
                    ],
                    linked_id,
                )
                continue
        else:
            try:
                value = _convert_widget_value(value, input_type)
                inputs[name] = value
            except Exception as ex:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{name}, {value}, {ex}",
                        "extra_info": {"input_name": name, "input_config": info, "received_value": value, "exception_message": str(ex)},
                    }
                )
                continue
            if name not in validate_function_inputs:
                range_error = _range_or_choice_error(name, value, input_type, extra_info, info)
                if range_error is not None:
                    errors.append(range_error)
                    continue

    if validate_function is not None and validate_function_inputs:
        arguments = _validation_arguments(inputs, class_inputs, validate_function_inputs)
        if "input_types" in validate_function_inputs:
            arguments["input_types"] = received_types
        outcome = validate_function(env, **arguments)
        if outcome is not True:
            for name in arguments:
                details = name if outcome is False else f"{name} - {outcome}"
                errors.append(
                    {"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": details, "extra_info": {"input_name": name}}
                )

    result: ValidationResult = (False, errors, node_id) if errors or valid is not True else (True, [], node_id)
    validated[node_id] = result
    return result


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    """ComfyUI's type compatibility: equal, "*" wildcard, or overlapping comma-separated unions."""
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    accepted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in accepted:
        return True
    return bool(received & accepted)


def _convert_widget_value(value: Any, input_type: Any) -> Any:
    if input_type == "INT":
        return int(value)
    if input_type == "FLOAT":
        return float(value)
    if input_type == "STRING":
        return str(value)
    if input_type == "BOOLEAN":
        return bool(value)
    return value


def _range_or_choice_error(name: str, value: Any, input_type: Any, extra_info: dict, info: list) -> dict[str, Any] | None:
    if "min" in extra_info and value < extra_info["min"]:
        return {
            "type": "value_smaller_than_min",
            "message": "Value {} smaller than min of {}".format(value, extra_info["min"]),
            "details": name,
            "extra_info": {"input_name": name, "input_config": info, "received_value": value},
        }
    if "max" in extra_info and value > extra_info["max"]:
        return {
            "type": "value_bigger_than_max",
            "message": "Value {} bigger than max of {}".format(value, extra_info["max"]),
            "details": name,
            "extra_info": {"input_name": name, "input_config": info, "received_value": value},
        }
    if isinstance(input_type, list) and value not in input_type:
        # ComfyUI leaves huge choice lists (model files) out of the error.
        too_long = len(input_type) > 20
        return {
            "type": "value_not_in_list",
            "message": "Value not in list",
            "details": f"{name}: '{value}' not in {f'(list of length {len(input_type)})' if too_long else input_type}",
            "extra_info": {"input_name": name, "input_config": None if too_long else info, "received_value": value},
        }
    return None


def _input_info(class_inputs: dict, name: str) -> tuple[Any, str | None, dict]:
    for category in ("required", "optional", "hidden"):
        if name in class_inputs.get(category, {}):
            spec = class_inputs[category][name]
            if isinstance(spec, str):
                return spec, category, {}
            return spec[0], category, (spec[1] if len(spec) > 1 else {})
    return None, None, {}


def _validation_arguments(inputs: dict, class_inputs: dict, wanted: list[str]) -> dict[str, Any]:
    """VALIDATE_INPUTS sees constant inputs by value and linked inputs as None (their values do
    not exist before execution), as in ComfyUI."""
    arguments = {}
    for name, value in inputs.items():
        _, category, _ = _input_info(class_inputs, name)
        if category is None or name not in wanted:
            continue
        arguments[name] = None if isinstance(value, list) else value
    return arguments


def _parameter_names(function: Any) -> list[str]:
    """Inputs a class method's signature names, leaving out the NodeEnvironment first parameter."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

