"""Idempotent submission: a job submitted with a key (`Idempotency-Key`, or `metadata.requestId`) gets a job
id derived from the caller and the key, so that every repeat of it, concurrent or late, names the same
workflow, which Temporal starts once. The request's fingerprint travels with the job, so a repeat with a
different body can be told from a true repeat.
"""

from __future__ import annotations

import uuid
from typing import Any

from app.canonical_json import canonical_sha256

MAX_KEY_LENGTH = 255
# Fixed forever: changing it would give every key a new job id, and a repeat of an old request a second run.
_JOB_ID_NAMESPACE = uuid.UUID("6f1d3c2e-7a4b-5e2f-9c1d-0b8a7e6f5d4c")


def idempotent_job_id(caller: str, key: str) -> str:
    """A UUID, like every job id (prompt ids are derived from it), the same for the same caller and key only."""
    return str(uuid.uuid5(_JOB_ID_NAMESPACE, f"{len(caller)}:{caller}:{key}"))


def request_fingerprint(request: dict[str, Any]) -> str:
    """SHA-256 of the request as validated, before the gateway fills anything in (a seed it draws would make
    a request differ from itself)."""
    return canonical_sha256(request)
