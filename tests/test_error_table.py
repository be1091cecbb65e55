"""The error table is the one source of the retry rules, the API's statuses and the README's table."""

from __future__ import annotations

from pathlib import Path

from activities.comfy import to_application_error
from app.comfy.errors import ComfyError
from app.errors import CLIENT_RETRYABLE_CODES, ERROR_CLASSES, NON_RETRYABLE_TYPES, ErrorCode, markdown_table
from workflows_temporal.generation import _CLEANUP_RETRY, _IMAGE_RETRY, _STORAGE_RETRY, _TRANSIENT_RETRY

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The code that raises or answers with errors; the table itself and the API document's description of the
# codes' shapes are where a code is named without being used.
RAISING_PACKAGES = ("app", "api", "activities", "worker", "workflows_temporal")
NAMING_ONLY = {"app/errors.py", "api/openapi.py"}


def test_every_code_has_its_class_and_the_readme_shows_the_table() -> None:
    assert set(ERROR_CLASSES) == set(ErrorCode)
    assert markdown_table() in README.read_text()


def test_every_code_is_used_by_the_code() -> None:
    """No dead codes: each one in the table is raised or answered with somewhere, by name or by value."""
    sources = " ".join(
        path.read_text() for package in RAISING_PACKAGES for path in (ROOT / package).rglob("*.py")
        if str(path.relative_to(ROOT)) not in NAMING_ONLY
    )
    unused = [code.name for code in ErrorCode if f"ErrorCode.{code.name}" not in sources
              and f'"{code.value}"' not in sources]
    assert unused == []


def test_retry_policies_and_classifications_come_from_the_table() -> None:
    for policy in (_TRANSIENT_RETRY, _IMAGE_RETRY, _STORAGE_RETRY, _CLEANUP_RETRY):
        assert policy.non_retryable_error_types == NON_RETRYABLE_TYPES
    for code, error_class in ERROR_CLASSES.items():
        # The failure an activity raises for a ComfyUI error is final exactly when the table says so.
        assert to_application_error(ComfyError(code, "x")).non_retryable is not error_class.temporal_retries, code
        # A code Temporal retries on its own is never one a client has to opt in to.
        assert not (error_class.temporal_retries and error_class.client_retryable), code
    assert set(CLIENT_RETRYABLE_CODES) == {
        ErrorCode.COMFYUI_NODE_ERROR, ErrorCode.COMFYUI_OOM, ErrorCode.COMFYUI_INTERRUPTED, ErrorCode.COMFYUI_TIMEOUT,
    }
    assert ErrorCode.COMFYUI_PROTOCOL_ERROR.value in NON_RETRYABLE_TYPES
    assert ErrorCode.CONFIGURATION_ERROR.value in NON_RETRYABLE_TYPES
