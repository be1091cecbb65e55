"""Retention (RETENTION_DAYS): which jobs expire, staged inputs shared between jobs, RetentionWorkflow and its
activities on the dev server, the worker's schedule, and one job deleted end to end."""

from __future__ import annotations

import base64
import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.engine import Engine
from temporalio.client import Client, ScheduleActionStartWorkflow, ScheduleOverlapPolicy, WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.retention import RetentionActivities
from app.db import make_engine, migrate, session_scope
from app.jobstore import get_job, list_events, record_job
from app.models import (
    DeleteJobsInput,
    ExpiredJob,
    JobEventInput,
    JobState,
    JobStatus,
    RecordJobInput,
    RetentionInput,
    RetentionResult,
)
from app.retention import expired_job_ids, input_used_elsewhere, inputs_left_unused, link_job_inputs
from app.settings import Settings
from app.storage.local import LocalStorage
from app.tables import JobRow
from tests.harness import Gateway, assert_eventually, gateway_settings, migrate_database
from worker.main import running_worker
from worker.retention_schedule import RETENTION_INTERVAL, ensure_retention_schedule, retention_schedule_id
from workflows_temporal.retention import RetentionWorkflow
from workflows_temporal.webhook_delivery import webhook_workflow_id

NOW = datetime.now(timezone.utc)
OLD = NOW - timedelta(days=40)
LAST_WEEK = NOW - timedelta(days=7)


def add_job(engine: Engine, status: JobStatus, *, ended: datetime | None, inputs: tuple[str, ...] = (),
            created: datetime | None = None) -> str:
    """A job as its workflow records it, with one log event and the staged inputs it uses."""
    job_id = str(uuid.uuid4())
    created = created or (ended or NOW) - timedelta(minutes=1)
    state = JobState(job_id=job_id, status=status, created_at=created, completed_at=ended)
    event = JobEventInput(key="status", at=created, kind="status", message=status.value)
    with session_scope(engine) as session:
        link_job_inputs(session, job_id, list(inputs), created)
        record_job(session, RecordJobInput(job=state, backend="local", events=[event]))
    return job_id


def add_outputs(storage: LocalStorage, job_id: str) -> None:
    storage.put_bytes(f"{job_id}/0/out_00001_.png", b"png", "image/png")
    storage.put_bytes(f"{job_id}/1/out_00002_.png", b"png", "image/png")


def test_local_storage_deletes_by_prefix_and_nothing_beside_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for key in ("j1/0/a.png", "j1/1/b.png", "j10/0/a.png", "inputs/ab.png", "inputs/abc.png"):
        storage.put_bytes(key, b"x", "image/png")
    assert storage.delete_prefix("j1/") == 2
    assert storage.delete_prefix("j1/") == 0  # gone already: nothing to do, no error
    assert storage.delete_prefix("inputs/ab.png") == 1
    assert stored_keys(storage) == {"j10/0/a.png", "inputs/abc.png"}
    assert not (tmp_path / "j1").exists()
    for refused in ("../", "/", "", "j10//"):
        with pytest.raises(ValueError):
            storage.delete_prefix(refused)
    assert stored_keys(storage) == {"j10/0/a.png", "inputs/abc.png"}


# --- the database's side, on SQLite and PostgreSQL -----------------------------------------------------


def test_jobs_expire_once_ended_before_the_cutoff_and_live_ones_never(engine: Engine) -> None:
    cutoff = NOW - timedelta(days=30)
    expired = {add_job(engine, status, ended=OLD) for status in (JobStatus.succeeded, JobStatus.failed,
                                                                  JobStatus.cancelled)}
    add_job(engine, JobStatus.succeeded, ended=LAST_WEEK)
    add_job(engine, JobStatus.queued, ended=None, created=OLD)
    add_job(engine, JobStatus.running, ended=None, created=OLD)
    # Submitted, images noted, but Temporal never started it: links and no row.
    with session_scope(engine) as session:
        never_started, recent_never_started = str(uuid.uuid4()), str(uuid.uuid4())
        link_job_inputs(session, never_started, ["inputs/a.png"], OLD)
        link_job_inputs(session, recent_never_started, ["inputs/a.png"], NOW)
        expired.add(never_started)

        assert expired_job_ids(session, cutoff, "", 100) == sorted(expired)
        # In batches, each after the last: every one once.
        first = expired_job_ids(session, cutoff, "", 3)
        rest = expired_job_ids(session, cutoff, first[-1], 3)
        assert first + rest == sorted(expired) and len(first) == 3


