"""A webhook's body: built once per event, as compact JSON that re-serialises to the same bytes.

Receivers such as n8n's Code node check a signature by parsing the body and serialising it again
(`JSON.stringify(JSON.parse(body))`), so the body is written the way JavaScript writes JSON: no spaces, UTF-8
not escaped, and whole numbers without `.0` (JavaScript has one number type; Python writes 1.0 for a float).
"""

from __future__ import annotations

import json
from typing import Any

# The events a job's webhook may carry; a job without `webhookEvents` gets the terminal ones.
TERMINAL_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
PROGRESS_EVENT = "job.progress"
EVENTS = (*TERMINAL_EVENTS, PROGRESS_EVENT)


def _as_javascript_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _as_javascript_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_javascript_numbers(item) for item in value]
    return value


def compact_json(value: Any) -> str:
    """`value` as JSON that JSON.stringify(JSON.parse(...)) and Python's re-serialisation give back unchanged."""
    return json.dumps(_as_javascript_numbers(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
