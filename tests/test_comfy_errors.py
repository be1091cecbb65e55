"""Error classification against the real ComfyUI's recorded answers."""

import json
from pathlib import Path

from app.comfy.errors import classify_execution_error, classify_interrupted, classify_prompt_rejection
from app.errors import ErrorCode

RECORDINGS = json.loads(
    (Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "recordings" / "results.json").read_text()
)


def _last_message(scenario: str) -> list:
    [entry] = RECORDINGS[scenario]["history"].values()
    return entry["status"]["messages"][-1]


def test_runtime_error_with_cuda_oom_text_is_oom() -> None:
    name, data = _last_message("fail.json")
    assert name == "execution_error"
    error = classify_execution_error(data)
    assert error.code is ErrorCode.COMFYUI_OOM and not error.retryable
    assert error.details["nodeId"] == "2" and error.details["nodeType"] == "TestFail"


def test_torch_out_of_memory_error_is_oom() -> None:
    name, data = _last_message("fail_oom.json")
    assert classify_execution_error(data).code is ErrorCode.COMFYUI_OOM


def test_other_node_failures_are_node_errors_with_node_and_message() -> None:
    name, data = _last_message("flaky.json #1")
    error = classify_execution_error(data)
    assert error.code is ErrorCode.COMFYUI_NODE_ERROR
    assert error.details["nodeType"] == "TestFlaky"
    assert "transient failure 1/2" in error.message


def test_interrupt_is_its_own_code() -> None:
    [entry] = RECORDINGS["slow.json interrupted (targeted)"]["history"].values()
    name, data = entry["status"]["messages"][-1]
    assert name == "execution_interrupted"
    assert classify_interrupted(data).code is ErrorCode.COMFYUI_INTERRUPTED


def test_prompt_rejections_name_node_input_and_reason() -> None:
    status, body = RECORDINGS["invalid"]["invalid_bad_value.json"]
    error = classify_prompt_rejection(status, body)
    assert error.code is ErrorCode.VALIDATION_ERROR
    [node_error] = error.details["nodeErrors"]["1"]["errors"]
    assert node_error["type"] == "value_bigger_than_max" and node_error["input"] == "width"
    assert "Value 999999 bigger than max of 16384" in error.message


def test_rejection_without_node_errors_keeps_comfyuis_message() -> None:
    status, body = RECORDINGS["invalid"]["invalid_unknown_class.json"]
    error = classify_prompt_rejection(status, body)
    assert "NoSuchNode does not exist" in error.message
    assert error.details["comfyError"]["type"] == "invalid_prompt"


def test_long_messages_are_shortened_to_stay_within_temporals_payload_limit() -> None:
    # A node that fails on a 900 KB input quotes it; the whole of it would not fit in a Temporal failure.
    error = classify_execution_error({"node_id": "9", "node_type": "SaveImage", "exception_type": "OSError",
                                      "exception_message": "[Errno 36] File name too long: " + "x" * 900_000})
    assert len(error.message) < 2100 and error.message.endswith("more characters)")
    assert len(error.details["exceptionMessage"]) < 1100