def test_a_cache_hit_keeps_the_job_whose_outputs_it_shows(engine: Engine) -> None:
    cutoff = NOW - timedelta(days=30)
    source = add_job(engine, JobStatus.succeeded, ended=OLD)
    hit = add_job(engine, JobStatus.succeeded, ended=LAST_WEEK)
    with session_scope(engine) as session:
        session.execute(update(JobRow).where(JobRow.job_id == hit).values(cache_hit=True, cached_from=source))
        session.commit()
        assert source not in expired_job_ids(session, cutoff, "", 100)
        session.execute(update(JobRow).where(JobRow.job_id == hit).values(cached_from=None))
        session.commit()
        assert source in expired_job_ids(session, cutoff, "", 100)


def test_a_staged_input_is_left_unused_only_when_every_job_using_it_goes(engine: Engine) -> None:
    old_a = add_job(engine, JobStatus.succeeded, ended=OLD, inputs=("inputs/shared.png", "inputs/own.png"))
    old_b = add_job(engine, JobStatus.failed, ended=OLD, inputs=("inputs/shared.png",))
    recent = add_job(engine, JobStatus.succeeded, ended=LAST_WEEK, inputs=("inputs/kept.png",))
    add_job(engine, JobStatus.running, ended=None, inputs=("inputs/kept.png",))
    with session_scope(engine) as session:
        assert inputs_left_unused(session, [old_a]) == ["inputs/own.png"]
        assert inputs_left_unused(session, [old_a, old_b]) == ["inputs/own.png", "inputs/shared.png"]
        assert inputs_left_unused(session, [recent]) == []  # the running job still uses it
        assert inputs_left_unused(session, []) == []


class SubmittingMeanwhile(LocalStorage):
    """A store in which, as retention deletes the first staged input, a new job sends the image of the second:
    the API notes the new job's use of it, then stores it (app/submission.py)."""

    def __init__(self, root: Path, engine: Engine, first: str, second: str) -> None:
        super().__init__(root)
        self.engine, self.first, self.second = engine, first, second
        self.newcomer = str(uuid.uuid4())

    def delete_prefix(self, prefix: str) -> int:
        deleted = super().delete_prefix(prefix)
        if prefix == self.first:
            with session_scope(self.engine) as session:
                link_job_inputs(session, self.newcomer, [self.second], NOW)
            self.put_bytes(self.second, b"png", "image/png")
        return deleted


async def test_an_input_a_new_job_links_after_the_batchs_check_is_kept(
    engine: Engine, tmp_path: Path, temporal_client: Client
) -> None:
    first, second = "inputs/a.png", "inputs/b.png"
    storage = SubmittingMeanwhile(tmp_path / "outputs", engine, first, second)
    old = add_job(engine, JobStatus.succeeded, ended=OLD, inputs=(first, second))
    for key in (first, second):
        storage.put_bytes(key, b"png", "image/png")
    activities = RetentionActivities(engine, storage, temporal_client)
    result = await ActivityEnvironment().run(activities.delete_jobs, DeleteJobsInput(jobs=[ExpiredJob(job_id=old)]))
    assert (result.jobs, result.input_files) == (1, 1)
    assert stored_keys(storage) == {second}  # the new job's image, which it stored after noting its use
    with session_scope(engine) as session:
        assert inputs_left_unused(session, [storage.newcomer]) == [second]


def test_an_input_is_used_elsewhere_when_a_job_outside_the_batch_links_it(engine: Engine) -> None:
    one = add_job(engine, JobStatus.succeeded, ended=OLD, inputs=("inputs/x.png",))
    two = add_job(engine, JobStatus.succeeded, ended=OLD, inputs=("inputs/x.png",))
    with session_scope(engine) as session:
        assert input_used_elsewhere(session, "inputs/x.png", [one])
        assert not input_used_elsewhere(session, "inputs/x.png", [one, two])
        assert not input_used_elsewhere(session, "inputs/nobody.png", [one])


# --- RetentionWorkflow and its activities on the dev server ----------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    migrate(engine)
    return engine


async def run_retention(client: Client, task_queue: str, engine: Engine, storage: LocalStorage,
                        days: int) -> RetentionResult:
    activities = RetentionActivities(engine, storage, client)
    with ThreadPoolExecutor(max_workers=2) as executor:
        async with Worker(client, task_queue=task_queue, workflows=[RetentionWorkflow],
                          activities=[activities.find_expired_jobs, activities.delete_jobs],
                          activity_executor=executor):
            return await client.execute_workflow(
                RetentionWorkflow.run, RetentionInput(retention_days=days, batch_size=2),
                id=f"retention-{uuid.uuid4()}", task_queue=task_queue,
            )


def stored_keys(storage: LocalStorage) -> set[str]:
    return {path.relative_to(storage.root).as_posix() for path in storage.root.rglob("*") if path.is_file()}


