"""Output files: the caller's recent ones across jobs, a job's list, each file streamed with its content type
(from a bucket: a redirect to a presigned URL of it), or as base64 JSON. Calls of a bucket's SDK (boto3) run on
threads, off the event loop."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from api.deps import JobDep, PrincipalDep, SessionDep, StorageDep
from api.errors import ApiError
from api.job_views import OutputFile, output_file
from api.openapi import answers_with
from api.rate_limits import limit_principal
from api.routes.jobs import Instant
from app.errors import ErrorCode
from app.models import CamelModel, OutputRef
from app.output_routes import output_route
from app.recent_outputs import OutputFilter, list_recent_outputs
from app.storage import OutputStorage, StorageError

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


class RecentOutput(OutputFile):
    job_id: str = Field(description="the job that made it")
    # The contract calls the template id `workflowId`, as a job does.
    workflow_id: str | None = Field(description="the template the job ran; null for a raw workflowJson")
    completed_at: datetime = Field(description="when its job ended, and so when the file was made")


class RecentOutputList(CamelModel):
    outputs: list[RecentOutput]
    count: int = Field(description="how many outputs the filters select in all, across pages")


@router.get("", response_model=RecentOutputList)
def list_recent(
    session: SessionDep,
    storage: StorageDep,
    principal: PrincipalDep,
    workflow_id: Annotated[str | None, Query(alias="workflowId", description="made by this template")] = None,
    batch_id: Annotated[str | None, Query(alias="batchId", max_length=64, description="made by a batch's items")] = None,
    after: Instant | None = Query(None, description="made (its job ended) after this instant (ISO 8601)"),
    before: Instant | None = Query(None, description="made (its job ended) before this instant (ISO 8601)"),
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000_000),
) -> RecentOutputList:
    """The outputs of every job for an admin, of a user's own jobs for a user: newest first (by when their job
    ended, then by job and their place in it), each as the job's outputs show it, with its job."""
    owner = None if principal.is_admin else principal.id
    found, count = list_recent_outputs(session, OutputFilter(
        owner=owner, template_id=workflow_id, batch_id=batch_id, completed_after=after, completed_before=before,
        limit=limit, offset=offset))
    return RecentOutputList(count=count, outputs=[
        RecentOutput(**output_file(item.job_id, item.output, storage).model_dump(), job_id=item.job_id,
                     workflow_id=item.template_id, completed_at=item.completed_at)
        for item in found])


@router.get("/{job_id}", response_model=OutputList)
async def list_outputs(job: JobDep, storage: StorageDep) -> OutputList:
    job_id = job.state.job_id

    def listed() -> OutputList:
        return OutputList(job_id=job_id, files=[output_file(job_id, output, storage) for output in job.state.outputs])

    return await run_in_threadpool(listed) if storage.signs_urls else listed()


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
    except StorageError as error:
        raise ApiError(ErrorCode.STORAGE_ERROR, f"the file of output {output.filename} could not be read: {error}",
                       {"jobId": job_id, "filename": output.filename}) from error


@router.get("/{job_id}/{filename}", response_model=None, responses={
    200: {
        "description": "the file with its own content type (the output's `contentType`); with `?format=base64`, JSON",
        "model": Base64Output,
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    },
    307: {
        "description": "with STORAGE_PROVIDER=s3 (not `?format=base64`): a redirect to a presigned URL of the file "
                       "in its bucket, made now and valid for S3_PRESIGN_EXPIRY_S",
        "headers": {"Location": {"description": "the presigned URL", "schema": {"type": "string", "format": "uri"}}},
    },
})
@answers_with(ErrorCode.OUTPUT_NOT_FOUND, ErrorCode.OUTPUT_FILE_MISSING, ErrorCode.STORAGE_ERROR)
async def get_output(
    job: JobDep,
    filename: str,
    storage: StorageDep,
    format: Literal["binary", "base64"] = Query("binary", description="`base64` returns JSON with the data inline"),
) -> FileResponse | StreamingResponse | RedirectResponse:
    job_id = job.state.job_id
    output = next((item for item in job.state.outputs if item.filename == filename), None)
    if output is None:
        raise ApiError(ErrorCode.OUTPUT_NOT_FOUND, f"job {job_id} has no output {filename}",
                       {"jobId": job_id, "filename": filename})
    local = storage.local_path(output.storage_key)
    if format == "base64":
        opened = _open(job_id, output, storage) if local is not None else await run_in_threadpool(
            _open, job_id, output, storage)
        # Starlette iterates a plain iterator on a thread: a bucket's body is read off the event loop.
        return StreamingResponse(_base64_json(output, opened), media_type="application/json")
    if local is not None:
        if not local.is_file():
            raise _file_missing(job_id, output, storage)
        return FileResponse(local, media_type=output.content_type, filename=output.filename)
    # A bucket serves the file itself: the client follows the redirect to a URL signed now. Not checked first
    # (that would be one more request to the store per download): a file gone from the bucket is its 404.
    url = await run_in_threadpool(storage.download_url, output.storage_key, output_route(job_id, output.filename))
    return RedirectResponse(url, status_code=307)
