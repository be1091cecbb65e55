"""Database work for async routes, off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app.db import session_scope

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Database:
    """Database work for async routes. Each call runs on a worker thread with a session of its own: a
    waiting connection pool never blocks the event loop (20 parallel submits once froze the API), and no
    connection is held while a route awaits Temporal or ComfyUI."""

    engine: Engine

    async def run(self, work: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        def in_session() -> T:
            with session_scope(self.engine) as session:
                return work(session, *args, **kwargs)

        return await run_in_threadpool(in_session)
