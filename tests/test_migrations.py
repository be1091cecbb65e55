"""Schema migrations, on SQLite and PostgreSQL: a database made before migrations existed is adopted with its
data, an empty one is created, the result matches the models, and nothing but `migrate` (and `dev`) starts on
a schema that is not at the head revision."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

from app.db import (
    EMPTY,
    UNVERSIONED,
    Migration,
    SchemaNotCurrent,
    as_utc,
    make_engine,
    migrate,
    require_current_schema,
)
from app.errors import ErrorCode
from app.jobstore import get_job_snapshot, list_events
from app.migrations import script_directory
from app.models import JobError, JobState, JobStatus, LiveProgress, OutputRef
from app.templates.store import get_template, prepare_database
from tests.harness import cli_environment

HEAD = script_directory().get_current_head()

# What SQLModel.metadata.create_all made before migrations existed, frozen here: the models will change, and
# this is the schema that databases in the field have.
SCHEMA_BEFORE_MIGRATIONS = {
    "sqlite": """
        CREATE TABLE job_events (
            id INTEGER NOT NULL, job_id VARCHAR(64) NOT NULL, event_key VARCHAR(200) NOT NULL, at DATETIME NOT NULL,
            kind VARCHAR(32) NOT NULL, message VARCHAR NOT NULL, data JSON NOT NULL,
            PRIMARY KEY (id), CONSTRAINT uq_job_event_key UNIQUE (job_id, event_key));
        CREATE INDEX ix_job_events_job_id ON job_events (job_id);
        CREATE TABLE jobs (
            job_id VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, template_id VARCHAR(128), template_version INTEGER,
            seed INTEGER, backend VARCHAR(64) NOT NULL, prompt_id VARCHAR(64), attempts INTEGER NOT NULL,
            progress INTEGER NOT NULL, inputs JSON NOT NULL, metadata JSON NOT NULL, outputs JSON NOT NULL, error JSON,
            created_at DATETIME NOT NULL, started_at DATETIME, completed_at DATETIME, execution_time_ms INTEGER,
            updated_at DATETIME NOT NULL, PRIMARY KEY (job_id));
        CREATE INDEX ix_jobs_created_at ON jobs (created_at);
        CREATE INDEX ix_jobs_status ON jobs (status);
        CREATE INDEX ix_jobs_template_id ON jobs (template_id);
        CREATE TABLE workflow_templates (
            template_id VARCHAR(128) NOT NULL, version INTEGER NOT NULL, name VARCHAR NOT NULL,
            description VARCHAR NOT NULL, workflow_json JSON NOT NULL, input_schema JSON NOT NULL,
            default_params JSON NOT NULL, created_at DATETIME NOT NULL, deleted_at DATETIME,
            PRIMARY KEY (template_id, version));
    """,
    "postgresql": """
        CREATE TABLE job_events (
            id SERIAL NOT NULL, job_id VARCHAR(64) NOT NULL, event_key VARCHAR(200) NOT NULL,
            at TIMESTAMP WITH TIME ZONE NOT NULL, kind VARCHAR(32) NOT NULL, message VARCHAR NOT NULL,
            data JSON NOT NULL, PRIMARY KEY (id), CONSTRAINT uq_job_event_key UNIQUE (job_id, event_key));
        CREATE INDEX ix_job_events_job_id ON job_events (job_id);
        CREATE TABLE jobs (
            job_id VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, template_id VARCHAR(128), template_version INTEGER,
            seed INTEGER, backend VARCHAR(64) NOT NULL, prompt_id VARCHAR(64), attempts INTEGER NOT NULL,
            progress INTEGER NOT NULL, inputs JSON NOT NULL, metadata JSON NOT NULL, outputs JSON NOT NULL, error JSON,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL, started_at TIMESTAMP WITH TIME ZONE,
            completed_at TIMESTAMP WITH TIME ZONE, execution_time_ms INTEGER,
            updated_at TIMESTAMP WITH TIME ZONE NOT NULL, PRIMARY KEY (job_id));
        CREATE INDEX ix_jobs_created_at ON jobs (created_at);
        CREATE INDEX ix_jobs_status ON jobs (status);
        CREATE INDEX ix_jobs_template_id ON jobs (template_id);
        CREATE TABLE workflow_templates (
            template_id VARCHAR(128) NOT NULL, version INTEGER NOT NULL, name VARCHAR NOT NULL,
            description VARCHAR NOT NULL, workflow_json JSON NOT NULL, input_schema JSON NOT NULL,
            default_params JSON NOT NULL, created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            deleted_at TIMESTAMP WITH TIME ZONE, PRIMARY KEY (template_id, version));
    """,
}


def at(minute: int) -> datetime:
    return datetime(2026, 5, 1, 12, minute, tzinfo=timezone.utc)


def _table(name: str, *columns: str, json: tuple[str, ...] = (), times: tuple[str, ...] = ()) -> sa.TableClause:
    # Typed like the columns of that schema, so the values are written as the code of that time wrote them.
    return sa.table(name, *(sa.column(column) for column in columns), *(sa.column(column, sa.JSON) for column in json),
                    *(sa.column(column, sa.DateTime(timezone=True)) for column in times))


OLD_JOBS = _table(
    "jobs", "job_id", "status", "template_id", "template_version", "seed", "backend", "prompt_id", "attempts",
    "progress", "execution_time_ms", json=("inputs", "metadata", "outputs", "error"),
    times=("created_at", "started_at", "completed_at", "updated_at"),
)
OLD_EVENTS = _table("job_events", "job_id", "event_key", "kind", "message", json=("data",), times=("at",))
OLD_TEMPLATES = _table(
    "workflow_templates", "template_id", "version", "name", "description",
    json=("workflow_json", "input_schema", "default_params"), times=("created_at", "deleted_at"),
)
GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": "{{width}}", "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "old"}}}
OUTPUT = {"filename": "old_00001_.png", "storagePath": "job-done/0/old_00001_.png", "url": "/outputs/job-done/old_00001_.png",
          "size": 70, "sha256": "ab" * 32, "contentType": "image/png", "nodeId": "2", "animated": False}


def job(job_id: str, status: str, **fields: object) -> dict[str, object]:
    return {"job_id": job_id, "status": status, "template_id": "old_template", "template_version": 2, "seed": 7,
            "backend": "comfyui-1", "prompt_id": None, "attempts": 1, "progress": 0, "execution_time_ms": None,
            "inputs": {"width": 8}, "metadata": {"team": "art"}, "outputs": [], "error": None, "created_at": at(0),
            "started_at": None, "completed_at": None, "updated_at": at(0), **fields}


def create_schema_before_migrations(engine: Engine) -> None:
    """The frozen schema, holding what the gateway of that time wrote: three jobs, their events, two versions
    of a template."""
    with engine.begin() as connection:
        for statement in SCHEMA_BEFORE_MIGRATIONS[engine.dialect.name].split(";"):
            if statement.strip():
                connection.exec_driver_sql(statement)
        connection.execute(sa.insert(OLD_JOBS), [
            job("job-queued", "queued"),
            job("job-done", "succeeded", prompt_id="p-done", progress=100, outputs=[OUTPUT], started_at=at(1),
                completed_at=at(2), execution_time_ms=1500, updated_at=at(2)),
            job("job-failed", "failed", attempts=2, started_at=at(1), completed_at=at(3), updated_at=at(3),
                error={"code": "COMFYUI_OOM", "message": "out of memory", "details": {"nodeId": "1"}}),
        ])
        connection.execute(sa.insert(OLD_EVENTS), [
            {"job_id": "job-done", "event_key": "wf:queued", "kind": "status", "message": "queued", "data": {},
             "at": at(0)},
            {"job_id": "job-done", "event_key": "wf:succeeded", "kind": "status", "message": "succeeded",
             "data": {"outputs": 1}, "at": at(2)},
            {"job_id": "job-failed", "event_key": "wf:failed", "kind": "error", "message": "out of memory",
             "data": {"code": "COMFYUI_OOM"}, "at": at(3)},
        ])
        connection.execute(sa.insert(OLD_TEMPLATES), [
            {"template_id": "animated_noise_webp", "version": 1, "name": "Bundled", "description": "",
             "workflow_json": GRAPH, "input_schema": {}, "default_params": {"width": 8}, "created_at": at(0),
             "deleted_at": None},
            {"template_id": "old_template", "version": 1, "name": "Old", "description": "", "workflow_json": GRAPH,
             "input_schema": {}, "default_params": {"width": 8}, "created_at": at(0), "deleted_at": None},
            {"template_id": "old_template", "version": 2, "name": "Old, renamed", "description": "v2",
             "workflow_json": GRAPH, "input_schema": {"type": "object", "fields": {"width": {"type": "integer"}}},
             "default_params": {}, "created_at": at(1), "deleted_at": None},
        ])


def test_a_database_from_before_migrations_is_adopted_with_its_data(database_url: str) -> None:
    engine = make_engine(database_url)
    create_schema_before_migrations(engine)

    assert migrate(engine) == Migration(before=UNVERSIONED, after=HEAD)
    with Session(engine) as session:
        done = get_job_snapshot(session, "job-done")
        assert done is not None and done.state == JobState(
            job_id="job-done", status=JobStatus.succeeded, template_id="old_template", template_version=2, seed=7,
            attempts=1, metadata={"team": "art"}, created_at=at(0), started_at=at(1), completed_at=at(2),
            execution_time_ms=1500, backend="comfyui-1",
            # Outputs were stored with their URL then; they read as storage keys now, the URL made when read.
            outputs=[OutputRef(filename=OUTPUT["filename"], storage_key=OUTPUT["storagePath"], size=70,
                               sha256=OUTPUT["sha256"], content_type="image/png", node_id="2")],
        )
        assert done.live == LiveProgress(percent=100)
        failed = get_job_snapshot(session, "job-failed")
        assert failed is not None and failed.state.attempts == 2 and failed.state.completed_at == at(3)
        assert failed.state.error == JobError(code=ErrorCode.COMFYUI_OOM, message="out of memory",
                                              details={"nodeId": "1"})
        assert get_job_snapshot(session, "job-queued").state.status is JobStatus.queued  # type: ignore[union-attr]
        events = [(e.kind, e.message, e.data, as_utc(e.at)) for e in list_events(session, "job-done")]
        assert events == [("status", "queued", {}, at(0)), ("status", "succeeded", {"outputs": 1}, at(2))]
        assert [e.message for e in list_events(session, "job-failed")] == ["out of memory"]
        latest = get_template(session, "old_template")
        assert latest is not None and (latest.version, latest.name, latest.input_schema["fields"]) == (
            2, "Old, renamed", {"width": {"type": "integer"}})
        first = get_template(session, "old_template", version=1)
        assert first is not None and (first.workflow_json, first.default_params) == (GRAPH, {"width": 8})
        assert (first.limits, latest.limits) == ({}, {})
        # Its frames are a batch: the bundled template keeps the batches its schema always allowed.
        assert get_template(session, "animated_noise_webp").limits == {"maxBatchSize": 32}  # type: ignore[union-attr]

    assert migrate(engine) == Migration(before=HEAD, after=HEAD)
    prepare_database(engine)  # what the API and the worker run at start-up
    engine.dispose()


def test_an_empty_database_is_migrated_to_exactly_the_models_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    assert migrate(engine) == Migration(before=EMPTY, after=HEAD)
    with engine.connect() as connection:
        # Also what keeps later revisions honest: a model changed without a revision shows up here.
        assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []
    engine.dispose()


def test_a_schema_not_at_head_is_refused_with_what_to_run(database_url: str) -> None:
    engine = make_engine(database_url)
    with pytest.raises(SchemaNotCurrent, match=f"no schema yet, this code needs revision {HEAD}: run `comfyui-gateway"):
        prepare_database(engine)
    create_schema_before_migrations(engine)
    with pytest.raises(SchemaNotCurrent, match="predates migrations .* run `comfyui-gateway migrate`"):
        require_current_schema(engine)
    migrate(engine)
    require_current_schema(engine)
    engine.dispose()


def test_a_database_migrated_by_a_newer_release_is_refused(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaNotCurrent, match=f"at revision 9999, which this code does not know \\(its head is {HEAD}"):
        require_current_schema(engine)
    with pytest.raises(SchemaNotCurrent, match="never downgrades"):
        migrate(engine)


def test_tables_of_something_else_are_not_adopted(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE jobs (id INTEGER PRIMARY KEY)")
    with pytest.raises(SchemaNotCurrent, match="not made by the gateway"):
        migrate(engine)
    engine.dispose()


def gateway_command(data_dir: Path, *args: str, **variables: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=data_dir.parent, text=True,
                            env=cli_environment(data_dir, **variables), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


def test_the_api_and_worker_commands_start_only_after_migrate(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    engine = make_engine(f"sqlite:///{data_dir / 'gateway.db'}")
    create_schema_before_migrations(engine)
    engine.dispose()
    refusing = {command: gateway_command(data_dir, command) for command in ("api", "worker")}
    for command, process in refusing.items():
        code, _, stderr = finished(process)
        assert code != 0
        assert stderr.strip() == (  # one line
            f"comfyui-gateway {command}: database schema predates migrations (no revision), this code needs revision"
            f" {HEAD}: run `comfyui-gateway migrate`"
        )

    code, stdout, stderr = finished(gateway_command(data_dir, "migrate"))
    assert code == 0, stderr
    assert f"before    {UNVERSIONED}\nafter     {HEAD}\n" in stdout
    engine = make_engine(f"sqlite:///{data_dir / 'gateway.db'}")
    with Session(engine) as session:  # what the API then serves (the registry commands are the API's now)
        assert get_template(session, "old_template") is not None
    engine.dispose()


def test_migrate_run_twice_at_once_succeeds_both_times(database_url: str, tmp_path: Path) -> None:
    runs = [gateway_command(tmp_path / "data", "migrate", DATABASE_URL=database_url) for _ in range(2)]
    results = [finished(run) for run in runs]
    assert [code for code, _, _ in results] == [0, 0], [stderr for _, _, stderr in results]
    befores = sorted(line.split()[1] for _, stdout, _ in results for line in stdout.splitlines() if "before" in line)
    assert befores == sorted([EMPTY, HEAD])  # one created the schema; the other waited, then found it current
    engine = make_engine(database_url)
    require_current_schema(engine)
    engine.dispose()
