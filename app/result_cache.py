"""The result cache: a job whose request determines its result (an explicit seed, no image URLs) and that
matches an earlier succeeded job takes that job's stored outputs instead of running again.

The key is the SHA-256 of what decides the result: the template and its version (or the raw graph), the
job's inputs as it runs with them (validated, defaults filled in, `params` merged in, inline images replaced
by their content-addressed references), and the output format. A hit is the latest job of the same owner with the
key that ran and succeeded within the TTL, whose files are all still in storage. The owner scopes it because a hit
shows its source (the job id in its log and in its outputs' storage keys), and another's job is never shown.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from app.canonical_json import canonical_sha256
from app.jobstore import cached_results
from app.models import CachedResult, OutputRef
from app.storage import OutputStorage, StorageError

# Part of every key: a change to what goes into the key changes it, so old results are not taken for new ones.
_KEY_VERSION = 1


def cache_key(
    *,
    template_id: str | None,
    template_version: int | None,
    workflow_json: dict[str, Any] | None,
    inputs: dict[str, Any],
    output_format: str = "png",
    quality: int | None = None,
) -> str:
    return canonical_sha256({
        "v": _KEY_VERSION, "templateId": template_id, "templateVersion": template_version,
        "workflowJson": workflow_json, "inputs": inputs, "outputFormat": output_format, "quality": quality,
    })


def find_cached_result(
    session: Session, storage: OutputStorage, key: str, owner: str, completed_after: datetime
) -> CachedResult | None:
    """The result a new job of `owner` with this key may take, or None. Blocking: storage is asked whether each file exists."""
    for source in cached_results(session, key, owner, completed_after):
        if all(_stored(storage, output) for output in source.state.outputs):
            return CachedResult(source_job_id=source.state.job_id, outputs=source.state.outputs)
    return None


def _stored(storage: OutputStorage, output: OutputRef) -> bool:
    # Asked without reading the file: on S3 a HEAD per output, not a GET, on the request's path.
    try:
        return storage.exists(output.storage_key)
    except StorageError:  # a store that does not answer now: no hit, and the job runs
        return False
