"""Live progress as Server-Sent Events: `GET /jobs/{id}/events` and `GET /batches/{id}/events`
(api.job_streams and api.batch_streams say what is read and sent, api.event_streams how)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from api.batch_streams import BatchEvents, BatchFeeds
from api.deps import JobDep, SettingsDep, StorageDep, TemporalUiDep
from api.event_streams import ENDED_RESPONSE, LastEventId, StreamPlaces, event_schema, stream_response
from api.http_server import step_aside
from api.job_streams import JobEvents, JobFeeds
from api.job_views import public_job_off_loop
from api.openapi import answers_with
from api.rate_limits import limit_principal
from api.routes.batches import BatchDep
from app.batches import BatchStatus
from app.errors import ErrorCode
from app.jobstore import JobSnapshot
from app.models import JobStatus

router = APIRouter(dependencies=[Depends(limit_principal)])

_KEEPALIVE = "Comments (`: ping`) keep the connection open every SSE_KEEPALIVE_S seconds."

_JOB_STREAM = (
    "`text/event-stream`. Events: `queued` (with `queuePosition`), `running` (`progress`, `currentNode`), `output` "
    "(each stored file, `outputs` so far), then one of `succeeded`, `failed`, `cancelled`, after which the stream "
    "ends. Each event's `data` is JSON of the fields of `GET /jobs/{id}` that changed since the stream's previous "
    "event, always with `status` and `progress`; the first event of a stream has them all. " + _KEEPALIVE)
_JOB_EVENT = event_schema(
    ["queued", "running", "output"] + [status.value for status in JobStatus if status.is_terminal],
    [status.value for status in JobStatus], {"progress": {"type": "integer", "minimum": 0, "maximum": 100}}, "Job")

_BATCH_STREAM = (
    "`text/event-stream`. Events: `queued`, `running` (as its items move), then `completed` or `cancelled`, after "
    "which the stream ends. Each event's `data` is JSON of the fields of `GET /batches/{id}` that changed since the "
    "stream's previous event, always with `status`, `counts` and `progress`; the first event of a stream has them "
    "all. " + _KEEPALIVE)
_BATCH_EVENT = event_schema(
    [status.value for status in BatchStatus], [status.value for status in BatchStatus],
    {"counts": {"type": "object", "description": "its items by status"},
     "progress": {"type": "integer", "minimum": 0, "maximum": 100}}, "Batch")


@answers_with(ErrorCode.TOO_MANY_STREAMS)
async def get_stream_places(request: Request) -> StreamPlaces:
    return request.app.state.stream_places


async def get_job_feeds(request: Request) -> JobFeeds:
    return request.app.state.job_feeds


async def get_batch_feeds(request: Request) -> BatchFeeds:
    return request.app.state.batch_feeds


StreamPlacesDep = Annotated[StreamPlaces, Depends(get_stream_places)]


def _stream_answer(description: str, schema: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {"text/event-stream": {"schema": schema}}},
            **ENDED_RESPONSE}


@router.get("/jobs/{job_id}/events", tags=["jobs"], response_class=EventSourceResponse,
            responses=_stream_answer(_JOB_STREAM, _JOB_EVENT))
async def job_events(
    job: JobDep, request: Request, storage: StorageDep, ui: TemporalUiDep, settings: SettingsDep,
    feeds: Annotated[JobFeeds, Depends(get_job_feeds)], places: StreamPlacesDep, last_event_id: LastEventId = None,
) -> Response:
    """The job's progress, live, until it ends. Another's job is a 404, as for `GET /jobs/{id}`."""
    events = JobEvents(last_event_id)
    if events.ended:
        return Response(status_code=204)

    async def view(snapshot: JobSnapshot) -> dict[str, Any]:
        return (await public_job_off_loop(snapshot, storage, ui)).model_dump(mode="json", by_alias=True)

    answer = stream_response(places, feeds.subscribe(job.state.job_id), view, events, f"job {job.state.job_id}",
                             settings.sse_keepalive_s)
    # The stream lasts as long as the job: it holds no place among the requests being answered meanwhile.
    step_aside(request.scope)
    return answer


@router.get("/batches/{batch_id}/events", tags=["batches"], response_class=EventSourceResponse,
            responses=_stream_answer(_BATCH_STREAM, _BATCH_EVENT))
async def batch_events(
    batch: BatchDep, request: Request, settings: SettingsDep, feeds: Annotated[BatchFeeds, Depends(get_batch_feeds)],
    places: StreamPlacesDep, last_event_id: LastEventId = None,
) -> Response:
    """The batch's counts and progress, live, until it ends. Another's batch is a 404, as for `GET /batches/{id}`."""
    events = BatchEvents(last_event_id)
    if events.ended:
        return Response(status_code=204)

    async def view(batch_json: dict[str, Any]) -> dict[str, Any]:
        return batch_json

    answer = stream_response(places, feeds.subscribe(batch.batch_id), view, events, f"batch {batch.batch_id}",
                             settings.sse_keepalive_s)
    step_aside(request.scope)
    return answer
