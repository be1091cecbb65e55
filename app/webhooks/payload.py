"""A webhook's body: built once per event, as compact JSON that re-serialises to the same bytes.

Receivers such as n8n's Code node check a signature by parsing the body and serialising it again
(`JSON.stringify(JSON.parse(body))`), so the body is written the way JavaScript writes JSON: no spaces, UTF-8
not escaped, and every number as JavaScript's Number.prototype.toString writes it (one number type: 1.0 is
`1`, 1e21 is `1e+21`, 2.5e-5 is `0.000025`). Python's json writes the same bytes again except for numbers
below 1e-4 in size (`2.5e-05`, `1e-07`): a Python receiver checks the bytes it got, not a re-serialisation.
Integers beyond 2^53 - 1 do not survive JavaScript's parse; the API refuses them in the metadata of a job
that has a callbackUrl.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from app.models import JobState
from app.output_routes import output_route
from app.storage import OutputStorage


def webhook_body(
    event: str, state: JobState, storage: OutputStorage, base_url: str, progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A webhook's body: the job as its event saw it, shaped as `GET /jobs/{id}` shows it. Output URLs are the
    API's own route made absolute with PUBLIC_BASE_URL: they keep working for as long as the receiver retries
    and after (a presigned URL of the store's would expire). No inputs."""
    outputs = [
        {
            "filename": output.filename, "storagePath": storage.location(output.storage_key),
            "url": base_url + output_route(state.job_id, output.filename), "size": output.size,
            "sha256": output.sha256, "contentType": output.content_type, "nodeId": output.node_id,
            "animated": output.animated,
        }
        for output in state.outputs
    ]
    body: dict[str, Any] = {
        "event": event,
        "jobId": state.job_id,
        "status": state.status.value,
        "workflowId": state.template_id,
        "result": {"outputs": outputs},
        "error": state.error.model_dump(mode="json") if state.error else None,
        "metadata": state.metadata,
        "timing": {
            "createdAt": _instant(state.created_at), "startedAt": _instant(state.started_at),
            "completedAt": _instant(state.completed_at), "executionTimeMs": state.execution_time_ms,
        },
    }
    if progress is not None:
        body["progress"] = progress
    return body


def instant(value: datetime) -> str:
    """An instant as every webhook timestamp is written: ISO 8601, UTC as `Z`."""
    return value.isoformat().replace("+00:00", "Z")


def _instant(value: datetime | None) -> str | None:
    return instant(value) if value is not None else None


def javascript_number(value: float) -> str:
    """`value` as JavaScript's Number.prototype.toString writes it (ECMAScript Number::toString): the shortest
    digits that round-trip (Python's repr finds the same), placed by their decimal exponent."""
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a JSON number")
    if value == 0:
        return "0"  # -0 too
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # n: where the decimal point falls after the first significant digit's position (value = 0.d1d2... x 10^n).
    n = len(whole.lstrip("0")) if whole.strip("0") else -(len(fraction) - len(fraction.lstrip("0")))
    n += int(exponent or 0)
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        power = n - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + ("e+" if power >= 0 else "e-") + str(abs(power))
    return sign + text


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            out.append(("," if index else "") + json.dumps(str(key), ensure_ascii=False) + ":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out)
        out.append("]")
    elif isinstance(value, float):
        out.append(javascript_number(value))
    else:  # str, int, bool, None: written alike by both languages
        out.append(json.dumps(value, ensure_ascii=False))


def compact_json(value: Any) -> str:
    """`value` as JSON that JSON.stringify(JSON.parse(...)) gives back unchanged."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)
