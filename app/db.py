"""SQL engine and sessions (SQLite by default, PostgreSQL in production), and the schema's migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, create_engine

from app.migrations import alembic_config, script_directory


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database_file = url.split(":///", 1)[-1]
        if database_file and database_file != ":memory:":
            Path(database_file).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; both are separate processes.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything the gateway stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


# What schema_revision reports for a database that has no Alembic revision (no alembic_version table).
EMPTY = "empty"  # none of the gateway's tables
UNVERSIONED = "unversioned"  # the tables made by create_all before migrations existed: revision 0001's
BASELINE_REVISION = "0001"
BASELINE_TABLES = frozenset({"jobs", "job_events", "workflow_templates"})  # 0001's, by name: the models change

# Advisory locks are per database; only migrate takes this one, so any constant will do.
_MIGRATION_LOCK_KEY = 7_303_014_226_437_373_556


class SchemaNotCurrent(Exception):
    """The database's schema is not the one this code was written for; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    """What a migrate run found and left: revisions, or EMPTY / UNVERSIONED."""

    before: str
    after: str


def migrate(engine: Engine) -> Migration:
    """Upgrade the schema to this code's head revision. A database made before migrations is stamped at 0001
    first; one at a revision this code does not know is refused. Several runs at once are safe: each waits
    for the one before it and then finds less (or nothing) to do."""
    script = script_directory()
    with _migration_transaction(engine) as connection:
        before = schema_revision(connection)
        if before not in (EMPTY, UNVERSIONED) and not _is_known(script, before):
            raise SchemaNotCurrent(_mismatch(before, script))
        config = alembic_config(connection)
        if before == UNVERSIONED:
            command.stamp(config, BASELINE_REVISION)
        command.upgrade(config, "head")
        return Migration(before=before, after=schema_revision(connection))


def require_current_schema(engine: Engine) -> None:
    """Raise SchemaNotCurrent unless the database is at this code's head revision. The API, the worker and
    the registry commands start only then: they never change the schema themselves."""
    with engine.connect() as connection:
        found = schema_revision(connection)
    script = script_directory()
    if found != script.get_current_head():
        raise SchemaNotCurrent(_mismatch(found, script))


def schema_revision(connection: Connection) -> str:
    """The database's Alembic revision, else EMPTY or UNVERSIONED."""
    revisions = MigrationContext.configure(connection).get_current_heads()
    if revisions:
        return ",".join(revisions)
    present = BASELINE_TABLES & set(inspect(connection).get_table_names())
    if not present:
        return EMPTY
    if present == BASELINE_TABLES:
        return UNVERSIONED
    raise SchemaNotCurrent(
        f"database has the tables {', '.join(sorted(present))} but not all of {', '.join(sorted(BASELINE_TABLES))}"
        " and no schema revision: it was not made by the gateway, so `comfyui-gateway migrate` cannot adopt it"
    )


def _is_known(script: ScriptDirectory, revision: str) -> bool:
    return revision in {known.revision for known in script.walk_revisions()}


def _mismatch(found: str, script: ScriptDirectory) -> str:
    head = script.get_current_head()
    if found == EMPTY:
        return f"database has no schema yet, this code needs revision {head}: run `comfyui-gateway migrate`"
    if found == UNVERSIONED:
        return (f"database schema predates migrations (no revision), this code needs revision {head}:"
                " run `comfyui-gateway migrate`")
    if _is_known(script, found):
        return f"database schema is at revision {found}, this code needs {head}: run `comfyui-gateway migrate`"
    return (f"database schema is at revision {found}, which this code does not know (its head is {head}): a newer"
            " release migrated it; run that release (`comfyui-gateway migrate` never downgrades)")


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that one migrate run at a time holds, committed when the block ends."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:  # PostgreSQL's DDL is transactional: all revisions commit as one
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            yield connection
        return
    # pysqlite runs DDL outside any transaction of its own. BEGIN EXCLUSIVE makes the migration atomic, and a
    # second run waits for it (the busy timeout) and then sees the schema it left.
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql("BEGIN EXCLUSIVE")
        try:
            yield connection
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")
