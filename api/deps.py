"""FastAPI dependencies: the caller (`PrincipalDep`, `AdminDep`), settings, database (a session for sync routes,
`Database` for async ones), Temporal connection, output storage, and the job a route's `job_id` names (one place
loads it for every route, so the owner check is in one place too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from api.auth import authenticate, check_metrics_token
from api.database import Database
from api.errors import ApiError, validation_error
from api.job_reader import JobReader, job_not_found
from api.job_waits import JobWaits
from api.openapi import answers_with
from api.temporal_connection import TemporalConnection
from app.auth import Principal, Role
from app.errors import ErrorCode
from app.jobstore import JobSnapshot
from app.queue_estimates import MeanRunTimes
from app.settings import Settings
from app.storage import OutputStorage
from app.temporal_ui import TemporalUi


# Dependencies that only look something up are `async def`: FastAPI runs a plain `def` dependency on a worker
# thread, a thread hop per dependency per request for nothing.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


@answers_with(ErrorCode.DATABASE_UNAVAILABLE)
async def get_database(request: Request) -> Database:
    return Database(request.app.state.engine)


@answers_with(ErrorCode.DATABASE_UNAVAILABLE)
def get_session(request: Request) -> Iterator[Session]:
    """For sync routes, which FastAPI already runs on worker threads."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


@answers_with(ErrorCode.TEMPORAL_UNAVAILABLE)  # what a route that needs Temporal answers while it is down
async def get_temporal(request: Request) -> TemporalConnection:
    return request.app.state.temporal


async def get_storage(request: Request) -> OutputStorage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_temporal_ui(settings: SettingsDep) -> TemporalUi:
    return TemporalUi.of(settings)


TemporalUiDep = Annotated[TemporalUi, Depends(get_temporal_ui)]

# Both optional here (auto_error=False): the refusal is authenticate's one 401, whatever is missing. They also
# put the two schemes in the OpenAPI document, so Swagger UI's "Authorize" takes a key or a token.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="a key from API_KEYS")
_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT", description="an HS256 JWT with sub, role and exp")


@answers_with(ErrorCode.AUTH_FAILED)
async def get_principal(
    settings: SettingsDep,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Who makes the request. FastAPI resolves it once per request, however many dependencies ask for it."""
    return authenticate(settings, api_key, bearer.credentials if bearer is not None else None)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


@answers_with(ErrorCode.AUTH_FAILED)
async def require_metrics_token(
    settings: SettingsDep, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    check_metrics_token(settings, bearer.credentials if bearer is not None else None)


@answers_with(ErrorCode.FORBIDDEN)
async def require_admin(principal: PrincipalDep) -> Principal:
    if principal.role is not Role.admin:
        raise ApiError(ErrorCode.FORBIDDEN, "this needs the admin role", {"role": principal.role.value})
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
SessionDep = Annotated[Session, Depends(get_session)]
DatabaseDep = Annotated[Database, Depends(get_database)]
TemporalDep = Annotated[TemporalConnection, Depends(get_temporal)]
StorageDep = Annotated[OutputStorage, Depends(get_storage)]


async def get_job_reader(request: Request, db: DatabaseDep, temporal: TemporalDep) -> JobReader:
    return JobReader(db, temporal, request.app.state.live_views, request.app.state.current_rows)


JobReaderDep = Annotated[JobReader, Depends(get_job_reader)]


async def get_run_times(request: Request) -> MeanRunTimes:
    # async, as every dependency here that does no I/O: FastAPI runs a plain `def` dependency on a worker thread.
    return request.app.state.run_times


RunTimesDep = Annotated[MeanRunTimes, Depends(get_run_times)]


def may_see(principal: Principal, owner: str | None) -> bool:
    """An admin sees every job; a user only the jobs it created (not those made before auth, with no owner)."""
    return principal.is_admin or (owner is not None and owner == principal.id)


@answers_with(ErrorCode.JOB_NOT_FOUND, ErrorCode.TEMPORAL_UNAVAILABLE)
async def load_job(job_id: str, reader: JobReaderDep, principal: PrincipalDep) -> JobSnapshot:
    """The job, if the caller may see it; another's job is the same 404 as no job, so ids cannot be probed."""
    job = await reader.read(job_id)
    if not may_see(principal, job.state.owner):
        raise job_not_found(job_id)
    return job


JobDep = Annotated[JobSnapshot, Depends(load_job)]


@answers_with(ErrorCode.TOO_MANY_WAITS)
async def get_job_waits(request: Request) -> JobWaits:
    return request.app.state.job_waits


JobWaitsDep = Annotated[JobWaits, Depends(get_job_waits)]


async def wait_seconds(
    settings: SettingsDep,
    wait: Annotated[float | None, Query(
        ge=0, allow_inf_nan=False,
        description="seconds (0 to MAX_WAIT_SECONDS, 60 by default) to wait for the job to end (succeeded, failed "
                    "or cancelled) before answering; the answer comes as soon as it has ended")] = None,
) -> float | None:
    """`?wait=`, in seconds, within MAX_WAIT_SECONDS; None when not given."""
    if wait is not None and wait > settings.max_wait_seconds:
        raise validation_error([{"field": "wait", "message": f"at most MAX_WAIT_SECONDS, "
                                                             f"{settings.max_wait_seconds:g} seconds"}])
    return wait


WaitDep = Annotated[float | None, Depends(wait_seconds)]
