"""One canonical JSON form for hashing: sorted keys, no spaces, UTF-8. Two values that are equal as JSON hash
alike, whatever order their keys came in."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
