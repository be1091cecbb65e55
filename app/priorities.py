"""A job's priority as clients give it (`high`, `normal`, `low`, or 1–5 with 1 highest) and as Temporal's
task-queue priority key holds it (1 highest … 5 lowest). Shared by `POST /jobs` and `POST /batches`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema

from app.models import DEFAULT_PRIORITY

PRIORITY_NAMES = {"high": 1, "normal": DEFAULT_PRIORITY, "low": 5}
HIGHEST_PRIORITY, LOWEST_PRIORITY = 1, 5


def priority_key(value: Any) -> Any:
    """A name → its key; an integer passes to the range check. Anything else (a float, a bool, "2") is refused:
    pydantic would read `true` as 1 and "2" as 2."""
    if isinstance(value, str):
        if value.lower() not in PRIORITY_NAMES:
            raise ValueError(f"must be one of {', '.join(PRIORITY_NAMES)}, or an integer from 1 (highest) to 5")
        return PRIORITY_NAMES[value.lower()]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be high, normal or low, or an integer from 1 (highest) to 5")
    return value


# The request field: `priority: Priority = DEFAULT_PRIORITY`.
Priority = Annotated[
    int,
    BeforeValidator(priority_key),
    Field(ge=HIGHEST_PRIORITY, le=LOWEST_PRIORITY),
    # The document says what the request takes (a name or a key), not the integer it becomes.
    WithJsonSchema({
        "anyOf": [{"type": "string", "enum": list(PRIORITY_NAMES)},
                  {"type": "integer", "minimum": HIGHEST_PRIORITY, "maximum": LOWEST_PRIORITY}],
        "description": "high, normal or low, or 1 (highest) to 5 (lowest): when jobs wait for a slot, higher "
                       "priority starts first; default normal (3)",
        "examples": ["high", 2],
    }),
]
