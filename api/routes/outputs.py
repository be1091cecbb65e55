"""A job's output files: the list, each file streamed with its content type, or as base64 JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import DatabaseDep, LiveViewsDep, StorageDep, TemporalClientDep
from api.errors import ApiError
from api.job_lookup import find_job
from app.models import CamelModel, ErrorCode, OutputFile
from app.storage import OutputStorage

router = APIRouter(prefix="/outputs", tags=["outputs"])

# A multiple of 3 so that each chunk encodes to base64 without padding in the middle of the stream.
_BASE64_CHUNK = 3 * 64 * 1024


class OutputList(CamelModel):
    job_id: str
    files: list[OutputFile]


@router.get("/{job_id}", response_model=OutputList)
async def list_outputs(job_id: str, db: DatabaseDep, temporal: TemporalClientDep, live_views: LiveViewsDep) -> OutputList:
    view = await find_job(job_id, db, temporal, live_views)
    return OutputList(job_id=job_id, files=view.outputs)


def _base64_json(output: OutputFile, storage: OutputStorage) -> Iterator[bytes]:
    """{"filename", "contentType", "size", "data"} streamed, so a large video never sits in memory."""
    head = json.dumps({"filename": output.filename, "contentType": output.content_type, "size": output.size})
    yield (head[:-1] + ', "data": "').encode()
    with storage.open(output.storage_path) as source:
        while chunk := source.read(_BASE64_CHUNK):
            yield base64.b64encode(chunk)
    yield b'"}'


@router.get("/{job_id}/{filename}", response_model=None)
async def get_output(
    job_id: str,
    filename: str,
    db: DatabaseDep,
    temporal: TemporalClientDep,
    storage: StorageDep,
    format: Literal["binary", "base64"] = Query("binary", description="`base64` returns JSON with the data inline"),
) -> FileResponse | StreamingResponse:
    view = await find_job(job_id, db, temporal)
    output = next((item for item in view.outputs if item.filename == filename), None)
    if output is None:
        raise ApiError(404, ErrorCode.OUTPUT_NOT_FOUND, f"job {job_id} has no output {filename}",
                       {"jobId": job_id, "filename": filename})
    if format == "base64":
        return StreamingResponse(_base64_json(output, storage), media_type="application/json")
    local = storage.local_path(output.storage_path)
    if local is not None:
        return FileResponse(local, media_type=output.content_type, filename=output.filename)
    return StreamingResponse(storage.open(output.storage_path), media_type=output.content_type,
                             headers={"Content-Disposition": f'attachment; filename="{output.filename}"'})