async def test_retention_deletes_expired_jobs_and_leaves_live_recent_and_open_ones(
    temporal_client: Client, task_queue: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    for key in ("inputs/shared.png", "inputs/old-only.png"):
        storage.put_bytes(key, b"png", "image/png")
    old = [add_job(sqlite_engine, JobStatus.succeeded, ended=OLD, inputs=("inputs/shared.png", "inputs/old-only.png")),
           add_job(sqlite_engine, JobStatus.failed, ended=OLD, inputs=("inputs/old-only.png",)),
           add_job(sqlite_engine, JobStatus.cancelled, ended=OLD)]
    recent = add_job(sqlite_engine, JobStatus.succeeded, ended=LAST_WEEK, inputs=("inputs/shared.png",))
    running = add_job(sqlite_engine, JobStatus.running, ended=None, created=OLD)
    # Its row says it ended long ago, but its workflow is open (e.g. reset in the Web UI): left alone.
    still_open = add_job(sqlite_engine, JobStatus.succeeded, ended=OLD)
    for job_id in [*old, recent, running, still_open]:
        add_outputs(storage, job_id)
    await temporal_client.start_workflow("GenerationWorkflow", id=still_open, task_queue=f"{task_queue}.nobody")
    try:
        started = datetime.now(timezone.utc)
        result = await run_retention(temporal_client, task_queue, sqlite_engine, storage, days=30)
        assert (result.jobs, result.output_files, result.input_files, result.in_flight) == (3, 6, 1, 1)
        assert result.workflows == 0  # none of them ever ran in Temporal
        # Counted back from the run's own start (NOW is when the test module was imported, minutes earlier).
        assert started - timedelta(days=30) <= result.cutoff <= datetime.now(timezone.utc) - timedelta(days=30)
        with session_scope(sqlite_engine) as session:
            assert [get_job(session, job_id) for job_id in old] == [None, None, None]
            assert [list_events(session, job_id) for job_id in old] == [[], [], []]
            assert all(get_job(session, job_id) for job_id in (recent, running, still_open))
            assert list_events(session, recent)
        kept = {f"{job_id}/{n}/out_0000{n + 1}_.png" for job_id in (recent, running, still_open) for n in (0, 1)}
        assert stored_keys(storage) == kept | {"inputs/shared.png"}  # the recent job still uses it
        assert not any((storage.root / job_id).exists() for job_id in old)

        again = await run_retention(temporal_client, task_queue, sqlite_engine, storage, days=30)
        assert (again.jobs, again.output_files, again.input_files, again.in_flight) == (0, 0, 0, 1)

        # A day's retention: the recent job goes too, and with it the last use of the shared input.
        shorter = await run_retention(temporal_client, task_queue, sqlite_engine, storage, days=1)
        assert (shorter.jobs, shorter.input_files) == (1, 1)
        assert stored_keys(storage) == {f"{job_id}/{n}/out_0000{n + 1}_.png" for job_id in (running, still_open)
                                        for n in (0, 1)}
    finally:
        await temporal_client.get_workflow_handle(still_open).terminate("test over")


async def test_retention_deletes_a_jobs_closed_webhook_deliveries_and_waits_for_running_ones(
    temporal_client: Client, task_queue: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    delivered = add_job(sqlite_engine, JobStatus.succeeded, ended=OLD)
    retrying = add_job(sqlite_engine, JobStatus.failed, ended=OLD)
    # Stand-ins for WebhookDeliveryWorkflow with its ids (no worker polls their queue): one closed, one running.
    nobody = f"{task_queue}.nobody"
    closed = await temporal_client.start_workflow("WebhookDeliveryWorkflow", id=webhook_workflow_id(
        delivered, "job.succeeded"), task_queue=nobody)
    await closed.terminate("delivered")
    running = await temporal_client.start_workflow("WebhookDeliveryWorkflow", id=webhook_workflow_id(
        retrying, "job.failed"), task_queue=nobody)
    try:
        result = await run_retention(temporal_client, task_queue, sqlite_engine, storage, days=30)
        # The one workflow whose deletion Temporal accepted is the closed delivery (neither job ran a workflow of
        # its own). Temporal removes it in the background, half a minute later on the dev server: not waited for.
        assert (result.jobs, result.workflows, result.in_flight) == (1, 1, 1)
        with session_scope(sqlite_engine) as session:
            assert get_job(session, delivered) is None and get_job(session, retrying) is not None
        assert (await running.describe()).status is WorkflowExecutionStatus.RUNNING
    finally:
        await running.terminate("test over")


# --- the worker's schedule ------------------------------------------------------------------------------


def settings_for(client: Client, tmp_path: Path, task_queue: str, **overrides: object) -> Settings:
    # Nothing listens at this ComfyUI: the schedule needs none.
    return gateway_settings(client, "http://127.0.0.1:9", tmp_path, task_queue, **overrides)


async def test_the_worker_keeps_the_schedule_to_match_retention_days(
    temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    settings = settings_for(temporal_client, tmp_path, task_queue, retention_days=30)
    migrate_database(settings)
    handle = temporal_client.get_schedule_handle(retention_schedule_id(settings))
    async with running_worker(temporal_client, settings):
        described = await handle.describe()
        schedule = described.schedule
        assert [interval.every for interval in schedule.spec.intervals] == [RETENTION_INTERVAL]
        assert schedule.policy.overlap is ScheduleOverlapPolicy.SKIP
        action = schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow) and action.workflow == "RetentionWorkflow"
        assert action.task_queue == task_queue
        assert await temporal_client.data_converter.decode(action.args, [RetentionInput]) == [
            RetentionInput(retention_days=30)]

        # Triggered as an operator would in the Web UI: its cutoff counts from the time it was scheduled for.
        await handle.trigger()
        run = await assert_eventually(lambda: _first_action(handle), what="a triggered run")
        result = await temporal_client.get_workflow_handle(run.action.workflow_id, result_type=RetentionResult).result()
        # (Temporal keeps the scheduled time to the second.)
        assert abs(result.cutoff - (run.scheduled_at - timedelta(days=30))) < timedelta(seconds=1)
        assert result.jobs == 0

    assert await ensure_retention_schedule(temporal_client, settings) == "unchanged"
    await handle.pause(note="an operator's pause")
    assert await ensure_retention_schedule(temporal_client, settings.model_copy(update={"retention_days": 7})) == "updated"
    described = await handle.describe()
    assert described.schedule.state.paused and described.schedule.state.note == "an operator's pause"
    assert await temporal_client.data_converter.decode(described.schedule.action.args, [RetentionInput]) == [
        RetentionInput(retention_days=7)]

    unset = settings.model_copy(update={"retention_days": None})
    assert await ensure_retention_schedule(temporal_client, unset) == "deleted"
    assert await ensure_retention_schedule(temporal_client, unset) == "absent"
    with pytest.raises(RPCError):
        await handle.describe()


async def _first_action(handle):  # type: ignore[no-untyped-def]
    described = await handle.describe()
    return described.info.recent_actions[0] if described.info.recent_actions else None


async def test_without_retention_days_the_worker_makes_no_schedule(
    temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    settings = settings_for(temporal_client, tmp_path, task_queue)
    migrate_database(settings)
    async with running_worker(temporal_client, settings):
        with pytest.raises(RPCError):
            await temporal_client.get_schedule_handle(retention_schedule_id(settings)).describe()


@pytest.mark.parametrize("value", ["0", "-3", "soon", "1.5"])
def test_retention_days_must_be_a_whole_number_of_days(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETENTION_DAYS", value)
    with pytest.raises(ValidationError, match="retention_days"):
        Settings(_env_file=None)


def test_retention_is_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).retention_days is None
    monkeypatch.setenv("RETENTION_DAYS", "30")
    assert Settings(_env_file=None).retention_days == 30


# --- end to end -------------------------------------------------------------------------------------


def _png() -> str:
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(image, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(image.getvalue()).decode()}"


@pytest.mark.settings(retention_days=30)
async def test_a_job_past_retention_is_gone_with_its_outputs_and_staged_input(
    gateway: Gateway, temporal_client: Client
) -> None:
    job = await gateway.run({"workflowId": "invert_image", "inputs": {"image": _png()}})
    assert job["status"] == "succeeded", job
    engine = make_engine(gateway.settings.resolved_database_url)
    with session_scope(engine) as session:
        staged = get_job(session, job["jobId"]).inputs["image"].removeprefix("stored-input://")
        session.execute(update(JobRow).where(JobRow.job_id == job["jobId"]).values(completed_at=OLD))
        session.commit()
    storage_root = gateway.settings.resolved_storage_path
    assert (storage_root / staged).exists() and (storage_root / job["jobId"]).exists()

    handle = temporal_client.get_schedule_handle(retention_schedule_id(gateway.settings))
    await handle.trigger()
    run = await assert_eventually(lambda: _first_action(handle), what="a triggered run")
    result = await temporal_client.get_workflow_handle(run.action.workflow_id, result_type=RetentionResult).result()
    # Its closed workflow too, which Temporal deletes in the background (half a minute later, on the dev server).
    assert (result.jobs, result.output_files, result.input_files, result.workflows) == (1, 1, 1, 1)
    with session_scope(engine) as session:
        assert get_job(session, job["jobId"]) is None and list_events(session, job["jobId"]) == []
    assert not (storage_root / staged).exists() and not (storage_root / job["jobId"]).exists()
    engine.dispose()
