"""FastAPI dependencies: settings, database (a session for sync routes, `Database` for async ones), Temporal
connection, output storage, and the job a route's `job_id` names (one place loads it for every route, so the
owner check goes in one place too)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from sqlmodel import Session

from api.database import Database
from api.job_reader import JobReader
from api.openapi import answers_with
from api.temporal_connection import TemporalConnection
from app.errors import ErrorCode
from app.jobstore import JobSnapshot
from app.settings import Settings
from app.storage import OutputStorage


# Dependencies that only look something up are `async def`: FastAPI runs a plain `def` dependency on a worker
# thread, a thread hop per dependency per request for nothing.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return Database(request.app.state.engine)


def get_session(request: Request) -> Iterator[Session]:
    """For sync routes, which FastAPI already runs on worker threads."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


@answers_with(ErrorCode.TEMPORAL_UNAVAILABLE)  # what a route that needs Temporal answers while it is down
async def get_temporal(request: Request) -> TemporalConnection:
    return request.app.state.temporal


async def get_storage(request: Request) -> OutputStorage:
    return request.app.state.storage


@dataclass(frozen=True)
class Principal:
    """Who makes a request: rate limits and job caps count per principal."""

    id: str
    role: Literal["admin", "user"]


# Until authentication exists every caller is one open-mode admin.
OPEN_MODE_PRINCIPAL = Principal("anonymous", "admin")


async def get_principal() -> Principal:
    return OPEN_MODE_PRINCIPAL


PrincipalDep = Annotated[Principal, Depends(get_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
DatabaseDep = Annotated[Database, Depends(get_database)]
TemporalDep = Annotated[TemporalConnection, Depends(get_temporal)]
StorageDep = Annotated[OutputStorage, Depends(get_storage)]


async def get_job_reader(request: Request, db: DatabaseDep, temporal: TemporalDep) -> JobReader:
    return JobReader(db, temporal, request.app.state.live_views)


JobReaderDep = Annotated[JobReader, Depends(get_job_reader)]


@answers_with(ErrorCode.JOB_NOT_FOUND, ErrorCode.TEMPORAL_UNAVAILABLE)
async def load_job(job_id: str, reader: JobReaderDep) -> JobSnapshot:
    return await reader.read(job_id)


JobDep = Annotated[JobSnapshot, Depends(load_job)]
