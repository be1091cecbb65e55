"""A job's output files: the list, each file streamed with its content type, or as base64 JSON."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import BinaryIO, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import Field

from api.deps import JobDep, StorageDep
from api.errors import ApiError
from api.job_views import OutputFile, output_file
from api.openapi import answers_with
from api.rate_limits import limit_principal
from app.errors import ErrorCode
from app.models import CamelModel, OutputRef
from app.storage import OutputStorage

router = APIRouter(prefix="/outputs", tags=["outputs"], dependencies=[Depends(limit_principal)])

# A multiple of 3 so that each chunk encodes to base64 without padding in the middle of the stream.
_BASE64_CHUNK = 3 * 64 * 1024


class OutputList(CamelModel):
    job_id: str
    files: list[OutputFile]


class Base64Output(CamelModel):
    """`?format=base64`: the file inline. Its fields are written by `_base64_json`, which streams them."""

    filename: str
    content_type: str
    size: int
    data: str = Field(description="the file's bytes, base64")


@router.get("/{job_id}", response_model=OutputList)
async def list_outputs(job: JobDep, storage: StorageDep) -> OutputList:
    job_id = job.state.job_id
    return OutputList(job_id=job_id, files=[output_file(job_id, output, storage) for output in job.state.outputs])


def _base64_json(output: OutputRef, source: BinaryIO) -> Iterator[bytes]:
    """{"filename", "contentType", "size", "data"} streamed, so a large video never sits in memory."""
    head = json.dumps({"filename": output.filename, "contentType": output.content_type, "size": output.size})
    yield (head[:-1] + ', "data": "').encode()
    with source:
        while chunk := source.read(_BASE64_CHUNK):
            yield base64.b64encode(chunk)
    yield b'"}'


def _file_missing(job_id: str, output: OutputRef, storage: OutputStorage) -> ApiError:
    return ApiError(
        ErrorCode.OUTPUT_FILE_MISSING, f"the file of output {output.filename} of job {job_id} is gone from storage",
        {"jobId": job_id, "filename": output.filename, "storagePath": storage.location(output.storage_key)},
    )


def _open(job_id: str, output: OutputRef, storage: OutputStorage) -> BinaryIO:
    """Opened before the answer starts, so a file gone from storage is a 404, not a broken stream."""
    try:
        return storage.open(output.storage_key)
    except FileNotFoundError:
        raise _file_missing(job_id, output, storage) from None


@router.get("/{job_id}/{filename}", response_model=None, responses={200: {
    "description": "the file with its own content type (the output's `contentType`); with `?format=base64`, JSON",
    "model": Base64Output,
    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
}})
@answers_with(ErrorCode.OUTPUT_NOT_FOUND, ErrorCode.OUTPUT_FILE_MISSING)
async def get_output(
    job: JobDep,
    filename: str,
    storage: StorageDep,
    format: Literal["binary", "base64"] = Query("binary", description="`base64` returns JSON with the data inline"),
) -> FileResponse | StreamingResponse:
    job_id = job.state.job_id
    output = next((item for item in job.state.outputs if item.filename == filename), None)
    if output is None:
        raise ApiError(ErrorCode.OUTPUT_NOT_FOUND, f"job {job_id} has no output {filename}",
                       {"jobId": job_id, "filename": filename})
    if format == "base64":
        return StreamingResponse(_base64_json(output, _open(job_id, output, storage)), media_type="application/json")
    local = storage.local_path(output.storage_key)
    if local is not None:
        if not local.is_file():
            raise _file_missing(job_id, output, storage)
        return FileResponse(local, media_type=output.content_type, filename=output.filename)
    return StreamingResponse(_open(job_id, output, storage), media_type=output.content_type,
                             headers={"Content-Disposition": f'attachment; filename="{output.filename}"'})
