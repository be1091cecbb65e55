"""A database that cannot answer is a 503 the client may retry, never a 500, and its log line carries no SQL."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from api.database import Database
from api.deps import get_database, get_session
from api.errors import database_unavailable
from api.event_streams import ended_if_the_database_cannot_answer
from app.db import make_engine
from tests.harness import api_alone, api_alone_settings, asgi_client, error_of, free_port

# PostgreSQL where nothing listens: the real driver's refusal, at connect.
NOWHERE = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"


async def test_an_unreachable_database_is_a_503_with_retry_after_and_a_quiet_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = make_engine(NOWHERE)

    def configure(app: FastAPI) -> None:
        def session(_: Request) -> Iterator[Session]:
            with Session(unreachable) as opened:
                yield opened

        app.dependency_overrides[get_session] = session
        app.dependency_overrides[get_database] = lambda: Database(unreachable)

    async with api_alone(api_alone_settings(tmp_path), configure) as app, asgi_client(app) as api:
        with caplog.at_level(logging.WARNING, logger="api.errors"):
            listed = await api.get("/jobs")  # a sync route's session
            read = await api.get("/jobs/3f1c8a57-5b8e-4f5e-9a59-0d7c1f0e2b11")  # an async route's Database
    for answer in (listed, read):
        assert answer.status_code == 503, answer.text
        assert error_of(answer)["code"] == "DATABASE_UNAVAILABLE" and answer.headers["Retry-After"] == "1"
    logged = [record.getMessage() for record in caplog.records if "database unavailable" in record.getMessage()]
    assert len(logged) == 2 and not any("SELECT" in line for line in logged), logged
    unreachable.dispose()


def _error_of(engine_url: str, statement: str) -> OperationalError:
    engine = create_engine(engine_url, connect_args={"timeout": 0})
    try:
        with engine.connect() as connection, pytest.raises(OperationalError) as raised:
            connection.execute(text(statement))
        return raised.value
    finally:
        engine.dispose()


def _locked_error(path: Path) -> OperationalError:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE jobs (id TEXT)")
    holder.execute("BEGIN EXCLUSIVE")  # every other connection is refused until it ends
    try:
        return _error_of(f"sqlite:///{path}", "SELECT * FROM jobs")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_locked_database_is_unavailable_and_a_missing_table_is_the_gateways_fault(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    assert database_unavailable(_locked_error(path))
    assert not database_unavailable(_error_of(f"sqlite:///{path}", "SELECT * FROM no_such_table"))


async def test_a_stream_under_way_ends_when_the_database_cannot_answer_and_fails_on_the_gateways_fault(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its 503 can no longer be sent: the stream ends with a warning (the client resumes from its last id),
    where it raised to the server, which logs a traceback and cuts the answer off."""
    path = tmp_path / "held.db"
    locked, missing = _locked_error(path), _error_of(f"sqlite:///{path}", "SELECT * FROM no_such_table")

    async def stream(error: Exception) -> AsyncIterator[str]:
        with ended_if_the_database_cannot_answer("job x"):
            yield "an event"
            raise error

    with caplog.at_level(logging.WARNING, logger="api.event_streams"):
        assert [event async for event in stream(locked)] == ["an event"]
    assert [record.getMessage() for record in caplog.records] == [
        "job x: its event stream ends early: the database cannot answer (OperationalError)"]
    with pytest.raises(OperationalError):
        [event async for event in stream(missing)]


async def test_a_database_without_the_gateways_tables_is_a_500_not_a_retry(tmp_path: Path) -> None:
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")

    def configure(app: FastAPI) -> None:
        def session(_: Request) -> Iterator[Session]:
            with Session(empty) as opened:
                yield opened

        app.dependency_overrides[get_session] = session

    async with api_alone(api_alone_settings(tmp_path), configure) as app, asgi_client(app) as api:
        listed = await api.get("/jobs")
    assert listed.status_code == 500 and error_of(listed)["code"] == "INTERNAL_ERROR"
    empty.dispose()
