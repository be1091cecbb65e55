"""Live progress as Server-Sent Events: `GET /jobs/{id}/events` (api.job_streams says what is read and sent)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import JobDep, SettingsDep, StorageDep, TemporalUiDep
from api.errors import ApiError
from api.http_server import step_aside
from api.job_streams import JobEvents, JobFeeds
from api.job_views import public_job_off_loop
from api.rate_limits import limit_principal
from app.models import JobStatus
from app.storage import OutputStorage
from app.temporal_ui import TemporalUi

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(limit_principal)])

_STREAM_DESCRIPTION = (
    "`text/event-stream`. Events: `queued` (with `queuePosition`), `running` (`progress`, `currentNode`), `output` "
    "(each stored file, `outputs` so far), then one of `succeeded`, `failed`, `cancelled`, after which the stream "
    "ends. Each event's `data` is JSON of the fields of `GET /jobs/{id}` that changed since the stream's previous "
    "event, always with `status` and `progress`; the first event of a stream has them all. Comments (`: ping`) "
    "keep the connection open every SSE_KEEPALIVE_S seconds.")


# An event as OpenAPI 3.2 describes one of a text/event-stream: its name, id, and `data`, JSON of some of a
# Job's fields, always these two.
_EVENT = {
    "type": "object", "required": ["event", "id", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["queued", "running", "output"]
                  + [status.value for status in JobStatus if status.is_terminal]},
        "id": {"type": "string", "description": "say it back as Last-Event-ID to resume from there"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["status", "progress"], "description": "the fields of `Job` that changed",
            "properties": {"status": {"type": "string", "enum": [status.value for status in JobStatus]},
                           "progress": {"type": "integer", "minimum": 0, "maximum": 100}}}},
    },
}


async def get_job_feeds(request: Request) -> JobFeeds:
    return request.app.state.job_feeds


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"description": _STREAM_DESCRIPTION, "content": {"text/event-stream": {"schema": _EVENT}}},
        204: {"description": "the Last-Event-ID was the job's final event: there is nothing more to say, and an "
                             "EventSource that gets this stops reconnecting"},
    },
)
async def job_events(
    job: JobDep,
    request: Request,
    storage: StorageDep,
    ui: TemporalUiDep,
    settings: SettingsDep,
    feeds: Annotated[JobFeeds, Depends(get_job_feeds)],
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", description="the id of the last event had (an EventSource sends it when it "
                                           "reconnects): only what is new since is sent")] = None,
) -> Response:
    """The job's progress, live, until it ends. Another's job is a 404, as for `GET /jobs/{id}`."""
    events = JobEvents(last_event_id)
    if events.ended:
        return Response(status_code=204)
    # The stream lasts as long as the job: it holds no place among the requests being answered meanwhile.
    step_aside(request.scope)
    return EventSourceResponse(_stream(feeds, job.state.job_id, events, storage, ui), ping=settings.sse_keepalive_s)


async def _stream(feeds: JobFeeds, job_id: str, events: JobEvents, storage: OutputStorage, ui: TemporalUi
                  ) -> AsyncIterator[ServerSentEvent]:
    async with feeds.subscribe(job_id) as subscription:
        try:
            async for snapshot in subscription:
                view = (await public_job_off_loop(snapshot, storage, ui)).model_dump(mode="json", by_alias=True)
                for event in events.after(view):
                    yield ServerSentEvent(json.dumps(event.data), event=event.name, id=event.id)
                if events.ended:
                    return
        except ApiError as error:
            # Temporal cannot answer for the job just now: the stream ends, and the client's reconnect (with its
            # Last-Event-ID) goes on from where it was.
            log.warning("job %s: its event stream ends early: %s", job_id, error.message)
