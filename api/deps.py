"""FastAPI dependencies: settings, database (a session for sync routes, `Database` for async ones), Temporal
client, output storage, and the job a route's `job_id` names (one place loads it for every route, so the
owner check goes in one place too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session
from temporalio.client import Client

from api.database import Database
from api.errors import ApiError
from api.job_reader import JobReader
from app.errors import ErrorCode
from app.jobstore import JobSnapshot
from app.settings import Settings
from app.storage import OutputStorage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return Database(request.app.state.engine)


def get_session(request: Request) -> Iterator[Session]:
    """For sync routes, which FastAPI already runs on worker threads."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


def get_temporal(request: Request) -> Client:
    client = request.app.state.temporal.client
    if client is None:
        raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal is not reachable; no job was created or changed")
    return client


def get_storage(request: Request) -> OutputStorage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
DatabaseDep = Annotated[Database, Depends(get_database)]
TemporalClientDep = Annotated[Client, Depends(get_temporal)]
StorageDep = Annotated[OutputStorage, Depends(get_storage)]


def get_job_reader(request: Request, db: DatabaseDep, temporal: TemporalClientDep) -> JobReader:
    return JobReader(db, temporal, request.app.state.live_views)


JobReaderDep = Annotated[JobReader, Depends(get_job_reader)]


async def load_job(job_id: str, reader: JobReaderDep) -> JobSnapshot:
    return await reader.read(job_id)


JobDep = Annotated[JobSnapshot, Depends(load_job)]
